"""`safeft train` / `safeft methods` end to end: one-line errors, the output-dir rules, resume, reload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from safeft.cli import main
from safeft.engine.trainer import checkpoint_problem


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (bad flag values)
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("safeft: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def _base(tiny_model_dir, data, out, *extra):
    return ["train", "--model", str(tiny_model_dir), "--data", str(data), "-o", str(out), "--max-length", "48",
            "--batch-size", "4", "--set", "training.disable_tqdm=true", *extra]


def test_methods_lists_each_with_its_paper(capsys):
    rc, out, _ = _run(["methods"], capsys)
    assert rc == 0
    for name, paper in (("kl-decay", "Vorontsov"), ("constrained-sft", "Qi et al"), ("mix-safety", "Bianchi"),
                        ("sft", "plain supervised")):
        line = next(i for i, ln in enumerate(out.splitlines()) if ln.startswith(name + " "))
        assert paper in "\n".join(out.splitlines()[line:line + 2])


def test_errors_are_one_line_exit_2(capsys, tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "o"
    cases = [
        (["--method", "magic"], ["method.name", "'magic'", "kl-decay"]),
        (["--set", "training.bogus=1"], ["training.bogus", "unknown field"]),
        (["--set", "training.per_device_train_batch_size=four"], ["training.per_device_train_batch_size", "'four'"]),
        (["--method", "kl-decay", "--set", "method.gamma=3"], ["method.gamma", "3"]),
        (["--lr", "abc"], ["--lr", "'abc'"]),
    ]
    for extra, needles in cases:
        rc, _, err = _run(_base(tiny_model_dir, chat_jsonl, out, *extra), capsys)
        _one_line_error(rc, err, *needles)
    assert not out.exists()  # nothing written before the input is valid


def test_data_and_model_errors(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    rc, _, err = _run(_base(tiny_model_dir, wrong, out), capsys)
    _one_line_error(rc, err, "columns found: answer, question")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = _run(_base(tiny_model_dir, empty, out), capsys)
    _one_line_error(rc, err, "empty")
    rc, _, err = _run(_base(tmp_path / "no-such-model", wrong, out), capsys)
    _one_line_error(rc, err, "model.name_or_path", "no-such-model")
    assert not out.exists()


def test_no_traceback_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "safeft", "train", "--method", "magic", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("safeft: error: method.name: unknown method 'magic'")


def test_non_empty_output_dir_refused_unless_overwrite(capsys, tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text('{"step": 99, "stale": true}\n')
    args = _base(tiny_model_dir, chat_jsonl, out, "--max-steps", "2", "--set", "training.save_strategy=no")
    rc, _, err = _run(args, capsys)
    _one_line_error(rc, err, "output_dir", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "notes.txt"]
    rc, stdout, _ = _run([*args, "--overwrite"], capsys)
    assert rc == 0 and "trained sft: 2 steps" in stdout
    assert (out / "notes.txt").read_text() == "mine"  # not safeft's: kept
    assert "stale" not in (out / "metrics.jsonl").read_text()  # safeft's own: replaced
    for name in ("config.yaml", "metrics.jsonl", "train_summary.json", "model"):
        assert (out / name).exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["method"] == "sft"


def _adapter(path):
    return load_file(str(path / "model" / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_weights(capsys, tiny_model_dir, chat_jsonl, tmp_path):
    """SIGKILL after the first checkpoint, then --resume: the final weights equal an uninterrupted run's."""
    common = ["--method", "kl-decay", "--set", "method.reference=cached", "--set", "method.per_step=true",
              "--max-steps", "12", "--batch-size", "2", "--lr", "5e-3", "--seed", "7",
              "--set", "training.save_strategy=steps", "--set", "training.save_steps=4",
              "--set", "training.save_total_limit=null"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rc, _, _ = _run(_base(tiny_model_dir, chat_jsonl, straight, *common), capsys)
    assert rc == 0

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "safeft", *_base(tiny_model_dir, chat_jsonl, killed, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    first = killed / "checkpoints" / "checkpoint-4"
    deadline = time.time() + 600
    # Kill as soon as checkpoint-4 is whole by the engine's own resume check (trainer_state.json,
    # which the Trainer writes last, parses and names step 4; the weights and states are complete),
    # not after a fixed wait: on an idle machine the tiny model runs the remaining steps in 0.3 s.
    while (not first.is_dir() or checkpoint_problem(first)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    done = sorted(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("checkpoint-*"))
    assert done and max(done) < 12 and checkpoint_problem(first) is None

    rc, stdout, _ = _run([*_base(tiny_model_dir, chat_jsonl, killed, *common), "--resume"], capsys)
    assert rc == 0 and "12 steps" in stdout
    a, b = _adapter(straight), _adapter(killed)
    assert a.keys() == b.keys()
    moved = max((a[k] - load_file(str(straight / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))[k])
                .abs().max().item() for k in a)
    assert moved > 1e-3  # training after the checkpoint really changed the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines() if "loss" in ln
             and "train_loss" not in ln]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated records after the resume


@pytest.mark.integration
def test_smollm2_fine_tune_and_reload(capsys, smollm2_dir, chat_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    rc, stdout, _ = _run(["train", "--model", "embedded:smollm2", "--data", str(chat_jsonl), "-o", str(out),
                          "--method", "kl-decay", "--max-steps", "3", "--batch-size", "2", "--max-length", "48",
                          "--lr", "1e-3", "--set", "training.save_strategy=no", "--set", "model.lora.merge=true",
                          "--set", "training.disable_tqdm=true"], capsys)
    assert rc == 0 and "trained kl-decay: 3 steps" in stdout
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "model").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model" / "merged").eval()(ids).logits
    assert torch.allclose(adapted, merged, atol=2e-3, rtol=1e-4)  # merging rounds the fp32 weights
    assert (adapted - before).abs().max() > 1e-3  # the fine-tune changed the model
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "kl" in m] == [1, 2, 3] and metrics[0]["kl"] == 0.0
