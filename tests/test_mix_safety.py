"""Safety-data mixing (Bianchi et al. 2024): how many examples, from where, seeded, trained on."""

from __future__ import annotations

import json

import pytest

from safeft.api import train
from safeft.cli import main
from safeft.config import load_config
from safeft.engine.run import build_run
from safeft.methods import get_method_class
from safeft.methods.mix_safety import DEFAULT_FRACTION, MixSafety
from safeft.config import LoraConfig
from safeft.models import add_lora, tiny_llama


def _domain(tmp_path, n=100):
    p = tmp_path / "domain.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}."}) + "\n"
                         for i in range(n)))
    return p


def _safety(tmp_path, n=20):
    p = tmp_path / "safety.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"How do I build weapon {i}?", "response": "I'm sorry, but I can't help with that."}) + "\n"
                         for i in range(n)))
    return p


def _mixed(tokenizer, tmp_path, out="run", **method):
    cfg = load_config(None, {"method.name": "mix-safety", "data.train.path": str(_domain(tmp_path)),
                             "data.max_length": 48, "output_dir": str(tmp_path / out),
                             **{f"method.{k}": v for k, v in method.items()}})
    run = build_run(cfg, model=tiny_llama(vocab_size=len(tokenizer)), tokenizer=tokenizer)
    m = MixSafety(MixSafety.validate_params(cfg.method.params()), run)
    return m, m.mix()


def test_default_fraction_is_the_papers_few_percent():
    assert DEFAULT_FRACTION == 0.03 and get_method_class("mix-safety").Params().fraction == 0.03


def test_adds_fraction_of_user_file_seeded(tokenizer, tmp_path):
    src = str(_safety(tmp_path))
    m, report = _mixed(tokenizer, tmp_path, fraction=0.05, source=src, seed=3)
    ds = m.run.train_dataset
    assert report["domain_examples"] == 100 and report["safety_examples"] == 5 and len(ds) == 105
    assert sorted(ds["idx"]) == list(range(105))  # stable, unique indices (the reference cache keys)
    added = [tokenizer.decode([t for t in ex["labels"] if t != -100]) for ex in ds.select(range(100, 105))]
    assert all("I'm sorry, but I can't help with that." in a for a in added)
    # the same seed picks the same examples; another seed others
    _, again = _mixed(tokenizer, tmp_path, out="run2", fraction=0.05, source=src, seed=3)
    _, other = _mixed(tokenizer, tmp_path, out="run3", fraction=0.05, source=src, seed=4)
    assert again["safety_prompts"] == report["safety_prompts"]
    assert other["safety_prompts"] != report["safety_prompts"]
    assert len(set(report["safety_prompts"])) == 5  # without replacement


def test_recipe_refusal_set_from_data_dir(tokenizer, tmp_path, shared_data):
    from safeft.data.safety import harmful_prompts

    cfg_dir = {"data.data_dir": str(shared_data)}
    cfg = load_config(None, {"method.name": "mix-safety", "data.train.path": str(_domain(tmp_path)),
                             "data.max_length": 64, "output_dir": str(tmp_path / "r"), **cfg_dir})
    run = build_run(cfg, model=tiny_llama(vocab_size=len(tokenizer)), tokenizer=tokenizer)
    report = MixSafety(MixSafety.Params(), run).mix()
    assert report["safety_examples"] == 3  # round(0.03 · 100)
    train_prompts = {r["prompt"] for r in harmful_prompts(shared_data, "train")}
    eval_prompts = {r["prompt"] for r in harmful_prompts(shared_data, "eval")}
    assert set(report["safety_prompts"]) <= train_prompts  # never the held-out eval split
    assert not set(report["safety_prompts"]) & eval_prompts


def test_fraction_out_of_range_rejected(capsys):
    rc = main(["train", "--method", "mix-safety", "--set", "method.fraction=1.5", "--data", "x.jsonl"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "method.fraction" in err


def test_trains_on_the_mixture(tokenizer, tmp_path):
    src = str(_safety(tmp_path))
    model = add_lora(tiny_llama(vocab_size=len(tokenizer)), LoraConfig(r=4, alpha=8))
    summary = train(None, model=model, tokenizer=tokenizer, **{
        "method.name": "mix-safety", "method.fraction": 0.1, "method.source": src,
        "data.train.path": str(_domain(tmp_path, 30)), "data.max_length": 48, "training.num_train_epochs": 1,
        "training.per_device_train_batch_size": 11, "training.save_strategy": "no", "training.disable_tqdm": True,
        "output_dir": str(tmp_path / "t")})
    assert summary["mix"]["safety_examples"] == 3 and summary["mix"]["domain_examples"] == 30
    assert summary["global_step"] == 3  # 33 examples / batch 11: the added ones were trained on
    report = json.loads((tmp_path / "t" / "mix_report.json").read_text())
    assert report["safety_idx"] == [30, 31, 32]


def test_not_enough_source_rows(tokenizer, tmp_path):
    from safeft.errors import DataError

    with pytest.raises(DataError, match="method.fraction"):
        _mixed(tokenizer, tmp_path, fraction=0.5, source=str(_safety(tmp_path, 3)))
