"""Shared fixtures: tiny random Llama models with the real SmolLM2 tokenizer, the embedded model,
and the path of ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

# On an oversubscribed CPU, OpenMP's busy-wait barriers make processes spin against each other
# (seen as stalls in gomp_barrier_wait_end); passive waiting keeps subprocess-heavy tests moving.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAFEFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real embedded SmolLM2 as a safetensors dir (converted once, then cached)."""
    from safeft.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from safeft.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) saved with SmolLM2's tokenizer and chat template."""
    from safeft.models import tiny_llama

    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=64, layers=2, seed=0)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(24)]
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
