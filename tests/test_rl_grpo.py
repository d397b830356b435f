"""grpo / ra-grpo (TRL GRPOTrainer with safeft rewards) on a tiny model: runs, trains the
adapter, and ra-grpo keeps the scheduled number of worst prompts per generation batch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import safeft
from safeft.errors import ConfigError
from safeft.rl.rewards import register_reward


@register_reward("test-length")
def _length():
    return lambda prompts, responses: torch.tensor([float(len(r)) / 10 for r in responses])


def _run(tmp_path, tiny_model_dir, method, **extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Say something about {w}." for w in ("cats", "rain", "bread", "maps")) + "\n")
    opts = {"model.name_or_path": str(tiny_model_dir), "method.name": method, "data.train.path": str(prompts),
            "method.reward": "test-length", "method.num_generations": 2, "method.max_new_tokens": 6,
            "training.per_device_train_batch_size": 4, "training.max_steps": 2, "training.learning_rate": 1e-3,
            "output_dir": str(tmp_path / method), "model.lora.r": 4}
    opts.update(extra)
    return safeft.train(None, **opts)


def test_grpo_trains_the_adapter(tmp_path, tiny_model_dir):
    summary = _run(tmp_path, tiny_model_dir, "grpo", **{"training.max_steps": 1})
    assert summary["global_step"] == 1
    w = load_file(str(tmp_path / "grpo" / "model" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k)
    logs = [json.loads(ln) for ln in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward" in r for r in logs)


def test_ra_grpo_keeps_the_tail_prompts(tmp_path, tiny_model_dir):
    # one generation batch of 4 prompts × 2; M=2, n=0, alpha=0.5, rho=0.5: alpha from step 1 -> keep 2 prompts
    summary = _run(tmp_path, tiny_model_dir, "ra-grpo", **{
        "method.steps_per_generation": 2, "method.n_warmup": 0, "method.alpha": 0.5, "method.rho": 0.5,
        "training.per_device_train_batch_size": 4})
    assert summary["kept_prompts_by_generation"] == [2]


def test_grpo_batch_must_hold_whole_groups(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="num_generations"):
        _run(tmp_path, tiny_model_dir, "grpo", **{"method.num_generations": 3})
