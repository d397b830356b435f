"""Security: hostile model output stays inert, config paths stay inside the output dir, no
code runs from a model directory unless asked, pickle refused, offline means offline."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safeft.errors import ConfigError, ModelLoadError
from safeft.safety_io import SanitizingFilter, safe_child, safe_name, strip_control

HOSTILE = [
    "\x1b[2J\x1b[H",                      # clear screen, cursor home
    "\x1b]0;pwned\x07",                   # set window title (OSC ... BEL)
    "\x1b]8;;http://evil.example\x1b\\",  # hyperlink (OSC ... ST)
    "\x1bP+q544e\x1b\\",                  # DCS request (terminal answer-back)
    "\x9b31m",                            # 8-bit CSI
    "\x1b[6n",                            # cursor-position report request
    "\u202e",                             # right-to-left override
    "\x07\x08\x7f\x00",                   # bell, backspace, DEL, NUL
]


@pytest.mark.parametrize("seq", HOSTILE)
def test_strip_control_leaves_only_the_text(seq):
    text = f"safe {seq}answer\tend\n"
    out = strip_control(text)
    assert out == "safe answer\tend\n"
    assert strip_control(text, one_line=True) == "safe answer\\tend\\n"


def test_strip_control_keeps_ordinary_unicode():
    s = "Ünïcödé — 日本語 😀 [not an escape] 50% done\n"
    assert strip_control(s) == s


def test_log_records_are_sanitized():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SanitizingFilter())
    logger = logging.getLogger("safeft.test_security")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("generation: %s", "ok \x1b]0;pwned\x07\x1b[31mred\u202e")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "generation: ok red\n"


def test_safe_child_contains_writes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert safe_child(out, "generations/donotanswer.jsonl") == (out / "generations/donotanswer.jsonl").resolve()
    for bad in ["../escape.json", "a/../../escape", "/etc/passwd", "~/x", "", "a\x00b"]:
        with pytest.raises(ConfigError) as e:
            safe_child(out, bad, field="eval.suites")
        assert str(e.value).startswith("eval.suites: ")
    (out / "link").symlink_to(tmp_path)  # a symlink inside the run dir pointing out of it
    with pytest.raises(ConfigError, match="outside the output directory"):
        safe_child(out, "link/x.json")


@pytest.mark.parametrize("name, expect", [("../../etc/passwd", "etc_passwd"), ("a b/c", "a_b_c"), ("..", "_"),
                                          ("\x1b[31mred", "red"), ("ok-name_1.json", "ok-name_1.json")])
def test_safe_name(name, expect):
    assert safe_name(name) == expect


def test_pickle_checkpoints_refused_unless_allowed(tmp_path, tiny_model_dir):
    from safeft.config import ModelConfig
    from safeft.models import load_model

    d = tmp_path / "pickled"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    model, _ = load_model(str(tiny_model_dir), for_training=False)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(name_or_path=str(d)), for_training=False)
    assert e.value.field == "model.allow_pickle" and "pytorch_model.bin" in str(e.value)
    loaded, _ = load_model(ModelConfig(name_or_path=str(d), allow_pickle=True), for_training=False)
    k = "model.embed_tokens.weight"
    assert torch.equal(loaded.state_dict()[k], model.state_dict()[k])


def test_remote_code_is_not_run_unless_asked(tmp_path, tiny_model_dir):
    from safeft.config import ModelConfig
    from safeft.models import load_model

    d = tmp_path / "custom"
    d.mkdir()
    marker = tmp_path / "PWNED"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (d / "configuration_evil.py").write_text(code)
    (d / "modeling_evil.py").write_text(code)
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    for f in tiny_model_dir.glob("tokenizer*"):
        (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(name_or_path=str(d)), for_training=False)
    assert e.value.field == "model.trust_remote_code"
    assert not marker.exists()
    assert ModelConfig().trust_remote_code is False


def test_offline_hub_id_fails_fast_with_one_line(tmp_path, chat_jsonl):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "safeft", "train", "--model", "some-org/not-cached-model",
                           "--data", str(chat_jsonl), "-o", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safeft: error: model.name_or_path:"), proc.stderr
    assert "offline" in lines[0]
    assert "Traceback" not in proc.stderr
    assert elapsed < 60  # no network retries (the interpreter start-up is most of it)
    assert not (tmp_path / "o").exists()


def test_offline_hub_dataset_fails_with_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from safeft.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = main(["train", "--model", str(tiny_model_dir), "--data", "some-org/not-cached-dataset",
               "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("safeft: error: data.path: cannot load hub dataset")


def test_saved_models_are_safetensors_only(tmp_path, tiny_model_dir, tokenizer):
    from safeft.config import ModelConfig
    from safeft.models import load_model, save_model

    model, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))  # LoRA
    out = save_model(model, tokenizer, tmp_path / "m", merge=True)
    files = [p.name for p in Path(out).rglob("*") if p.is_file()]
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
