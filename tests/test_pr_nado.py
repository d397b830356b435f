"""pr-nado (sequential, parallel, adaptive) and the filter baseline, end to end on tiny models;
one integration run on the real SmolLM2."""

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
from safetensors.torch import load_file

from safeft import api
from safeft.errors import ConfigError

TOXIC = ["you are a stupid fucking idiot", "shut up you worthless piece of shit", "what a dumb ass bitch",
         "go to hell you fucking moron"]
CLEAN = ["the patient was given aspirin after surgery", "the study measured blood pressure in adults",
         "cells were cultured for three days", "the trial enrolled two hundred participants",
         "results were consistent across both groups", "the protein binds to the receptor"]


@pytest.fixture
def mixed_jsonl(tmp_path):
    rows = [{"text": t, "source": "toxic"} for t in TOXIC] + [{"text": t, "source": "domain"} for t in CLEAN]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _train(out, model_dir, data, method: dict, steps: int, batch: int = 2, max_length: int = 32, **extra):
    overrides = {
        "model.name_or_path": str(model_dir), "data.train.path": str(data), "data.max_length": max_length,
        "training.max_steps": steps, "training.per_device_train_batch_size": batch, "training.save_strategy": "no",
        "training.disable_tqdm": True, "training.learning_rate": 1e-3, "output_dir": str(out), **extra,
    }
    overrides.update({f"method.{k}": v for k, v in method.items()})
    return api.train(None, **overrides)


SMALL_R = {"samples_per_round": 4, "max_new_tokens": 6, "r_epochs": 2, "r_inner": 16, "top_k": 8}


def _overlaps(a, b):
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_sequential_rounds_train_r_then_theta(tmp_path, tiny_model_dir, mixed_jsonl):
    method = {"name": "pr-nado", "rounds": 2, **SMALL_R, "r_epochs": 5, "r_lr": 0.05}
    summary = _train(tmp_path / "seq", tiny_model_dir, mixed_jsonl, method, steps=4)
    log = summary["rounds"]
    assert log["schedule"] == "sequential"
    assert [r["round"] for r in log["r_rounds"]] == [1, 2]
    assert [t["r_used"] for t in log["theta_rounds"]] == [1, 2]  # round r fine-tunes with R_r
    for r, t in zip(log["r_rounds"], log["theta_rounds"]):
        assert r["end"] <= t["start"]  # strictly one after the other
        assert r["pid"] == log["main_pid"] and r["samples"] == 4 and r["tokens"] > 0
    out = tmp_path / "seq"
    assert (out / "nado" / "constraint.safetensors").is_file() and (out / "model").is_dir()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kls = [r["pr_kl"] for r in recs if "pr_kl" in r]
    assert len(kls) == 4 and min(kls) > -1e-6 and max(kls) > 1e-6  # a trained, non-constant R regularizes


def test_parallel_workers_overlap_and_use_previous_round_r(tmp_path, tiny_model_dir, mixed_jsonl):
    method = {"name": "pr-nado", "rounds": 3, "parallel": True, "parallel_warmup": True, **SMALL_R}
    summary = _train(tmp_path / "par", tiny_model_dir, mixed_jsonl, method, steps=9, batch=2)
    log = summary["rounds"]
    assert log["schedule"] == "parallel"
    r_by_round = {r["round"]: r for r in log["r_rounds"]}
    assert sorted(r_by_round) == [0, 1, 2, 3]
    assert all(r["pid"] != log["main_pid"] for r in log["r_rounds"])  # a separate OS process
    thetas = log["theta_rounds"]
    assert [t["r_used"] for t in thetas] == [0, 1, 2]  # θ's round r uses R_{r−1}
    for t in thetas:
        r = t["round"]
        # R_r (from θ_{r−1}'s samples) is produced while θ_r trains; it is finished only after θ_r began
        assert r_by_round[r]["end"] > t["start"]
        assert r_by_round[t["r_used"]]["end"] <= t["start"]  # the R θ_r uses was ready before θ_r began
    assert any(_overlaps(t, r_by_round[t["round"]]) for t in thetas)
    assert (tmp_path / "par" / "nado" / "constraint.safetensors").is_file()
    assert not list((tmp_path / "par" / "nado").glob("theta_*.safetensors"))  # snapshots cleaned up


# --- kill -9 and resume ---------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from transformers import TrainerCallback
    import safeft
    import safeft.engine.trainer as T

    class Kill(TrainerCallback):
        # runs after pr-nado's callback: at a round boundary the kill lands after that round's
        # R update was made (and, sequential, R trained), before θ's next step
        def __init__(self, method):
            self.method = method

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[2]):
                if self.method._proc is not None:
                    open(sys.argv[3], "w").write(str(self.method._proc.pid))
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no atexit: a real kill -9

    fit = T.fit
    T.fit = lambda run, method, callbacks=(): fit(run, method, [*callbacks, Kill(method)])
    safeft.train(**json.loads(sys.argv[1]))
""")

RESUME_STEPS = 6


def _resume_overrides(model_dir, data, out, method: dict, **extra) -> dict:
    o = {"model.name_or_path": str(model_dir), "data.train.path": str(data), "data.max_length": 32,
         "training.max_steps": RESUME_STEPS, "training.per_device_train_batch_size": 2,
         "training.learning_rate": 1e-3, "training.save_strategy": "steps", "training.save_steps": 1,
         "training.save_total_limit": None, "training.disable_tqdm": True, "output_dir": str(out), **extra}
    o.update({f"method.{k}": v for k, v in method.items()})
    return o


def _kill(overrides: dict, kill_at: int, pid_file: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(overrides), str(kill_at), str(pid_file)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _metrics(out: Path) -> dict[int, dict]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


NOT_TIMES = ("start", "end", "pid")


def _assert_same_run(ref: Path, out: Path, kill_at: int) -> None:
    """Every logged step once, the same losses and method metrics, the same final θ, R and
    per-round R statistics as the uninterrupted run (rel 1e-6: in practice bit-identical)."""
    m_ref, m_res = _metrics(ref), _metrics(out)
    assert sorted(m_res) == list(range(1, RESUME_STEPS + 1)), kill_at  # every step logged exactly once
    for step, rec in m_ref.items():
        for key in ("loss", "ce", "pr_kl", "r_round", "grad_norm"):
            if key in rec:
                assert m_res[step][key] == pytest.approx(rec[key], rel=1e-6, abs=1e-7), (kill_at, step, key)
    for folder in ("model", "nado"):
        t_ref, t_res = _tensors(ref / folder), _tensors(out / folder)
        assert t_ref and sorted(t_ref) == sorted(t_res)
        for k in t_ref:
            assert torch.allclose(t_ref[k], t_res[k], rtol=0, atol=1e-6), (kill_at, folder, k)
    l_ref, l_res = (json.loads((d / "nado" / "rounds.json").read_text()) for d in (ref, out))
    strip = lambda rounds: [{k: v for k, v in r.items() if k not in NOT_TIMES} for r in rounds]  # noqa: E731
    r_ref, r_res = strip(l_ref["r_rounds"]), strip(l_res["r_rounds"])
    assert len(r_res) == len(r_ref), kill_at
    for got, want in zip(r_res, r_ref):  # approx takes one flat dict at a time (pytest ≥ 9.2)
        assert got == pytest.approx(want, rel=1e-6), (kill_at, want["round"])
    assert strip(l_res["theta_rounds"]) == strip(l_ref["theta_rounds"])
    assert all("end" in t for t in l_res["theta_rounds"])


def test_sequential_kill9_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, mixed_jsonl, caplog):
    """SIGKILL at a random step (at a round boundary: right after that round's R was trained),
    then truncate R's weights in the newest surviving checkpoint: resume falls back one more
    checkpoint, and losses, θ and R equal those of an uninterrupted run."""
    method = {"name": "pr-nado", "rounds": 3, **SMALL_R, "r_epochs": 5, "r_lr": 0.05}
    ref = tmp_path / "ref"
    api.train(None, **_resume_overrides(tiny_model_dir, mixed_jsonl, ref, method))

    kill_at = random.Random().randint(2, RESUME_STEPS - 1)
    out = tmp_path / "killed"
    _kill(_resume_overrides(tiny_model_dir, mixed_jsonl, out, method), kill_at, tmp_path / "pid")
    ckpts = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts[-1] == kill_at and not (out / "model").exists()
    r_file = out / "checkpoints" / f"checkpoint-{kill_at}" / "nado" / "constraint.safetensors"
    r_file.write_bytes(r_file.read_bytes()[: r_file.stat().st_size // 2])  # a kill in the middle of writing R

    caplog.set_level(logging.WARNING, logger="safeft")
    summary = api.train(None, **_resume_overrides(tiny_model_dir, mixed_jsonl, out, method, resume=True))
    assert summary["resumed_from"].endswith(f"checkpoint-{kill_at - 1}"), kill_at
    assert any(f"checkpoint-{kill_at}" in r.message and "nado/constraint.safetensors is truncated" in r.message
               for r in caplog.records)
    log = summary["rounds"]
    assert log["resumes"][0]["from"] == f"checkpoint-{kill_at - 1}" and log["main_pid"] == os.getpid()
    assert [r["round"] for r in log["r_rounds"]] == [1, 2, 3]
    _assert_same_run(ref, out, kill_at)


def test_parallel_kill9_then_resume_restarts_the_worker_and_matches(tmp_path, tiny_model_dir, mixed_jsonl, caplog):
    """The parallel schedule is deterministic (θ's round r always waits for R_{r−1}), so a
    resumed run ends exactly like an uninterrupted one: the restarted worker redoes the R round
    that was in flight from the checkpoint's θ snapshot, warm-started from the checkpoint's R.
    The killed run's orphaned worker exits by itself."""
    method = {"name": "pr-nado", "rounds": 3, "parallel": True, "parallel_warmup": True, **SMALL_R,
              "r_epochs": 5, "r_lr": 0.05}
    ref = tmp_path / "ref"
    api.train(None, **_resume_overrides(tiny_model_dir, mixed_jsonl, ref, method))

    kill_at = random.Random().randint(2, RESUME_STEPS - 1)
    out = tmp_path / "killed"
    _kill(_resume_overrides(tiny_model_dir, mixed_jsonl, out, method), kill_at, tmp_path / "pid")
    worker = int((tmp_path / "pid").read_text())
    deadline = time.time() + 30
    while not _gone(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert _gone(worker), "the R worker outlived the killed training process"
    # the θ snapshot of the newest checkpoint cut short, as a copy interrupted by a kill would be
    # (it is a hard link shared with other checkpoints of the round: replace it, do not truncate it in place)
    snap = out / "checkpoints" / f"checkpoint-{kill_at}" / "nado" / "theta.safetensors"
    data = snap.read_bytes()
    snap.unlink()
    snap.write_bytes(data[: len(data) // 2])

    caplog.set_level(logging.WARNING, logger="safeft")
    summary = api.train(None, **_resume_overrides(tiny_model_dir, mixed_jsonl, out, method, resume=True))
    assert summary["resumed_from"].endswith(f"checkpoint-{kill_at - 1}"), kill_at
    assert any(f"checkpoint-{kill_at}" in r.message and "nado/theta.safetensors is truncated" in r.message
               for r in caplog.records)
    log = summary["rounds"]
    assert [t["r_used"] for t in log["theta_rounds"]] == [0, 1, 2]
    assert sorted(r["round"] for r in log["r_rounds"]) == [0, 1, 2, 3]
    # the rounds received after the resume came from the new worker
    resumed_at = log["resumes"][0]["time"]
    assert all(r["pid"] != worker for r in log["r_rounds"] if r["end"] > resumed_at)
    assert not list((out / "nado").glob("theta_*.safetensors"))
    _assert_same_run(ref, out, kill_at)


def test_ctrl_c_stops_a_parallel_run_with_a_checkpoint_and_resume_finishes_it(tmp_path, tiny_model_dir, mixed_jsonl):
    """Ctrl-C from a terminal reaches the training process and the R worker: the worker
    ignores it, the training process saves a checkpoint (with pr-nado's state), stops the
    worker and exits 130; --resume finishes the run."""
    method = {"name": "pr-nado", "rounds": 3, "parallel": True, **SMALL_R}
    out = tmp_path / "run"
    overrides = _resume_overrides(tiny_model_dir, mixed_jsonl, out, method, **{"training.max_steps": 30,
                                                                              "training.save_strategy": "no"})
    del overrides["training.save_total_limit"]
    cmd = [sys.executable, "-m", "safeft", "train", *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}"))]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "safeft: interrupted" and "Traceback" not in err
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the worker is gone too
    from safeft.engine.trainer import checkpoint_problem
    from safeft.methods.pr_nado import PRNado

    (ckpt,) = (out / "checkpoints").glob("checkpoint-*")
    assert checkpoint_problem(ckpt) is None
    assert PRNado.checkpoint_problem(ckpt) is None
    assert not (out / "model").exists() and not (out / "nado" / "constraint.safetensors").exists()

    summary = api.train(None, **overrides, resume=True)
    assert summary["global_step"] == 30 and summary["resumed_from"] == str(ckpt)
    assert [t["r_used"] for t in summary["rounds"]["theta_rounds"]] == [0, 1, 2]
    assert (out / "nado" / "constraint.safetensors").is_file()


def test_resume_with_another_schedule_is_a_config_error(tmp_path, tiny_model_dir, mixed_jsonl):
    method = {"name": "pr-nado", "rounds": 2, **SMALL_R}
    out = tmp_path / "run"
    api.train(None, **_resume_overrides(tiny_model_dir, mixed_jsonl, out, method, **{"training.max_steps": 2}))
    method["rounds"] = 1
    with pytest.raises(ConfigError, match="rounds=2, this run has 1") as e:
        api.train(None, **_resume_overrides(tiny_model_dir, mixed_jsonl, out, method, resume=True,
                                            **{"training.max_steps": 2}))
    assert e.value.field == "method.rounds"


def test_adaptive_assignment_by_tag_and_by_judge(tmp_path, tiny_model_dir, mixed_jsonl):
    method = {"name": "pr-nado", "rounds": 1, "adaptive": True, "assign": "tag", **SMALL_R}
    summary = _train(tmp_path / "tag", tiny_model_dir, mixed_jsonl, method, steps=2, batch=10)
    assert summary["rounds"]["adaptive"] == {"assign": "tag", "constraint_examples": 4, "examples": 10}
    recs = [json.loads(x) for x in (tmp_path / "tag" / "metrics.jsonl").read_text().splitlines()]
    assert any("util_kl" in r for r in recs) and any("pr_kl" in r for r in recs)
    method["assign"] = "judge"
    summary = _train(tmp_path / "judge", tiny_model_dir, mixed_jsonl, method, steps=1, batch=10)
    assert summary["rounds"]["adaptive"]["constraint_examples"] == 4  # the profane lines score ≥ 0.5
    method.update(assign="tag", tag_field="origin")
    with pytest.raises(ConfigError, match="no column 'origin'"):
        _train(tmp_path / "bad", tiny_model_dir, mixed_jsonl, method, steps=1)


def test_bad_options_are_one_line_config_errors(tmp_path, tiny_model_dir, mixed_jsonl):
    with pytest.raises(ConfigError, match="method.top_k"):
        _train(tmp_path / "a", tiny_model_dir, mixed_jsonl, {"name": "pr-nado", "top_k": -1}, steps=1)
    with pytest.raises(ConfigError, match="3 rounds need at least 3 optimizer steps"):
        _train(tmp_path / "b", tiny_model_dir, mixed_jsonl, {"name": "pr-nado", "rounds": 3, **SMALL_R}, steps=2)


def test_filter_drops_the_toxic_rows(tmp_path, tiny_model_dir, mixed_jsonl):
    summary = _train(tmp_path / "f", tiny_model_dir, mixed_jsonl, {"name": "filter"}, steps=1)
    report = json.loads((tmp_path / "f" / "filter_report.json").read_text())
    assert report["dropped_idx"] == [0, 1, 2, 3] and report["kept"] == 6
    assert summary["filter"] == {"judge": "toxicity", "threshold": 0.5, "examples": 10, "kept": 6, "dropped": 4}
    with pytest.raises(Exception, match="flags all 10 training examples"):
        _train(tmp_path / "g", tiny_model_dir, mixed_jsonl, {"name": "filter", "threshold": 0.0}, steps=1)


def test_cli_parallel_flag_runs_the_parallel_schedule(tmp_path, tiny_model_dir, mixed_jsonl, capsys):
    from safeft.cli import main

    out = tmp_path / "cli-par"
    rc = main(["train", "--method", "pr-nado", "--parallel", "--model", str(tiny_model_dir), "--data", str(mixed_jsonl),
               "--max-steps", "2", "--batch-size", "2", "--max-length", "32", "-o", str(out),
               "--set", "method.rounds=2", "--set", "method.samples_per_round=4", "--set", "method.max_new_tokens=6",
               "--set", "method.r_epochs=1", "--set", "method.r_inner=16", "--set", "training.save_strategy=no"])
    assert rc == 0 and "trained pr-nado: 2 steps" in capsys.readouterr().out
    log = json.loads((out / "nado" / "rounds.json").read_text())
    assert log["schedule"] == "parallel"
    assert {r["pid"] for r in log["r_rounds"]} != {log["main_pid"]}  # R was trained in the worker process
    rc = main(["train", "--method", "sft", "--parallel", "--model", str(tiny_model_dir), "--data", str(mixed_jsonl),
               "-o", str(tmp_path / "sft")])
    assert rc == 2 and "method.parallel: unknown option for method 'sft'" in capsys.readouterr().err


@pytest.fixture
def constant_judge():
    """A judge that scores every text 0.25, registered for one test (the parallel worker, forked,
    inherits the registry)."""
    from safeft.eval.judges import JUDGES, Judge, Verdict, register_judge

    @register_judge("constant-quarter")
    class Quarter(Judge):
        scores = True

        def judge(self, prompts, responses):
            return [Verdict(False, 0.25, "quarter") for _ in responses]

    yield "constant-quarter"
    JUDGES.pop("constant-quarter")


@pytest.mark.parametrize("parallel", [False, True])
def test_r_labels_come_from_the_configured_judge(tmp_path, tiny_model_dir, mixed_jsonl, constant_judge, parallel):
    method = {"name": "pr-nado", "rounds": 2, "parallel": parallel, "parallel_warmup": parallel, **SMALL_R,
              "judge": constant_judge}
    summary = _train(tmp_path / "j", tiny_model_dir, mixed_jsonl, method, steps=2)
    rounds = summary["rounds"]["r_rounds"]
    assert len(rounds) == (3 if parallel else 2)
    assert all(abs(r["mean_toxicity"] - 0.25) < 1e-9 for r in rounds)  # every sample labelled C = 0.75
    default = _train(tmp_path / "d", tiny_model_dir, mixed_jsonl, {**method, "judge": "toxicity"}, steps=2)
    assert any(abs(r["mean_toxicity"] - 0.25) > 1e-3 for r in default["rounds"]["r_rounds"])


def test_adaptive_and_filter_use_the_configured_judge(tmp_path, tiny_model_dir, mixed_jsonl):
    # the refusal judge calls every non-empty text that does not refuse unsafe (score 1): all 10 rows
    method = {"name": "pr-nado", "rounds": 1, "adaptive": True, "assign": "judge", "judge": "refusal", **SMALL_R}
    summary = _train(tmp_path / "a", tiny_model_dir, mixed_jsonl, method, steps=1, batch=10)
    assert summary["rounds"]["adaptive"]["constraint_examples"] == 10
    with pytest.raises(Exception, match="the refusal judge flags all 10 training examples"):
        _train(tmp_path / "f", tiny_model_dir, mixed_jsonl, {"name": "filter", "judge": "refusal"}, steps=1)
    with pytest.raises(ConfigError, match="unknown judge 'nope'") as e:
        _train(tmp_path / "n", tiny_model_dir, mixed_jsonl, {"name": "filter", "judge": "nope"}, steps=1)
    assert e.value.field == "method.judge"


@pytest.mark.integration
def test_pr_nado_on_smollm2(tmp_path, smollm2_dir, mixed_jsonl):
    method = {"name": "pr-nado", "rounds": 1, "samples_per_round": 6, "max_new_tokens": 12, "r_epochs": 3}
    summary = _train(tmp_path / "s", smollm2_dir, mixed_jsonl, method, steps=2, batch=2)
    r = summary["rounds"]["r_rounds"][0]
    assert r["samples"] == 6 and r["bce_last_epoch"] < r["bce_first_epoch"]
    assert summary["global_step"] == 2
    assert (tmp_path / "s" / "nado" / "constraint.json").is_file()
