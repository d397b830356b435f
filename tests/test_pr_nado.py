"""pr-nado (sequential, parallel, adaptive) and the filter baseline, end to end on tiny models;
one integration run on the real SmolLM2."""

from __future__ import annotations

import json

import pytest

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
    assert summary["filter"] == {"threshold": 0.5, "examples": 10, "kept": 6, "dropped": 4}
    with pytest.raises(Exception, match="flags all 10 training examples"):
        _train(tmp_path / "g", tiny_model_dir, mixed_jsonl, {"name": "filter", "threshold": 0.0}, steps=1)


@pytest.mark.integration
def test_pr_nado_on_smollm2(tmp_path, smollm2_dir, mixed_jsonl):
    method = {"name": "pr-nado", "rounds": 1, "samples_per_round": 6, "max_new_tokens": 12, "r_epochs": 3}
    summary = _train(tmp_path / "s", smollm2_dir, mixed_jsonl, method, steps=2, batch=2)
    r = summary["rounds"]["r_rounds"][0]
    assert r["samples"] == 6 and r["bce_last_epoch"] < r["bce_first_epoch"]
    assert summary["global_step"] == 2
    assert (tmp_path / "s" / "nado" / "constraint.json").is_file()
