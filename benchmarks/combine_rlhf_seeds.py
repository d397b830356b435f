"""Combine per-seed results of ``compare_rlhf.py`` into one file with paired differences.

Each input is one seed's ``--out`` file. For every pair of models (RLHF and RA-RLHF against the
base, and RA-RLHF against RLHF) and every seed, the difference is paired per evaluation prompt:
mean and 95 % interval (1.96 standard errors) over all prompts ("avg") and over the seed's tail
prompts ("tail"). ``mean_over_seeds`` averages each model's numbers over the seeds.

    python benchmarks/combine_rlhf_seeds.py seed0.json seed1.json --out benchmarks/results/rlhf_rtp_m48_b32.json \
        --command "python benchmarks/compare_rlhf.py ... --seed S --out <file> (S = 0, 1)"
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import merge_results  # noqa: E402

PAIRS = (("rlhf", "base"), ("ra-rlhf", "base"), ("ra-rlhf", "rlhf"))
METRICS = ("avg_reward", "tail_reward", "ppl")


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a − b and its 95 % interval half-width (normal approximation)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return {"mean": statistics.mean(d), "ci95": 1.96 * statistics.stdev(d) / math.sqrt(len(d))}


def combine(seed_results: dict[str, dict]) -> dict:
    by_seed, tail_gap = {}, []
    for seed, r in seed_results.items():
        tail = r["tail_idx"]
        by_seed[seed] = {}
        for x, y in PAIRS:
            if x in r and y in r:
                sx, sy = r[x]["scores"], r[y]["scores"]
                by_seed[seed][f"{x} - {y} avg"] = paired(sx, sy)
                by_seed[seed][f"{x} - {y} tail"] = paired([sx[i] for i in tail], [sy[i] for i in tail])
        if "ra-rlhf - rlhf tail" in by_seed[seed]:
            tail_gap.append(by_seed[seed]["ra-rlhf - rlhf tail"]["mean"])
    models = sorted({m for r in seed_results.values() for m in r if isinstance(r[m], dict) and "avg_reward" in r[m]})
    mean = {m: {k: statistics.mean(r[m][k] for r in seed_results.values()) for k in METRICS}
            for m in models if all(m in r for r in seed_results.values())}
    return {"seeds": seed_results, "paired_by_seed": by_seed, "mean_over_seeds": mean,
            "ra_minus_rl_tail_by_seed": tail_gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="per-seed result files of compare_rlhf.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default="", help="the compare_rlhf.py command line, recorded in the output")
    a = ap.parse_args()
    seeds = {}
    for f in a.inputs:
        r = json.loads(Path(f).read_text())
        seeds[str(r["setting"]["seed"])] = r
    out = combine(seeds)
    merge_results(a.out, out, command=a.command)
    for seed, pairs in out["paired_by_seed"].items():
        print(seed, {k: f"{v['mean']:+.2f} ± {v['ci95']:.2f}" for k, v in pairs.items()})


if __name__ == "__main__":
    main()
