"""Wall time of pr-nado's sequential and parallel algorithms against plain LoRA SFT.

Adds ``pr-nado/sequential`` and ``pr-nado/parallel`` to ``benchmarks/results/overhead.json``.
All three runs use the same model (``--model``, default the embedded SmolLM2) with LoRA r16, the same data (a ToxiGen + PubMedQA
mix built by ``compare_pr_nado.build_mix``), batch, sequence length and number of optimizer
steps; the two pr-nado runs split those steps into the same rounds and sample the same number
of sequences per round. Each run goes through the real engine (``safeft.api.train``: model
load, tokenisation, training, R rounds, saving); ``run_s`` is its wall time and
``run_time_ratio`` = run_s / run_s of ``sft/lora`` measured in the same process (recorded as
``baseline`` in each entry). With ``--repeats N`` the three runs are interleaved N times and
medians reported, so machine load hits all of them alike.

Usage: ``python benchmarks/overhead_pr_nado.py [--data-dir ../shared/data] [--repeats 1]
[--model embedded:smollm2|tiny|DIR] [--threads N] [--steps 6] [--samples 8]`` (a few minutes
per repeat on 2 idle CPU cores). ``--steps`` and ``--samples`` set the balance between a θ
round (steps / rounds optimizer steps) and an R round (sampling, labelling, R's epochs): the
parallel algorithm can hide R's rounds only where an R round is no longer than a θ round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, merge_results  # noqa: E402
from compare_pr_nado import build_mix  # noqa: E402

STEPS, ROUNDS, BATCH, MAX_LEN, LR = 6, 3, 2, 48, 2e-4
NADO = {"rounds": ROUNDS, "samples_per_round": 8, "max_new_tokens": 12, "r_epochs": 4, "worker_threads": 1}
ENTRIES = {
    "sft/lora": {"name": "sft"},
    "pr-nado/sequential": {"name": "pr-nado", **NADO},
    "pr-nado/parallel": {"name": "pr-nado", **NADO, "parallel": True},
}


def run(entry: str, data: Path, out: Path, model: str, steps: int, samples: int) -> tuple[float, dict]:
    from safeft import api

    overrides = {
        "model.name_or_path": model, "data.train.path": str(data), "data.max_length": MAX_LEN, "training.max_steps": steps,
        "training.per_device_train_batch_size": BATCH, "training.learning_rate": LR, "training.save_strategy": "no",
        "training.disable_tqdm": True, "output_dir": str(out), "overwrite": True,
    }
    overrides.update({f"method.{k}": v for k, v in ENTRIES[entry].items()})
    if entry != "sft/lora":
        overrides["method.samples_per_round"] = samples
    t = time.perf_counter()
    summary = api.train(None, **overrides)
    return time.perf_counter() - t, summary


def tiny_model(path: Path) -> Path:
    from safeft.models import embedded_model_dir, load_tokenizer, tiny_llama

    tok = load_tokenizer(str(embedded_model_dir()))
    tiny_llama(vocab_size=len(tok), hidden=64, layers=2, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def round_times(summary: dict) -> dict:
    log = summary.get("rounds")
    if not log:
        return {}
    return {"r_round_s": [round(r["end"] - r["start"], 2) for r in log["r_rounds"]],
            "theta_round_s": [round(t["end"] - t["start"], 2) for t in log["theta_rounds"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--model", default="embedded:smollm2",
                    help="model to time: embedded:smollm2, a local dir, or 'tiny' (safeft.models.tiny_llama, "
                         "hidden 64, 2 layers, with SmolLM2's tokenizer)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the main process (on a loaded machine, 1 avoids OpenMP oversubscription)")
    ap.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of every run (split into the rounds)")
    ap.add_argument("--samples", type=int, default=NADO["samples_per_round"], help="pr-nado: sequences sampled per round")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="pr-nado-overhead-"))
    if args.model == "tiny":
        args.model = str(tiny_model(work / "tiny"))
    mix = build_mix(Path(args.data_dir), work / "data", n_hate=24, n_neutral=12, n_domain=24)
    times: dict[str, list[float]] = {e: [] for e in ENTRIES}
    details: dict[str, dict] = {}
    for rep in range(args.repeats):
        order = list(ENTRIES) if rep % 2 == 0 else list(reversed(ENTRIES))
        for entry in order:
            secs, summary = run(entry, mix["train"], work / entry.replace("/", "-"), args.model, args.steps, args.samples)
            times[entry].append(secs)
            details[entry] = round_times(summary)
            print(f"{entry}: {secs:.1f} s", flush=True)
    med = {e: statistics.median(v) for e, v in times.items()}
    base = med["sft/lora"]
    setting = (f"{'tiny Llama (hidden 64, 2 layers)' if 'tiny' in args.model else args.model}, LoRA r16, {args.steps} steps x batch {BATCH} x max_length {MAX_LEN}, {ROUNDS} rounds, "
               f"{args.samples} samples x {NADO['max_new_tokens']} new tokens per round, "
               f"{torch.get_num_threads()} torch threads (parallel: + a 1-thread R worker process)")
    entries = {}
    for e in ("pr-nado/sequential", "pr-nado/parallel"):
        entries[e] = {
            "run_s": round(med[e], 1), "run_time_ratio": round(med[e] / base, 3),
            "baseline": {"entry": "sft/lora", "run_s": round(base, 1)}, "repeats": args.repeats,
            "setting": setting, **details[e],
        }
    entries["pr-nado/parallel"]["vs_sequential"] = round(med["pr-nado/parallel"] / med["pr-nado/sequential"], 3)
    merge_results(RESULTS / "overhead.json", entries)
    print(json.dumps(entries, indent=2))


if __name__ == "__main__":
    main()
