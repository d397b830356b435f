"""Resume and mixed precision for the RL methods: ra-rlhf killed with SIGKILL (and a broken
newest checkpoint) resumes to the uninterrupted run's rewards, losses and weights; quark and
grpo stopped by Ctrl-C save, stop and resume exactly; rlhf under bf16 autocast computes its
old and new log-probs with the same arithmetic (ratio 1 before the first update)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safeft
from safeft.engine.loop_checkpoints import loop_checkpoint_problem
from safeft.engine.trainer import checkpoint_problem
from safeft.errors import ConfigError

# A reward (length of the response / 10) that sends itself a signal at its ``at``-th call,
# i.e. during iteration ``at`` (one call per iteration / round / GRPO generation). Executed here
# for the in-process runs and at the top of the killed subprocess.
REWARD = """
import os, signal, torch
from safeft.rl.rewards import register_reward

@register_reward("test-signal-at")
def _signal_at(at: int = 0, sig: str = "SIGINT"):
    calls = []

    def score(prompts, responses):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), getattr(signal, sig))
        return torch.tensor([len(r) / 10 for r in responses])

    return score
"""
exec(REWARD)

# As tests/test_reliability.py. The killed subprocess runs with 1 thread and the reference with
# 2, so their float32 sums differ in order (measured: 1.4e-6 relative on a pg_loss of 6.5e-3);
# the in-process quark and grpo runs are bit-identical (checked with both tolerances at 0).
TOL = {"rel": 1e-6, "abs": 1e-7}


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"Tell me about topic {i}." for i in range(8)) + "\n")
    return p


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _same_records(ref: list[dict], res: list[dict], keys: tuple[str, ...]):
    assert [r["step"] for r in res] == [r["step"] for r in ref]  # every step logged exactly once
    for a, b in zip(ref, res):
        for k in keys:
            assert b[k] == pytest.approx(a[k], **TOL), (a["step"], k)


def _same_weights(ref: Path, res: Path):
    a, b = load_file(str(ref)), load_file(str(res))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


RLHF_STEPS = 6
KILLED = REWARD + """
import json, sys
import safeft
safeft.train(None, **json.loads(sys.argv[1]))
"""


def _ra_rlhf(tmp_path, tiny_model_dir, out, **extra) -> dict:
    return {"model.name_or_path": str(tiny_model_dir), "method.name": "ra-rlhf",
            "data.train.path": str(_prompts(tmp_path)), "method.batch_size": 4, "method.mini_batch_size": 2,
            "method.ppo_epochs": 2, "method.max_new_tokens": 5, "method.reward": "test-signal-at",
            "method.n_warmup": 1, "method.alpha": 0.5, "method.rho": 0.7, "method.target_kl": 0.01,
            "training.max_steps": RLHF_STEPS, "training.learning_rate": 1e-2, "model.lora.r": 4,
            "training.save_strategy": "steps", "training.save_steps": 1, "training.save_total_limit": 2,
            "output_dir": str(out), **extra}


@pytest.fixture
def one_thread():
    """The killed run's subprocess computes on one thread (OMP_NUM_THREADS=1); the reference and
    the resumed run here do too, so all three sum in the same order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ra_rlhf_kill9_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, caplog, one_thread):
    """SIGKILL during iteration k (checkpoints k-2 and k-1 on disk, older ones rotated away),
    then truncate checkpoint k-1 (a kill during its save): resume falls back to k-2, and the
    logged rewards, KL coefficients, losses and the final adapter and value head equal those
    of an uninterrupted run."""
    ref = tmp_path / "ref"
    safeft.train(None, **_ra_rlhf(tmp_path, tiny_model_dir, ref))

    kill_at = random.Random().randint(3, RLHF_STEPS - 1)
    out = tmp_path / "killed"
    opts = _ra_rlhf(tmp_path, tiny_model_dir, out, **{"method.reward_options": {"at": kill_at, "sig": "SIGKILL"}})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", KILLED, json.dumps(opts)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])
    ckpts = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == [kill_at - 2, kill_at - 1] and not (out / "model").exists()  # save_total_limit 2
    w = out / "checkpoints" / f"checkpoint-{kill_at - 1}" / "policy.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 99, "reward_mean": ')  # and a record cut in half

    caplog.set_level(logging.WARNING, logger="safeft")
    summary = safeft.train(None, **_ra_rlhf(tmp_path, tiny_model_dir, out, resume=True))
    assert summary["resumed_from"].endswith(f"checkpoint-{kill_at - 2}"), kill_at
    assert summary["global_step"] == RLHF_STEPS
    assert any(f"checkpoint-{kill_at - 1}" in r.message and "truncated" in r.message for r in caplog.records)
    last = out / "checkpoints" / f"checkpoint-{RLHF_STEPS}"
    assert checkpoint_problem(last) is None and loop_checkpoint_problem(last) is None

    rows_ref, rows = _records(ref), _records(out)
    assert [r["kept"] for r in rows] == [4, 4, 3, 3, 2, 2]  # the CVaR schedule went on where it stopped
    _same_records(rows_ref, rows, ("reward_mean", "reward_kept_mean", "kl", "kl_coef", "pg_loss", "vf_loss",
                                   "approx_kl", "response_len"))
    assert len({r["kl_coef"] for r in rows}) == RLHF_STEPS  # the adaptive coefficient moved every iteration
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        _same_weights(ref / "model" / name, out / "model" / name)
    assert summary["final_kl_coef"] == pytest.approx(json.loads((ref / "train_summary.json").read_text())["final_kl_coef"],
                                                     **TOL)


def _quark(tmp_path, tiny_model_dir, out, **extra) -> dict:
    return {"model.name_or_path": str(tiny_model_dir), "method.name": "quark", "data.train.path": str(_prompts(tmp_path)),
            "method.reward": "test-signal-at", "method.samples_per_round": 3, "method.train_steps": 2,
            "method.max_new_tokens": 5, "training.max_steps": 3, "training.per_device_train_batch_size": 3,
            "training.learning_rate": 1e-3, "model.lora.enabled": False, "training.save_strategy": "no",
            "output_dir": str(out), **extra}


def test_quark_ctrl_c_saves_then_resumes_exactly(tmp_path, tiny_model_dir):
    """Full fine-tuning (the reference is a frozen copy). Ctrl-C during round 2 with
    save_strategy no: round 2 finishes, checkpoint-2 (weights, optimizer, pool, draw state) is
    written and training stops without a final model; resuming gives the uninterrupted run."""
    ref = tmp_path / "ref"
    safeft.train(None, **_quark(tmp_path, tiny_model_dir, ref))

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        safeft.train(None, **_quark(tmp_path, tiny_model_dir, out, **{"method.reward_options": {"at": 2}}))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (out / "model").exists() and not (out / "train_summary.json").exists()
    assert [r["step"] for r in _records(out)] == [1, 2]

    summary = safeft.train(None, **_quark(tmp_path, tiny_model_dir, out, resume=True))
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["pool"] == 9
    _same_records(_records(ref), _records(out), ("reward_mean", "pool", "nll", "kl", "entropy"))
    _same_weights(ref / "model" / "model.safetensors", out / "model" / "model.safetensors")


def _grpo(tmp_path, tiny_model_dir, out, **extra) -> dict:
    return {"model.name_or_path": str(tiny_model_dir), "method.name": "grpo", "data.train.path": str(_prompts(tmp_path)),
            "method.reward": "test-signal-at", "method.num_generations": 2, "method.max_new_tokens": 6,
            "training.per_device_train_batch_size": 4, "training.max_steps": 3, "training.learning_rate": 1e-2,
            "training.save_strategy": "no", "model.lora.r": 4, "output_dir": str(out), **extra}


def test_grpo_ctrl_c_saves_then_resumes_exactly(tmp_path, tiny_model_dir):
    """TRL's GRPOTrainer under safeft's resume: Ctrl-C during step 2 saves checkpoint-2 (the
    Trainer's, with its RNG states) and stops; resuming continues the data order and sampling
    streams, so rewards, losses and the final adapter equal the uninterrupted run's."""
    ref = tmp_path / "ref"
    safeft.train(None, **_grpo(tmp_path, tiny_model_dir, ref))

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        safeft.train(None, **_grpo(tmp_path, tiny_model_dir, out, **{"method.reward_options": {"at": 2}}))
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (out / "model").exists()

    summary = safeft.train(None, **_grpo(tmp_path, tiny_model_dir, out, resume=True))
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    steps = [r for r in _records(out) if "loss" in r]
    _same_records([r for r in _records(ref) if "loss" in r], steps, ("loss", "reward", "reward_std"))
    _same_weights(ref / "model" / "adapter_model.safetensors", out / "model" / "adapter_model.safetensors")


def test_rlhf_bf16_autocast_gives_ratio_one(tmp_path, tiny_model_dir, monkeypatch):
    """mixed_precision bf16 from an accelerate config: the forward passes really run in bf16
    (a hook on an MLP sees bf16 outputs, in generation and in the update) and the rollout's
    log-probs equal the update's before the first step (ratio 1), the arithmetic being the same."""
    from safeft.config import LoraConfig, ModelConfig
    from safeft.models import load_model

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4)))
    seen = []
    mlp = model.get_base_model().model.layers[0].mlp
    mlp.register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    out = tmp_path / "bf16"
    safeft.train(None, model=model, tokenizer=tok, **{
        "method.name": "rlhf", "data.train.path": str(_prompts(tmp_path)), "method.batch_size": 4,
        "method.mini_batch_size": 4, "method.ppo_epochs": 2, "method.max_new_tokens": 5,
        "method.reward": "test-signal-at", "training.max_steps": 2, "training.learning_rate": 1e-2,
        "training.save_strategy": "no", "output_dir": str(out)})
    rows = _records(out)
    assert {d for _, d in seen} == {torch.bfloat16}
    assert any(g for g, _ in seen) and any(not g for g, _ in seen)  # the update and the no-grad passes
    for r in rows:  # mini-batch = batch: the first PPO epoch is one mini-batch, before any update
        assert r["ratio_first"] == pytest.approx(1.0, abs=1e-6) and r["ratio_first_max_dev"] < 1e-5, r
    assert rows[0]["kl"] == 0.0  # the policy starts as its reference (LoRA B = 0), bit for bit
    assert rows[1]["approx_kl"] > 0  # and it did train


def test_fp16_on_cpu_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("fp16 autocast runs on a GPU")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a GPU") as e:
        safeft.train(None, **{"model.name_or_path": str(tiny_model_dir), "method.name": "rlhf",
                              "data.train.path": str(_prompts(tmp_path)), "training.max_steps": 1,
                              "output_dir": str(tmp_path / "fp16")})
    assert "\n" not in str(e.value) and str(e.value).startswith("--accelerate-config:")
