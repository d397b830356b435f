"""Config: one validated schema, overrides, and one-line errors that name field, value and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from safeft.config import RunConfig, dump_config, load_config, parse_override
from safeft.errors import ConfigError


def _yaml(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults():
    cfg = RunConfig()
    assert cfg.model.name_or_path == "embedded:smollm2" and cfg.model.lora.enabled and cfg.model.lora.r == 16
    assert cfg.method.name == "sft" and cfg.training.learning_rate == 2e-4 and cfg.training.seed == 42


def test_precedence_yaml_then_overrides_then_sets(tmp_path):
    p = _yaml(tmp_path, "training: {learning_rate: 0.001, seed: 1}\nmethod: {name: kl-decay, gamma: 0.5}\n")
    cfg = load_config(p, {"training.learning_rate": 0.002}, ["training.learning_rate=0.003", "method.lam=2"])
    assert cfg.training.learning_rate == 0.003 and cfg.training.seed == 1
    assert cfg.method.name == "kl-decay" and cfg.method.params() == {"gamma": 0.5, "lam": 2}


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, {"method.name": "kl-decay", "method.gamma": 0.7, "data.train.path": "d.jsonl"})
    again = load_config(_yaml(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert yaml.safe_load(dump_config(cfg))["method"] == {"name": "kl-decay", "gamma": 0.7}


def _err(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_field():
    assert "training.learning_rat: unknown field (got 0.1)" in _err(overrides={"training.learning_rat": 0.1})
    assert "bogus: unknown field" in _err(overrides={"bogus": 1})


def test_wrong_type_names_field_and_value():
    msg = _err(overrides={"training.per_device_train_batch_size": "four"})
    assert "training.per_device_train_batch_size" in msg and "'four'" in msg and "integer" in msg
    msg = _err(overrides={"training.learning_rate": -1})
    assert "training.learning_rate" in msg and "greater than 0" in msg


def test_unknown_method_lists_registered():
    msg = _err(overrides={"method.name": "magic"})
    assert msg.startswith("method.name: unknown method 'magic'; registered:")
    for name in ("sft", "kl-decay", "constrained-sft", "mix-safety"):
        assert name in msg


def test_unknown_or_bad_method_option():
    msg = _err(overrides={"method.name": "kl-decay", "method.gama": 0.5})
    assert msg.startswith("method.gama: unknown option for method 'kl-decay'") and "gamma" in msg
    msg = _err(overrides={"method.name": "kl-decay", "method.gamma": 2})
    assert "method.gamma" in msg and "less than or equal to 1" in msg
    msg = _err(overrides={"method.name": "kl-decay", "method.reference": "copy"})
    assert "'live'" in msg and "'cached'" in msg


def test_unknown_scheduler_lists_allowed():
    msg = _err(overrides={"training.lr_scheduler_type": "wobbly"})
    assert "training.lr_scheduler_type" in msg and "cosine" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml:2: invalid YAML"):
        load_config(_yaml(tmp_path, "a: 1\nb: c: d\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_yaml(tmp_path, "- 1\n"))


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=hello") == ("a", "hello")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("novalue")
