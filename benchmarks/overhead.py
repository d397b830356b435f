"""Cost of the safety-preserving methods against plain SFT on the embedded SmolLM2.

Writes ``benchmarks/results/overhead.json`` (this script's keys only; others add theirs):
``sft/lora``, ``sft/full``, ``kl-decay/lora-live``, ``kl-decay/lora-cached``,
``kl-decay/full-cached``, ``constrained-sft/lora-live``, ``constrained-sft/lora-cached``,
``mix-safety/lora`` and ``trl-sft/lora``, each with ``step_s``, ``peak_mem_mb``, ``run_s`` and
the three ratios against SFT in the same mode (``trl-sft/lora`` against safeft's ``sft/lora``).

How it measures (same model, data, batch, LoRA settings and steps for every entry):

- ``step_s``: in ONE process, one model per mode (LoRA / full); every round runs one training
  step (loss, backward, AdamW update) of every method on the same batch, in a rotated order,
  so CPU noise hits all methods alike; the median over rounds (the first round, a warm-up, is
  dropped). TRL's step is its ``SFTTrainer.compute_loss`` + backward + update on the same
  tokens (TRL gets them pre-tokenized, with safeft's completion mask).
- ``peak_mem_mb`` and ``run_s``: each entry in a FRESH subprocess, a whole 3-epoch run through
  the real engine (``safeft.api``: trainer build, the preparation pass for cached references,
  all steps, saving the model); ``peak_mem_mb`` is that process's peak resident set size
  (``getrusage``), i.e. everything the run needs (Python, torch, weights, optimizer,
  activations), ``run_s`` its wall time from the method's start to the saved model.

Usage: ``python benchmarks/overhead.py [--data-dir ../shared/data]`` (a few minutes on 2 idle
CPU cores; much longer on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, merge_results, peak_rss_mb, timed_engine_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, MAX_LEN, N_TRAIN, EPOCHS, LR = 2, 64, 8, 3, 1e-4
LORA = {"r": 16, "alpha": 32}

# entry -> (method, method options, lora?)
ENTRIES = {
    "sft/lora": ("sft", {}, True),
    "kl-decay/lora-live": ("kl-decay", {"reference": "live"}, True),
    "kl-decay/lora-cached": ("kl-decay", {"reference": "cached"}, True),
    "constrained-sft/lora-live": ("constrained-sft", {"reference": "live"}, True),
    "constrained-sft/lora-cached": ("constrained-sft", {"reference": "cached"}, True),
    "mix-safety/lora": ("mix-safety", {}, True),
    "sft/full": ("sft", {}, False),
    "kl-decay/full-cached": ("kl-decay", {"reference": "cached"}, False),
}
BASELINE = {"lora": "sft/lora", "full": "sft/full"}


def overrides(entry: str, data_dir: str, out: Path) -> dict:
    method, opts, lora = ENTRIES[entry]
    o = {
        "method.name": method, "model.lora.enabled": lora, "model.lora.r": LORA["r"], "model.lora.alpha": LORA["alpha"],
        "data.train": {"path": "pubmedqa", "reader": "pubmedqa", "split": "train", "limit": N_TRAIN},
        "data.data_dir": data_dir, "data.max_length": MAX_LEN,
        "training.per_device_train_batch_size": BATCH, "training.per_device_eval_batch_size": BATCH,
        "training.num_train_epochs": EPOCHS, "training.learning_rate": LR, "training.save_strategy": "no",
        "training.logging_steps": 1000, "training.disable_tqdm": True, "training.seed": 0,
        "output_dir": str(out), "overwrite": True,
    }
    o.update({f"method.{k}": v for k, v in opts.items()})
    return o


# --- fresh-process whole runs: peak memory and run time ---------------------------------------
def worker(entry: str, data_dir: str) -> dict:
    import torch

    torch.set_num_threads(2)
    out = Path(tempfile.mkdtemp(prefix="safeft-bench-"))
    if entry == "trl-sft/lora":
        return trl_worker(data_dir, out)
    record, summary = timed_engine_run(overrides(entry, data_dir, out))
    return {**record, **({"mix": summary["mix"]} if "mix" in summary else {})}


def _tokenized(data_dir: str, tokenizer):
    from safeft.config import load_config
    from safeft.engine.run import tokenize

    cfg = load_config(None, overrides("sft/lora", data_dir, Path("unused")))
    return tokenize(cfg, cfg.data.train, tokenizer)


def _trl_dataset(ds):
    import datasets

    return datasets.Dataset.from_list([
        {"input_ids": ex["input_ids"], "completion_mask": [int(t != -100) for t in ex["labels"]]} for ex in ds])


def _trl_trainer(model, tokenizer, ds, out: Path, peft_config=None):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=LR,
        max_length=MAX_LEN, completion_only_loss=True, save_strategy="no", logging_steps=1000, report_to="none",
        disable_tqdm=True, seed=0, use_cpu=True, lr_scheduler_type="linear", max_grad_norm=1.0,
        weight_decay=0.0, warmup_steps=0, gradient_checkpointing=False, bf16=False,  # TRL defaults both on
    )
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=peft_config)


def trl_worker(data_dir: str, out: Path) -> dict:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, set_seed

    from safeft.models import embedded_model_dir, load_tokenizer

    set_seed(0)
    path = str(embedded_model_dir())
    tok = load_tokenizer(path)
    ds = _trl_dataset(_tokenized(data_dir, tok))
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    t = time.perf_counter()
    trainer = _trl_trainer(model, tok, ds, out, peft_cfg)
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    run_s = time.perf_counter() - t
    return {"run_s": run_s, "peak_mem_mb": peak_rss_mb(), "steps": result.global_step, "examples": len(ds)}


# --- one-process interleaved steps: step time --------------------------------------------------
def step_times(data_dir: str, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    import torch
    from transformers import set_seed

    from safeft.config import load_config
    from safeft.data import Collator
    from safeft.engine.run import build_run
    from safeft.engine.trainer import build_trainer
    from safeft.methods import get_method_class
    from safeft.models import load_model

    torch.set_num_threads(2)
    set_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="safeft-bench-steps-"))
    times: dict[str, list[float]] = {}
    prep: dict[str, float] = {}
    for mode, lora in (("lora", True), ("full", False)):
        entries = [e for e, (_, _, lo) in ENTRIES.items() if lo == lora]
        base = load_config(None, overrides(entries[0], data_dir, tmp / "x"))
        model, tok = load_model(base.model)
        steppers = {}
        for entry in entries:
            cfg = load_config(None, overrides(entry, data_dir, tmp / entry.replace("/", "_")))
            cls = get_method_class(cfg.method.name)
            run = build_run(cfg, model=model, tokenizer=tok)
            method = cls(cls.validate_params(cfg.method.params()), run)
            if hasattr(method, "mix"):
                method.mix()
            t = time.perf_counter()
            method.prepare(build_trainer(run, method))  # cached references: the preparation pass
            prep[entry] = time.perf_counter() - t
            print(f"[steps] {entry}: ready", file=sys.stderr, flush=True)
            steppers[entry] = (method, run.train_dataset)
        if lora:
            steppers["trl-sft/lora"] = _trl_stepper(model, tok, data_dir, tmp)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR)
        coll = Collator(tok.pad_token_id)
        names = list(steppers)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for entry in order:
                method, ds = steppers[entry]
                rows = [ds[(r * BATCH + i) % len(ds)] for i in range(BATCH)]
                t = time.perf_counter()
                if entry == "trl-sft/lora":
                    method(rows)
                else:
                    batch = coll(rows)
                    out = method.compute_loss(model, batch, types.SimpleNamespace(epoch_index=0.0))
                    (out.loss_sum / max(out.n_tokens, 1)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r:
                    times.setdefault(entry, []).append(time.perf_counter() - t)
            print(f"[steps] {mode} round {r} done", file=sys.stderr, flush=True)
        del model, opt, steppers
    return {e: statistics.median(v) for e, v in times.items()}, prep


def _trl_stepper(model, tok, data_dir, tmp):
    """TRL's own loss on the same model and rows: ``SFTTrainer.compute_loss`` + backward."""
    ds = _trl_dataset(_tokenized(data_dir, tok))
    trainer = _trl_trainer(model, tok, ds, tmp / "trl")
    collate = trainer.data_collator

    def step(rows):
        batch = collate([{"input_ids": r["input_ids"], "completion_mask": [int(t != -100) for t in r["labels"]]}
                         for r in rows])
        loss = trainer.compute_loss(model, batch)
        loss.backward()

    return step, _tokenized(data_dir, tok)


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def build_entries(results: dict, todo: list[str]) -> dict:
    """Entries from whatever has finished: step times (the ``steps`` run) and whole runs."""
    steps, prep = results.get("steps", ({}, {}))
    entries = {}
    for entry in todo:
        r = results.get(entry, {})
        if not r and entry not in steps:
            continue
        base = BASELINE["full" if "/full" in entry else "lora"]
        b = results.get(base, {})
        st, bst = steps.get(entry), steps.get(base)
        e = {"step_s": None if st is None else round(st, 4), "peak_mem_mb": r.get("peak_mem_mb") and round(r["peak_mem_mb"], 1),
             "run_s": r.get("run_s") and round(r["run_s"], 2),
             "step_time_ratio": _ratio(st, bst), "peak_mem_ratio": _ratio(r.get("peak_mem_mb"), b.get("peak_mem_mb")),
             "run_time_ratio": _ratio(r.get("run_s"), b.get("run_s")), "steps": r.get("steps"),
             "examples": r.get("examples"),
             "baseline": {"entry": base, "step_s": bst and round(bst, 4), "peak_mem_mb": b.get("peak_mem_mb"),
                          "run_s": b.get("run_s")}}
        if prep.get(entry, 0) > 0.01:
            e["prepare_s"] = round(prep[entry], 2)
        if "mix" in r:
            e["extra_examples"] = r["mix"]["safety_examples"]
        entries[entry] = e
    return entries


def run_workers(names: list[str], args, on_result) -> dict:
    """Each name in a fresh process (``--jobs`` at a time); their RESULT lines, parsed."""
    pending, running, out = list(names), {}, {}
    env = {**os.environ, "TQDM_DISABLE": "1"}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, "--worker", name, "--data-dir", args.data_dir, "--rounds", str(args.rounds)]
            running[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            stdout, stderr = proc.communicate()
            del running[name]
            line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.stderr.write(stderr[-3000:])
                raise SystemExit(f"worker {name} failed")
            out[name] = json.loads(line[len("RESULT "):])
            print(name, "done", flush=True)
            on_result({name: out[name]})
        time.sleep(0.5)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--rounds", type=int, default=4, help="interleaved step rounds (the first is a warm-up)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="subset of entries (debugging)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="fresh-process runs at a time (1 = sequential, the cleanest; more on a busy machine)")
    ap.add_argument("--output", default=str(RESULTS / "overhead.json"))
    args = ap.parse_args(argv)
    if args.worker == "steps":
        print("RESULT " + json.dumps(step_times(args.data_dir, args.rounds)))
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.data_dir)))
        return 0

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    todo = [e for e in [*ENTRIES, "trl-sft/lora"] if not args.only or e in args.only or e in BASELINE.values()]
    meta = {
        "setup": f"PubMedQA train ({N_TRAIN} examples, chat prompt->answer), batch {BATCH}, max_length {MAX_LEN}, "
                 f"{EPOCHS} epochs, LoRA r{LORA['r']}/alpha{LORA['alpha']} all-linear, AdamW lr {LR}, 2 threads; "
                 f"step_s = median of {args.rounds - 1} interleaved rounds in one process; peak_mem_mb/run_s = a "
                 "whole run in a fresh process each",
    }
    results: dict = {}

    def record(done: dict) -> dict:
        results.update(done)
        entries = build_entries(results, todo)
        meta["cpu_note"] = (f"shared 2-core machine (other agents' jobs running): load average {load_start:.1f} at "
                            f"start, {os.getloadavg()[0]:.1f} now; {args.jobs} fresh-process run(s) at a time; ratios "
                            "are more reliable than absolute times; null = not measured (run unfinished)")
        meta["benchmark_s"] = round(time.perf_counter() - t0, 1)
        merge_results(args.output, {**entries, "overhead.py": meta},
                      model="SmolLM2-135M-Instruct (embedded:smollm2), float32, CPU")
        return entries

    run_workers(["steps", *todo], args, record)
    entries = record({})
    print(json.dumps(entries, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
