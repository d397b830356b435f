"""Cost of SAP (safety-aware probing) against plain LoRA SFT on the embedded SmolLM2.

Adds ``sap/lora`` (refresh every step, the paper's schedule) and ``sap/lora-k4`` (ΔW and the
probe refreshed every 4 steps) to ``benchmarks/results/overhead.json``, each with ``step_s``,
``peak_mem_mb``, ``run_s``, the three ratios against ``sft/lora`` measured by this script in
the same process, and that baseline under ``baseline``. The set-up is ``overhead.py``'s
(PubMedQA train, batch 4, max_length 128, LoRA r16/alpha32 all-linear, fp32, 2 threads); SAP's
safety sets are the built-in Do-Not-Answer train prompts with template refusals / template
compliance, ``safety_batch_size`` 4 (+4), the method's defaults otherwise.

- ``step_s``: one model; every round runs one step (method loss + backward + AdamW update) of
  each entry on the same batch, in a rotated order, so machine load hits all alike; median over
  rounds after a warm-up round. SAP's steps include its safety pass and probe passes.
- ``peak_mem_mb`` / ``run_s``: a whole run through the real engine in a fresh subprocess per
  entry (peak resident set size of that process; wall time from the method's start to the
  saved model).
- ``--profile``: times each part of a ``sap/lora`` step (safety pass, perturbed probe pass,
  task pass) against an SFT step and stores it under ``sap/profile``.

Usage: ``python benchmarks/overhead_sap.py [--data-dir ../shared/data] [--rounds 6] [--profile]``
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
from common import RESULTS, merge_results, timed_engine_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, MAX_LEN, N_TRAIN, EPOCHS, LR = 4, 128, 24, 2, 1e-4
LORA = {"r": 16, "alpha": 32}
SAP = {"safe_data": "builtin", "harmful_data": "builtin"}
ENTRIES = {
    "sft/lora": ("sft", {}),
    "sap/lora": ("sap", {**SAP, "refresh_every": 1}),
    "sap/lora-k4": ("sap", {**SAP, "refresh_every": 4}),
}


def overrides(entry: str, data_dir: str, out: Path) -> dict:
    method, opts = ENTRIES[entry]
    o = {
        "method.name": method, "model.lora.enabled": True, "model.lora.r": LORA["r"], "model.lora.alpha": LORA["alpha"],
        "data.train": {"path": "pubmedqa", "reader": "pubmedqa", "split": "train", "limit": N_TRAIN},
        "data.data_dir": data_dir, "data.max_length": MAX_LEN,
        "training.per_device_train_batch_size": BATCH, "training.num_train_epochs": EPOCHS,
        "training.learning_rate": LR, "training.save_strategy": "no", "training.logging_steps": 1000,
        "training.disable_tqdm": True, "training.seed": 0, "output_dir": str(out), "overwrite": True,
    }
    o.update({f"method.{k}": v for k, v in opts.items()})
    return o


def worker(entry: str, data_dir: str) -> dict:
    import torch

    torch.set_num_threads(2)
    out = Path(tempfile.mkdtemp(prefix="safeft-bench-sap-"))
    record, _ = timed_engine_run(overrides(entry, data_dir, out))
    return record


def _steppers(data_dir: str, tmp: Path):
    import torch
    from transformers import set_seed

    from safeft.config import load_config
    from safeft.engine.run import build_run
    from safeft.methods import get_method_class
    from safeft.models import load_model

    torch.set_num_threads(2)
    set_seed(0)
    base = load_config(None, overrides("sft/lora", data_dir, tmp / "x"))
    model, tok = load_model(base.model)
    methods, ds = {}, None
    for entry in ENTRIES:
        cfg = load_config(None, overrides(entry, data_dir, tmp / entry.replace("/", "_")))
        cls = get_method_class(cfg.method.name)
        run = build_run(cfg, model=model, tokenizer=tok)
        methods[entry] = cls(cls.validate_params(cfg.method.params()), run)
        ds = run.train_dataset
    return model, tok, methods, ds


def step_times(data_dir: str, rounds: int) -> dict[str, float]:
    import torch

    from safeft.data import Collator

    model, tok, methods, ds = _steppers(data_dir, Path(tempfile.mkdtemp(prefix="safeft-bench-sap-steps-")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    coll = Collator(tok.pad_token_id)
    names = list(methods)
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        batch = coll([ds[(r * BATCH + i) % len(ds)] for i in range(BATCH)])
        for entry in order:
            trainer = types.SimpleNamespace(epoch_index=0.0, state=types.SimpleNamespace(global_step=r))
            t = time.perf_counter()
            out = methods[entry].compute_loss(model, batch, trainer)
            (out.loss_sum / max(out.n_tokens, 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times.setdefault(entry, []).append(time.perf_counter() - t)
    return {e: statistics.median(v) for e, v in times.items()}


def profile(data_dir: str, rounds: int) -> dict:
    """Seconds of each part of a refresh step of ``sap/lora`` (shared schedule) vs an SFT step."""
    import torch
    import torch.nn.functional as F

    from safeft import losses
    from safeft.data import Collator

    model, tok, methods, ds = _steppers(data_dir, Path(tempfile.mkdtemp(prefix="safeft-bench-sap-prof-")))
    sap = methods["sap/lora"]
    coll = Collator(tok.pad_token_id)
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        res = fn()
        parts.setdefault(name, []).append(time.perf_counter() - t)
        return res

    sap.V = torch.full_like(sap.V, 0.05)
    sap._have_probe = True
    for r in range(rounds):
        batch = coll([ds[(r * BATCH + i) % len(ds)] for i in range(BATCH)])
        pos = losses.response_positions(batch["labels"])

        def sft_step():
            logits, _ = losses.response_logits(model, batch, pos)
            F.cross_entropy(logits, pos.targets, reduction="sum").backward()

        timed("sft_step", sft_step)
        timed("safety_pass", lambda: sap._compute_delta(model, batch["input_ids"].device, batch["input_ids"].numel() // 2))

        def probe_pass():
            with sap._perturbed(model):
                sap._probe_grad(model, batch, pos, sap.V)

        timed("perturbed_probe_pass", probe_pass)

        def task_pass():
            leaf = sap.V.clone().requires_grad_(True)
            with sap._probe(leaf):
                sap._ce_sum(model, batch, pos).backward()

        timed("task_pass_with_probe_grad", task_pass)
        model.zero_grad(set_to_none=True)
    med = {k: round(statistics.median(v[1:] or v), 4) for k, v in parts.items()}
    sft = med["sft_step"]
    return {"seconds": med, "ratio_to_sft_step": {k: round(v / sft, 3) for k, v in med.items()},
            "safety_tokens": "4 refusal + 4 compliance examples (Do-Not-Answer, template answers)",
            "probed_layers": sap.layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--rounds", type=int, default=6, help="interleaved step rounds (the first is a warm-up)")
    ap.add_argument("--profile", action="store_true", help="also time the parts of a SAP step")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(RESULTS / "overhead.json"))
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.data_dir)))
        return 0
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    # Whole runs first, while this process is still small: Linux keeps a process's peak RSS
    # across exec, so a worker forked from a parent that already holds a model would report
    # the parent's peak, not its own.
    runs = {}
    for entry in ENTRIES:
        proc = subprocess.run([sys.executable, __file__, "--worker", entry, "--data-dir", args.data_dir],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"worker {entry} failed")
        runs[entry] = json.loads(line[len("RESULT "):])
        print(entry, runs[entry], flush=True)
    steps = step_times(args.data_dir, args.rounds)
    print("step_s", steps, flush=True)
    base = "sft/lora"
    baseline = {"entry": base, "measured_by": "overhead_sap.py", "step_s": round(steps[base], 4),
                "peak_mem_mb": round(runs[base]["peak_mem_mb"], 1), "run_s": round(runs[base]["run_s"], 2)}
    entries = {}
    for entry in ("sap/lora", "sap/lora-k4"):
        r = runs[entry]
        entries[entry] = {
            "step_s": round(steps[entry], 4), "peak_mem_mb": round(r["peak_mem_mb"], 1), "run_s": round(r["run_s"], 2),
            "step_time_ratio": round(steps[entry] / steps[base], 3),
            "peak_mem_ratio": round(r["peak_mem_mb"] / runs[base]["peak_mem_mb"], 3),
            "run_time_ratio": round(r["run_s"] / runs[base]["run_s"], 3),
            "steps": r["steps"], "baseline": baseline,
        }
    if args.profile:
        entries["sap/profile"] = profile(args.data_dir, args.rounds)
    entries["overhead_sap.py"] = {
        "setup": f"PubMedQA train ({N_TRAIN} examples), batch {BATCH}, max_length {MAX_LEN}, {EPOCHS} epochs, LoRA "
                 f"r{LORA['r']}/alpha{LORA['alpha']} all-linear, AdamW lr {LR}, fp32, 2 threads; SAP: builtin safety "
                 "sets, safety_batch_size 4, schedule shared, middle-third layers; step_s = median of "
                 f"{args.rounds - 1} interleaved rounds in one process; peak_mem_mb/run_s = whole runs, fresh process each",
        "cpu_note": f"shared 2-core machine: load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        "benchmark_s": round(time.perf_counter() - t0, 1),
    }
    merge_results(args.output, entries)
    print(json.dumps(entries, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
