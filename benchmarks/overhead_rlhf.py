"""Seconds per PPO iteration of ``rlhf`` and ``ra-rlhf`` (generation + scoring + update).

Both run in this process on the same B RealToxicityPrompts prompts, each with its own
fresh LoRA policy (SmolLM2-135M, r16), iterations interleaved (rlhf, ra-rlhf, rlhf, ...)
so a load change on the machine hits both; the medians are stored. ra-rlhf is measured at
its steady state, keeping ⌈α·B⌉ episodes (α = 0.4), and in its warm-up (α′ = 1), where it
is plain PPO plus the ranking of the returns.

    python benchmarks/overhead_rlhf.py --data-dir ../shared/data --batch 8 --repeats 3

Adds ``rlhf/lora`` and ``ra-rlhf/lora`` to ``benchmarks/results/overhead.json`` (the
ra-rlhf entry records the rlhf numbers it was compared with under ``baseline``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, merge_results  # noqa: E402

from safeft.config import ModelConfig  # noqa: E402
from safeft.models import load_model  # noqa: E402
from safeft.rl.ppo import PPOParams, PPOTrainer  # noqa: E402
from safeft.rl.rewards import get_reward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "overhead.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lines = (Path(a.data_dir) / "realtoxicityprompts" / "rtp_insult.txt").read_text().splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip()][: a.batch]
    params = PPOParams(batch_size=a.batch, mini_batch_size=max(1, a.batch // 2), ppo_epochs=a.ppo_epochs,
                       max_new_tokens=a.max_new_tokens)
    reward = get_reward("toxicity")
    k_tail = math.ceil(a.alpha * a.batch - 1e-9)
    modes = {"rlhf": a.batch, "ra-rlhf": k_tail, "ra-rlhf-warmup": a.batch}
    trainers, times = {}, {m: [] for m in modes}
    for m in modes:
        model, tok = load_model(ModelConfig())
        trainers[m] = PPOTrainer(model, tok, reward, params, learning_rate=1e-4, seed=0)
    for m, k in modes.items():  # warm-up iteration, not timed (allocator, first-call costs)
        trainers[m].step(prompts, keep=k)
    parts = {m: [] for m in modes}
    for _ in range(a.repeats):
        for m, k in modes.items():
            st = trainers[m].step(prompts, keep=k)
            times[m].append(st["iter_s"])
            parts[m].append({key: round(st[key], 3) for key in ("gen_s", "score_s", "update_s", "response_len")})
    med = {m: statistics.median(v) for m, v in times.items()}
    setting = {"model": "SmolLM2-135M-Instruct, LoRA r16 all-linear, fp32", "batch_B": a.batch,
               "max_new_tokens": a.max_new_tokens, "ppo_epochs": a.ppo_epochs,
               "mini_batch_size": params.mini_batch_size, "repeats": a.repeats, "threads": a.threads,
               "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    base = {"name": "rlhf/lora", "iter_s": round(med["rlhf"], 3), "iters_s": [round(x, 3) for x in times["rlhf"]]}
    entries = {
        "rlhf/lora": {**base, "parts": parts["rlhf"], "setting": setting},
        "ra-rlhf/lora": {
            "iter_s": round(med["ra-rlhf"], 3),
            "iters_s": [round(x, 3) for x in times["ra-rlhf"]],
            "kept": k_tail,
            "ratio_vs_rlhf": round(med["ra-rlhf"] / med["rlhf"], 3),
            "warmup_iter_s": round(med["ra-rlhf-warmup"], 3),
            "warmup_ratio_vs_rlhf": round(med["ra-rlhf-warmup"] / med["rlhf"], 3),
            "parts": parts["ra-rlhf"],
            "baseline": base,
            "setting": setting,
        },
    }
    merge_results(a.out, entries)
    for name, e in entries.items():
        print(name, e["iter_s"], e.get("ratio_vs_rlhf", ""))


if __name__ == "__main__":
    main()
