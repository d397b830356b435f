"""Bad input, tried systematically (hypothesis): configs, overrides and data files.

Every case must end in a :class:`SafeftError` (one line, naming the field, or the file and
line/row), which the CLI prints as one ``safeft: error:`` line with exit code 2 and no
traceback. Malformed data rows are an error by default; with ``on_bad_rows: skip`` they are
skipped and counted.
"""

from __future__ import annotations

import json
import logging
import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeft.cli import main
from safeft.config import DatasetSpec, RunConfig, load_config
from safeft.engine.run import tokenize
from safeft.errors import ConfigError, DataError, SafeftError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)

# Leaves of a valid config and the type each expects; a random value at one of them must be
# accepted or rejected with an error naming that very path.
LEAVES = [
    "model.name_or_path", "model.dtype", "model.trust_remote_code", "model.allow_pickle", "model.lora.r",
    "model.lora.alpha", "model.lora.dropout", "model.lora.target_modules", "data.max_length", "data.packing",
    "data.train.path", "data.train.format", "data.train.limit", "data.train.on_bad_rows", "data.train.reader",
    "training.learning_rate", "training.num_train_epochs", "training.max_steps", "training.save_strategy",
    "training.per_device_train_batch_size", "training.gradient_accumulation_steps", "training.lr_scheduler_type",
    "training.warmup_steps", "training.seed", "training.bf16", "epoch_eval.n", "method.name", "output_dir",
    "overwrite", "resume",
]


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


@FAST
@given(tree=st.dictionaries(st.sampled_from(["model", "data", "method", "training", "epoch_eval", "output_dir",
                                             "resume", "junk"]) | st.text(max_size=6), values, max_size=4))
def test_any_config_tree_is_valid_or_one_config_error(tree):
    try:
        cfg = load_config(None, base=tree)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert isinstance(cfg, RunConfig)


@FAST
@given(leaf=st.sampled_from(LEAVES), value=values)
def test_a_bad_value_names_its_field(leaf, value):
    tree = {"data": {"train": {"path": "x.jsonl"}}}
    _set(tree, leaf, value)
    try:
        load_config(None, base=tree)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        # the message names the offending path (method.name errors name 'method.name')
        assert leaf in msg or (leaf.startswith("data.train") and "data.train" in msg), msg


@FAST
@given(method=st.sampled_from(["sft", "kl-decay"]), key=st.text(string.ascii_lowercase + "_", min_size=1, max_size=8),
       value=values)
def test_method_options_are_checked(method, key, value):
    try:
        load_config(None, base={"method": {"name": method, key: value}})
    except ConfigError as e:
        assert f"method.{key}" in str(e) and "\n" not in str(e)


@FAST
@given(items=st.lists(st.text(max_size=30), max_size=3))
def test_any_set_override_is_valid_or_one_config_error(items):
    try:
        load_config(None, sets=items)
    except ConfigError as e:
        assert "\n" not in str(e)


@FAST
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_yaml_file_at_the_cli_is_one_line_exit_2(tmp_path_factory, tiny_model_dir, capsys, text):
    d = tmp_path_factory.mktemp("cfg")
    f = d / "c.yaml"
    f.write_text(text, encoding="utf-8")
    # a config that happens to be valid still fails: no data file (tiny model, so it fails fast)
    rc = main(["train", "-c", str(f), "--model", str(tiny_model_dir), "--data", str(d / "absent.jsonl"),
               "-o", str(d / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("safeft: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert not (d / "out").exists()  # nothing written before the input was validated


# --- data files --------------------------------------------------------------------------------

good_rows = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=30), "response": st.text(min_size=1, max_size=30)})
bad_dicts = st.dictionaries(st.sampled_from(["prompt", "response", "other"]), scalars | st.lists(scalars, max_size=2),
                            max_size=3)
garbage = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                  min_size=1, max_size=30).filter(lambda t: t.strip())
line = st.one_of(good_rows.map(lambda r: ("dict", r)), bad_dicts.map(lambda r: ("dict", r)),
                 garbage.map(lambda t: ("raw", t)))


def _valid(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)


def _parsed(kind, payload):
    if kind == "dict":
        return payload
    try:
        return json.loads(payload)
    except ValueError:
        return None


@FAST
@given(lines=st.lists(line, min_size=1, max_size=8), skip=st.booleans())
def test_jsonl_rows_error_names_file_and_line_or_are_skipped_and_counted(tmp_path_factory, tokenizer, caplog,
                                                                         lines, skip):
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    f.write_text("".join((json.dumps(p) if k == "dict" else p) + "\n" for k, p in lines), encoding="utf-8")
    rows = [_parsed(k, p) for k, p in lines]
    spec = DatasetSpec(path=str(f), on_bad_rows="skip" if skip else "error")
    n_good = sum(_valid(r) for r in rows)
    caplog.clear()
    caplog.set_level(logging.WARNING)
    try:
        ds = tokenize(RunConfig(), spec, tokenizer)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and str(f) in msg, msg
        first_unparsable = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
        shows_format = any(isinstance(r, dict) and {"prompt", "response"} <= r.keys() for r in rows)
        if first_unparsable is not None and not skip:
            assert f"{f}:{first_unparsable}:" in msg, msg
        elif not shows_format:
            assert "cannot tell the data format" in msg or "empty" in msg, msg
        elif skip:
            assert n_good == 0, msg
        else:
            first_bad = next(i for i, r in enumerate(rows, 1) if not _valid(r))
            assert f"row {first_bad}:" in msg, msg
    else:
        assert len(ds) == n_good
        if skip and n_good < len(rows):
            counted = sum(int(m) for r in caplog.records for m in re.findall(r"skipped (\d+) malformed", r.message))
            assert counted == len(rows) - n_good
        else:
            assert n_good == len(rows)


@FAST
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".parquet"]),
       skip=st.booleans())
def test_any_bytes_in_any_format_load_or_fail_with_one_data_error(tmp_path_factory, tokenizer, data, suffix, skip):
    f = tmp_path_factory.mktemp("bytes") / f"train{suffix}"
    f.write_bytes(data)
    try:
        tokenize(RunConfig(), DatasetSpec(path=str(f), on_bad_rows="skip" if skip else "error"), tokenizer)
    except SafeftError as e:
        assert "\n" not in str(e) and str(f) in str(e)


@FAST
@given(table=st.lists(st.lists(st.text(alphabet=string.ascii_letters + " ,\"", max_size=6), min_size=1, max_size=4),
                      min_size=1, max_size=5))
def test_csv_with_ragged_rows(tmp_path_factory, tokenizer, table):
    import csv

    f = tmp_path_factory.mktemp("csv") / "train.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "response"])
        w.writerows(table)
    ragged = [i for i, r in enumerate(table, 2) if len(r) != 2]
    try:
        ds = tokenize(RunConfig(), DatasetSpec(path=str(f)), tokenizer)
    except DataError as e:
        if ragged:
            assert f"{f}:{ragged[0]}:" in str(e)
        else:
            assert str(f) in str(e)
    else:
        assert not ragged and len(ds) == len(table)


@pytest.mark.parametrize(
    "content, expect",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n', "row 2: 'prompt' is int"),
        ('{"prompt": "a", "response": "b"}\n{"response": "b"}\n', "row 2: 'prompt' is missing"),
        ('{"prompt": "a", "response": "b"}\n[1]\n', ":2: malformed row"),
        ('{"messages": [1, 2]}\n', "row 1: 'messages'[0] must be an object"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "at least two messages"),
        ('{"messages": [{"role": "\\u001b[2J", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', "has role"),
        ('{"nothing": "here"}\n', "cannot tell the data format"),
    ],
)
def test_cli_bad_data_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, content, expect):
    f = tmp_path / "train.jsonl"
    f.write_text(content)
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(f), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"safeft: error: data: {f}") and expect in last, last
    assert "\x1b" not in err  # an escape sequence from the data is not echoed to the terminal
    assert not (tmp_path / "out").exists()


def test_skip_bad_rows_trains_on_the_rest(tmp_path, tiny_model_dir, caplog):
    rows = ['{"prompt": "p%d", "response": "r%d"}' % (i, i) for i in range(6)]
    rows[2], rows[4] = "{not json", '{"prompt": null, "response": "x"}'
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(rows) + "\n")
    caplog.set_level(logging.WARNING)
    import safeft

    s = safeft.train(**{"model.name_or_path": str(tiny_model_dir), "data.train.path": str(f),
                        "data.train.on_bad_rows": "skip", "output_dir": str(tmp_path / "o"),
                        "training.max_steps": 1, "training.save_strategy": "no", "data.max_length": 32})
    assert s["global_step"] == 1
    msgs = " ".join(r.message for r in caplog.records)
    assert "skipped 1 malformed rows" in msgs and "skipped 1 malformed rows (on_bad_rows: skip)" in msgs


def test_yaml_no_means_the_string_no():
    cfg = load_config(None, base=yaml.safe_load("training: {save_strategy: no}"))
    assert cfg.training.save_strategy == "no"
