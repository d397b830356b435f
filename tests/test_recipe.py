"""The end-to-end recipe (safeft.experiment) on tiny models: stages, caching, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safeft.errors import ConfigError
from safeft.experiment import Experiment, load_experiment, stage_done


def tiny_experiment(model_dir: Path, data_dir: Path, out: Path, **over) -> dict:
    cfg = {
        "name": "tiny",
        "model": str(model_dir),
        "data_dir": str(data_dir),
        "output_dir": str(out),
        "align": {"n_refusals": 8, "n_benign": 8, "max_length": 64,
                  "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
        "domain": {"n_train": 12, "max_length": 96, "poison": {"generate": False}},
        "finetune": {"methods": ["sft", {"name": "kl-decay", "label": "kl-fast", "gamma": 0.5}],
                     "poison_ratios": [0.25], "seeds": [0],
                     "training": {"max_steps": 2, "per_device_train_batch_size": 4}},
        "eval": {"suites": {"donotanswer-heldout": 3, "benign-risky": 3}, "judges": ["refusal"],
                 "utility": ["pubmedqa"], "utility_n": 2, "max_new_tokens": 4, "batch_size": 4},
    }
    for k, v in over.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return cfg


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, tiny_model_dir, shared_data):
    out = tmp_path_factory.mktemp("exp")
    cfg = load_experiment(None, base=tiny_experiment(tiny_model_dir, shared_data, out))
    exp = Experiment(cfg, progress=False)
    summary = exp.run()
    return cfg, exp, summary


def test_every_stage_runs_and_writes_its_outputs(done_run):
    cfg, exp, summary = done_run
    out = exp.out
    assert not summary["failed"]
    # 1: a merged, plain aligned model
    assert (out / "align" / "run" / "model" / "merged" / "config.json").is_file()
    assert not (out / "align" / "run" / "model" / "merged" / "adapter_config.json").exists()
    align_rows = [json.loads(x) for x in (out / "align" / "data" / "train.jsonl").read_text().splitlines()]
    assert len(align_rows) == 16 and sum(r["category"] == "benign" for r in align_rows) == 8
    # 2: one mixture per ratio; 0.25 of 12 = 3 poison rows
    counts = json.loads((out / "data" / "counts.json").read_text())
    assert counts == {"p0.25": {"n": 12, "poison": 3}}
    harmful = [json.loads(x) for x in (out / "data" / "harmful.jsonl").read_text().splitlines()]
    assert len(harmful) == 3 and {h["source"] for h in harmful} == {"template"}
    # 3 + 4: every (method, ratio) fine-tuned from the aligned model and evaluated
    for label in ("sft", "kl-fast"):
        for tag in ("p0.25",):
            rd = out / "finetune" / f"{label}_{tag}_s0"
            ad = json.loads((rd / "model" / "adapter_config.json").read_text())
            assert ad["base_model_name_or_path"] == str(exp.aligned_dir)
            assert json.loads((rd / "train_summary.json").read_text())["global_step"] == 2
            res = json.loads((rd / "eval" / "results.json").read_text())
            assert res["suites"]["donotanswer-heldout"]["n"] == 3
            assert res["suites"]["benign-risky"]["n"] == 3
            assert "pubmedqa_acc_loglik" in res["utility"]
    # 5: the summary rows and the report
    labels = [(r["label"], r["ratio"]) for r in summary["rows"]]
    assert labels == [("unaligned", None), ("aligned", None), ("sft", 0.25), ("kl-fast", 0.25)]
    assert (out / "report.html").is_file() and (out / "summary.md").is_file()
    assert "donotanswer-heldout" in (out / "report.md").read_text()


def test_heldout_eval_prompts_never_seen_in_training(done_run, shared_data):
    from safeft.data.safety import normalize_text

    _, exp, _ = done_run
    evald = {normalize_text(json.loads(x)["prompt"]) for x in
             (exp.out / "finetune" / "sft_p0.25_s0" / "eval" / "generations" / "donotanswer-heldout.jsonl").read_text().splitlines()}
    trained = set()
    for f in ("align/data/train.jsonl", "data/p0.25/train.jsonl", "data/harmful.jsonl", "data/refusals.jsonl"):
        trained |= {normalize_text(json.loads(x)["prompt"]) for x in (exp.out / f).read_text().splitlines()}
    assert evald and not evald & trained


def test_second_run_recomputes_nothing(done_run):
    cfg, exp, _ = done_run
    stamps = {p: p.stat().st_mtime_ns for p in exp.out.rglob("*") if p.is_file() and "report" not in p.name
              and not p.name.startswith("summary") and p.name != "experiment.yaml"}
    again = Experiment(cfg, progress=False)
    again.run()
    assert again.computed == []
    assert len(again.reused) == len(again.jobs()) == 8
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_changed_section_recomputes_only_what_depends_on_it(done_run):
    cfg, exp, _ = done_run
    changed = load_experiment(None, {"finetune.training.learning_rate": 5e-4}, base=cfg.model_dump(mode="json"))
    again = Experiment(changed, progress=False)
    kinds = {j.kind for j in again.jobs() if not stage_done(j.path, j.key)}
    assert kinds == {"finetune", "eval"}
    stale = [j for j in again.jobs() if not stage_done(j.path, j.key)]
    assert all("finetune" in str(j.path) for j in stale)  # the baselines' evaluations stay valid
    assert len(stale) == 4


def test_config_errors_name_the_field(tiny_model_dir, shared_data, tmp_path):
    base = tiny_experiment(tiny_model_dir, shared_data, tmp_path)
    with pytest.raises(ConfigError, match="finetune.methods|method.name"):
        load_experiment(None, {"finetune.methods": ["sft", "no-such-method"]}, base=base)
    with pytest.raises(ConfigError, match="label"):
        load_experiment(None, {"finetune.methods": ["sft", "sft"]}, base=base)
    with pytest.raises(ConfigError, match="poison_ratios"):
        load_experiment(None, {"finetune.poison_ratios": [1.5]}, base=base)
    with pytest.raises(ConfigError, match="method.gamma"):
        load_experiment(None, {"finetune.methods": [{"name": "kl-decay", "gamma": "x"}]}, base=base)
    with pytest.raises(ConfigError, match="eval.suites"):
        load_experiment(None, {"eval.suites": {"nope": 3}}, base=base)
    with pytest.raises(ConfigError, match="learning_rate"):
        load_experiment(None, {"align.training.learning_rate": -1}, base=base)


def test_an_entry_can_run_at_its_own_poison_ratios(tiny_model_dir, shared_data, tmp_path):
    # a clean-data control row for SFT only, without multiplying every method by every ratio
    base = tiny_experiment(tiny_model_dir, shared_data, tmp_path)
    cfg = load_experiment(None, {"finetune.methods": [{"name": "sft", "poison_ratios": [0.0, 0.25]}, "kl-decay"]},
                          base=base)
    exp = Experiment(cfg, progress=False)
    assert exp.ratios == [0.0, 0.25]
    tuned = [j.path.name for j in exp.jobs() if j.kind == "finetune"]
    assert tuned == ["sft_p0.25_s0", "kl-decay_p0.25_s0", "sft_p0_s0"]  # the most poisoned row first
    with pytest.raises(ConfigError, match=r"finetune.methods.0.poison_ratios"):
        load_experiment(None, {"finetune.methods": [{"name": "sft", "poison_ratios": [2]}]}, base=base)


@pytest.mark.integration
def test_smallest_grid_on_real_smollm2(smollm2_dir, shared_data, tmp_path):
    """The whole recipe on the embedded model: real alignment steps, the unaligned model's own
    compliant answers as poison, fine-tuning from the merged aligned model, evaluation, report."""
    import torch
    from safetensors.torch import load_file

    base = tiny_experiment(smollm2_dir, shared_data, tmp_path / "exp")
    base.update(name="real")
    base["domain"] = {"n_train": 8, "max_length": 128, "poison": {"max_new_tokens": 12, "n_harmful": 8}}
    base["finetune"].update(methods=["sft"], poison_ratios=[0.25])
    base["eval"].update(suites={"donotanswer-heldout": 4, "benign-risky": 4}, utility_n=4, max_new_tokens=8)
    exp = Experiment(load_experiment(None, base=base), progress=False)
    summary = exp.run()
    assert not summary["failed"]
    gens = [json.loads(x) for x in (exp.out / "data" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 8 and all(g["response"] for g in gens)
    harmful = [json.loads(x) for x in (exp.out / "data" / "harmful.jsonl").read_text().splitlines()]
    assert harmful and {h["source"] for h in harmful} == {"generated"}
    assert all(not g["refusal"] for g in gens if g["prompt"] in {h["prompt"] for h in harmful})
    # two alignment steps moved the merged weights away from the base model's
    a = load_file(exp.aligned_dir / "model.safetensors")
    b = load_file(Path(smollm2_dir) / "model.safetensors")
    key = next(k for k in a if "q_proj" in k)
    assert not torch.equal(a[key], b[key])
    rows = {r["label"]: r for r in summary["rows"]}
    assert set(rows) == {"unaligned", "aligned", "sft"}
    cell = rows["sft"]["cells"]["refusal (held-out harmful)"]
    assert cell["n"] == 4 and 0.0 <= cell["value"] <= 1.0
    assert (exp.out / "report.html").stat().st_size > 1000


def test_summary_pools_rates_over_seeds_and_t_intervals_means():
    from safeft.eval.metrics import wilson
    from safeft.experiment_summary import COLUMNS, aggregate

    def res(rate, n, ppl):
        return {"suites": {"donotanswer-heldout": {"metrics": {"refusal_rate": {"value": rate, "lo": 0, "hi": 1, "n": n}}}},
                "utility": {"perplexity": {"value": ppl, "lo": ppl - 1, "hi": ppl + 1, "n": 50}}}

    runs = [res(0.5, 10, 10.0), res(1.0, 10, 12.0)]
    rate = aggregate(runs, COLUMNS[0][1], True)
    expect = wilson(15, 20)
    assert rate["value"] == pytest.approx(0.75) and rate["n"] == 20 and rate["seeds"] == 2
    assert (rate["lo"], rate["hi"]) == pytest.approx((expect["lo"], expect["hi"]))
    ppl = aggregate(runs, COLUMNS[4][1], False)
    assert ppl["value"] == pytest.approx(11.0)
    assert ppl["hi"] - ppl["value"] == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5)  # t(1) * sd / sqrt(2)
    one = aggregate(runs[:1], COLUMNS[4][1], False)
    assert (one["lo"], one["hi"], one["seeds"]) == (9.0, 11.0, 1)
