"""Reliability: kill -9 and resume, Ctrl-C, broken checkpoints, atomic writes."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safeft.engine.run import atomic_write_text
from safeft.engine.trainer import checkpoint_problem, last_good_checkpoint

STEPS = 8  # 24 rows / batch 4 = 6 steps an epoch: the run crosses an epoch boundary


def _overrides(model_dir, data, out, **extra) -> dict:
    return {
        "model.name_or_path": str(model_dir), "model.lora.enabled": False,
        "data.train.path": str(data), "data.max_length": 64, "output_dir": str(out),
        "training.max_steps": STEPS, "training.per_device_train_batch_size": 4,
        "training.learning_rate": 1e-3, "training.save_strategy": "steps", "training.save_steps": 1,
        "training.save_total_limit": None, "training.disable_tqdm": True, **extra,
    }


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


KILLER = textwrap.dedent("""
    import os, signal, sys, json
    from transformers import TrainerCallback, set_seed
    from safeft.config import load_config
    from safeft.engine.run import build_run
    from safeft.engine.trainer import fit
    from safeft.methods import get_method_class

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no atexit: a real kill -9

    cfg = load_config(None, json.loads(sys.argv[1]))
    cls = get_method_class(cfg.method.name)
    set_seed(cfg.training.seed)
    run = build_run(cfg)
    fit(run, cls(cls.validate_params({}), run), callbacks=[Kill()])
""")


def test_kill9_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, chat_jsonl, caplog):
    """SIGKILL at a random step (before that step's checkpoint is written), then also truncate
    the newest surviving checkpoint (a kill during a save): resume falls back one more
    checkpoint, and the final loss curve and weights equal those of an uninterrupted run."""
    import safeft

    ref = tmp_path / "ref"
    safeft.train(**_overrides(tiny_model_dir, chat_jsonl, ref))

    kill_at = random.Random().randint(3, STEPS - 1)
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(_overrides(tiny_model_dir, chat_jsonl, out)),
                           str(kill_at)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])
    ckpts = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts[-1] == kill_at - 1 and not (out / "model").exists()
    # a kill in the middle of writing checkpoint kill_at-1: its weights are cut short
    w = out / "checkpoints" / f"checkpoint-{kill_at - 1}" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 99, "loss": ')  # and a record cut in half

    caplog.set_level(logging.WARNING, logger="safeft")
    summary = safeft.train(**_overrides(tiny_model_dir, chat_jsonl, out, resume=True))
    assert summary["resumed_from"].endswith(f"checkpoint-{kill_at - 2}"), kill_at
    assert summary["global_step"] == STEPS
    assert any(f"checkpoint-{kill_at - 1}" in r.message and "truncated" in r.message for r in caplog.records)
    assert (out / "checkpoints" / f"checkpoint-{kill_at - 1}").is_dir()  # re-saved, whole again
    assert checkpoint_problem(out / "checkpoints" / f"checkpoint-{kill_at - 1}") is None

    l_ref, l_res = _losses(ref), _losses(out)
    assert sorted(l_res) == list(range(1, STEPS + 1))  # every step logged exactly once
    for step in l_ref:
        assert l_res[step] == pytest.approx(l_ref[step], rel=1e-6, abs=1e-7), (kill_at, step)
    w_ref, w_res = _weights(ref), _weights(out)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max((w_ref[k] - base[k]).abs().max().item() for k in base) > 1e-3  # training moved them
    for k in w_ref:
        assert torch.allclose(w_ref[k], w_res[k], atol=1e-6), (kill_at, k)


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, tiny_model_dir, chat_jsonl):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "safeft", "train", "--model", str(tiny_model_dir), "--full",
           "--data", str(chat_jsonl), "--max-length", "64", "--max-steps", "400", "-o", str(out),
           "--set", "training.save_strategy=no", "--set", "training.disable_tqdm=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "safeft: interrupted"
    assert "Traceback" not in err
    assert "saving a checkpoint after this step" in err and "continue with --resume" in err
    ckpts = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and checkpoint_problem(ckpts[0]) is None
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert 2 <= state["global_step"] < 400
    assert state["global_step"] == max(_losses(out))  # the checkpoint is the last step it logged
    assert not (out / "model").exists()  # no final model that would look like a finished run
    assert not (out / "train_summary.json").exists()


def _checkpoint(d: Path, step: int) -> Path:
    c = d / f"checkpoint-{step}"
    c.mkdir(parents=True)
    (c / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.ones(64, 64)}, str(c / "model.safetensors"))
    torch.save({"state": {}}, c / "optimizer.pt")
    return c


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]), "truncated"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 3), "truncated"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json}" * 2), "unreadable"),
        (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
        (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is unreadable"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "does not match"),
        (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:50]), "optimizer.pt is truncated"),
    ],
    ids=["cut-weights", "tiny-weights", "garbage-weights", "no-weights", "no-state", "cut-state",
         "wrong-step", "cut-optimizer"],
)
def test_broken_checkpoint_is_detected_and_the_previous_one_used(tmp_path, caplog, damage, reason):
    good, bad = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4)
    assert checkpoint_problem(good) is None and checkpoint_problem(bad) is None
    damage(bad)
    assert reason in checkpoint_problem(bad)
    caplog.set_level(logging.WARNING, logger="safeft")
    assert last_good_checkpoint(tmp_path) == str(good)
    assert any("checkpoint-4" in r.message and reason in r.message for r in caplog.records)
    assert not bad.exists() and (tmp_path / "broken-checkpoint-4").is_dir()  # out of the rotation


def test_no_checkpoint_at_all(tmp_path):
    assert last_good_checkpoint(tmp_path / "missing") is None
    _checkpoint(tmp_path, 1)
    (tmp_path / "checkpoint-1" / "trainer_state.json").unlink()
    assert last_good_checkpoint(tmp_path) is None


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "train_summary.json"
    atomic_write_text(p, "old")
    assert p.read_text() == "old" and oct(p.stat().st_mode & 0o777) != oct(0o600)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["train_summary.json"]  # no temp file left


def test_save_model_is_atomic(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from safeft.models import load_model, save_model

    model, _ = load_model(str(tiny_model_dir), for_training=False)
    out = tmp_path / "model"
    save_model(model, tokenizer, out)
    before = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in before and not any(n.endswith((".bin", ".pt")) for n in before)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError):
        save_model(model, tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == before  # the previous model, untouched
