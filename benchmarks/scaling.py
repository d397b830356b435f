"""Training throughput for 1 and N processes (accelerate, DDP; gloo on CPU), and the scaling
efficiency ``tokens/s(N) / (N * tokens/s(1))``.

Every run trains the same model on packed plain text, so every example is exactly
``--max-length`` tokens and tokens/s is ``steps * global_batch * max_length / runtime``.
The global batch is fixed (N processes each take ``global_batch / N``), so all runs do the
same arithmetic. The single-process baseline runs with as many threads per process as the
N-process run (1 by default, torchrun's default), plus once with every core, so the table
also shows what N processes buy over one process using the whole machine.

    python benchmarks/scaling.py                  # SmolLM2-135M, LoRA, 2 processes
    python benchmarks/scaling.py --processes 4 --model /path/to/model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, merge_results  # noqa: E402


def _text_file(path: Path, n: int) -> None:
    rows = [{"text": f"Record {i}: the patient received {i % 7 + 1} doses over {i % 5 + 2} days and "
                     f"recovered; follow-up {i % 3 + 1} weeks later found no recurrence."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(model: str, data: Path, out: Path, procs: int, threads: int, a) -> dict:
    per_device = a.global_batch // procs
    cmd = [sys.executable, "-m", "safeft", "train", "--model", model, "--data", str(data), "-o", str(out),
           "--overwrite", "--max-steps", str(a.steps), "--batch-size", str(per_device), "--max-length",
           str(a.max_length), "--set", "data.packing=true", "--set", "training.save_strategy=no",
           "--set", "training.disable_tqdm=true", "--set", "training.logging_steps=1000"]
    if procs > 1:
        cmd += ["--num-processes", str(procs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    s = json.loads((out / "train_summary.json").read_text())
    tokens = s["global_step"] * a.global_batch * a.max_length
    return {"processes": procs, "threads_per_process": threads, "per_device_batch": per_device,
            "steps": s["global_step"], "runtime_s": round(s["train_runtime_s"], 3),
            "tokens_per_s": round(tokens / s["train_runtime_s"], 1), "final_loss": s["train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"))
    ap.add_argument("--no-all-cores", action="store_true",
                    help="skip the 1-process all-cores run (thread oversubscription on a busy host)")
    a = ap.parse_args()
    n = a.processes
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "text.jsonl"
        _text_file(data, 400)
        one = run(a.model, data, tmp / "one", 1, max(1, cores // n), a)
        one_all = None if a.no_all_cores else run(a.model, data, tmp / "one_all", 1, cores, a)
        many = run(a.model, data, tmp / "many", n, max(1, cores // n), a)
    entry = {
        "device": f"cpu ({cores} cores, gloo)",
        "model": a.model, "lora": True, "max_length": a.max_length, "global_batch": a.global_batch,
        "baseline": one,
        "baseline_all_cores": one_all,
        f"processes_{n}": many,
        "efficiency": round(many["tokens_per_s"] / (n * one["tokens_per_s"]), 3),
        "speedup_vs_all_cores": round(many["tokens_per_s"] / one_all["tokens_per_s"], 3) if one_all else None,
        "loss_match": abs(many["final_loss"] - one["final_loss"]) <= 1e-4 * abs(one["final_loss"]),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    merge_results(a.out, {f"cpu_{n}proc": entry})
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
