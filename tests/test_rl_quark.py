"""Quark: quantile assignment, the loss on hand-computed numbers, and a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import safeft
from safeft.methods.quark import control_prefix, quantize, quark_loss
from safeft.rl.rewards import register_reward


@register_reward("test-quark-length")
def _length():
    return lambda prompts, responses: torch.tensor([float(len(r)) for r in responses])


def test_quantize_by_rank():
    rewards = [0.5, -1.0, 3.0, 2.0, 0.0]
    assert quantize(rewards, 5) == [3, 1, 5, 4, 2]
    assert quantize(rewards, 2) == [1, 1, 2, 2, 1]  # ranks 0-2 -> 1, ranks 3-4 -> 2
    assert quantize([1.0, 1.0, 1.0, 1.0], 2) == [1, 1, 2, 2]  # ties: earlier first


def test_quark_loss_hand_computed():
    logits = torch.zeros(1, 1, 2)  # p = (.5, .5)
    ref = torch.log(torch.tensor([[[0.8, 0.2]]]))
    loss, st = quark_loss(logits, ref, torch.tensor([[0]]), torch.ones(1, 1), kl_coef=0.05, entropy_coef=0.06)
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert st["nll"] == pytest.approx(math.log(2), abs=1e-6)
    assert st["kl"] == pytest.approx(kl, abs=1e-6)
    assert st["entropy"] == pytest.approx(math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(math.log(2) + 0.05 * kl - 0.06 * math.log(2), abs=1e-6)


def test_quark_tiny_run(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Write about {w}." for w in ("cats", "rain", "bread", "maps", "tea")) + "\n")
    out = tmp_path / "quark"
    summary = safeft.train(None, **{
        "model.name_or_path": str(tiny_model_dir), "method.name": "quark", "data.train.path": str(prompts),
        "method.reward": "test-quark-length", "method.samples_per_round": 4, "method.train_steps": 2,
        "method.max_new_tokens": 5, "training.max_steps": 2, "training.per_device_train_batch_size": 4,
        "training.learning_rate": 1e-3, "output_dir": str(out), "model.lora.r": 4})
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["pool"] for r in rows] == [4, 8]
    assert all(r["kl"] >= 0 and r["nll"] > 0 for r in rows)
    assert json.loads((out / "model" / "quark.json").read_text())["control_prefix"] == control_prefix(5) == "<|reward_5|> "
    assert summary["pool"] == 8
    w = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k)
