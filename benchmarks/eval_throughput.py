"""Generation throughput: safeft's batched generate() against a one-prompt-at-a-time
``model.generate`` loop, same prompts, same model (SmolLM2-135M-Instruct), same process.

Both decode greedily with the chat template and the same max_new_tokens; tokens/s counts the
generated tokens up to and including end-of-sequence (padding after it is not counted). The
two are timed alternately (baseline, safeft, baseline, ...) so a change in machine load hits
both, and the median of the repeats is kept.

    python benchmarks/eval_throughput.py [--prompts 32] [--max-new-tokens 32] [--batch-size 16]

Writes benchmarks/results/eval_throughput.json: {"baseline_tok_s", "safeft_tok_s", "speedup", ...}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, merge_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def count_new_tokens(seqs: torch.Tensor, prompt_width: int, eos_ids: set[int], pad_id: int) -> int:
    """Generated tokens per row up to and including the first EOS."""
    total = 0
    for row in seqs[:, prompt_width:].tolist():
        n = 0
        for t in row:
            n += 1
            if t in eos_ids:
                break
        total += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import GenerationConfig

    from safeft.eval.generate import format_prompts, generate
    from safeft.eval.suites import load_suite
    from safeft.models import load_model

    model, tok = load_model("embedded:smollm2", for_training=False)
    model.eval()
    prompts = [it.prompt for it in load_suite("donotanswer", data_dir=args.data_dir, n=args.prompts, seed=0)]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tok.pad_token_id
    texts = format_prompts(tok, prompts, chat=True)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos, use_cache=True)

    # instrument safeft's generate to count tokens exactly as the baseline does
    counted = {"n": 0}
    real_generate = model.generate

    def counting_generate(*a, **k):
        seqs = real_generate(*a, **k)
        counted["n"] += count_new_tokens(seqs, k["input_ids"].shape[1], eos_ids, pad)
        return seqs

    def baseline():
        n = 0
        with torch.no_grad():
            for t in texts:
                enc = tok(t, add_special_tokens=False, return_tensors="pt")
                seqs = model.generate(**enc, generation_config=cfg)
                n += count_new_tokens(seqs, enc["input_ids"].shape[1], eos_ids, pad)
        return n

    def ours():
        counted["n"] = 0
        model.generate = counting_generate
        try:
            generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        finally:
            del model.generate
        return counted["n"]

    ours()  # warm-up (allocator, kernels)
    base_rates, our_rates, tokens = [], [], {}
    for _ in range(args.repeats):
        for name, fn, rates in (("baseline", baseline, base_rates), ("safeft", ours, our_rates)):
            t0 = time.perf_counter()
            n = fn()
            rates.append(n / (time.perf_counter() - t0))
            tokens[name] = n
    base, mine = statistics.median(base_rates), statistics.median(our_rates)
    entry = {
        "baseline_tok_s": round(base, 2),
        "safeft_tok_s": round(mine, 2),
        "speedup": round(mine / base, 2),
        "baseline": "one-prompt-at-a-time model.generate loop (greedy, KV cache, chat template)",
        "model": "SmolLM2-135M-Instruct (embedded:smollm2), float32, CPU",
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "generated_tokens": tokens,
        "repeats": args.repeats,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    merge_results(RESULTS / "eval_throughput.json", entry)
    print(entry)


if __name__ == "__main__":
    main()
