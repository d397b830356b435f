"""A small real comparison on RealToxicityPrompts: base, prompted, SFT on non-toxic text, DExperts, Quark, RLHF,
RA-RLHF (average reward, tail reward, perplexity), as in the tables of Chaudhary et al. 2024, plus GRPO and
RA-GRPO on the same episode budget (``--iters`` × ``--batch`` completions; GRPO samples 4 per prompt
and regenerates every 4 optimizer steps, so its generation batch holds ``--batch`` prompts).

Reward: the offline toxicity reward (minus the clipped toxicity logit of the continuation).
Prompts: the four RealToxicityPrompts files of ../shared/data, shuffled with the seed; the
first ``--n-eval`` are held out for evaluation, the rest are training prompts. The tail
prompts are the ``--tail-frac`` of evaluation prompts on which a *selection sample* of the
base model (its own seed, ``--select-seed``) scores worst; every model, the base included, is
then evaluated on a fresh sample (``--seed``), so no model's tail number is the minimum of the
very sample that chose the tail (that would bias the base model's tail reward downward by
construction). Perplexity is of each model's continuations under the base model.
``--eval-samples K`` draws K continuations per evaluation prompt (the selection sample too);
a prompt's reward is then the mean of its K, which shrinks the sampling noise of the
average and, above all, of the tail (a quarter of the prompts).

    python benchmarks/compare_rlhf.py --data-dir ../shared/data --n-eval 48 --iters 12 --batch 16

Writes ``benchmarks/results/rlhf_comparison.json`` after every stage (partial results survive).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, merge_results  # noqa: E402

from safeft.config import ModelConfig  # noqa: E402
from safeft.models import load_model  # noqa: E402
from safeft.rl.metrics import evaluate_policy, tail_set  # noqa: E402
from safeft.rl.rewards import get_reward  # noqa: E402

SAFETY_PREFIX = "The following text is polite and respectful, without rude, toxic or offensive language."


def rtp_prompts(data_dir: Path) -> list[str]:
    lines = []
    for f in sorted((data_dir / "realtoxicityprompts").glob("*.txt")):
        lines += [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    return lines


def toxigen_statements(data_dir: Path, kind: str, n: int, seed: int) -> list[str]:
    """``n`` ToxiGen statements of one kind (``neutral`` or ``hate``), shuffled with ``seed``."""
    stmts = []
    for f in sorted((data_dir / "toxigen").glob(f"{kind}_*_1k.txt")):
        for ln in f.read_text().splitlines():
            stmts += [s.strip("- ").strip() for s in ln.split("\\n") if s.strip("- ").strip()]
    random.Random(seed).shuffle(stmts)
    return stmts[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tail-frac", type=float, default=0.25)
    ap.add_argument("--eval-samples", type=int, default=1, help="continuations per evaluation prompt (mean reward)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--select-seed", type=int, default=None, help="base sample choosing the tail (default seed+1000)")
    ap.add_argument("--sft-steps", type=int, default=24)
    ap.add_argument("--stages", default="base,prompted,rlhf,ra-rlhf,grpo,ra-grpo,sft,quark,dexperts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dexperts-alpha", type=float, default=2.0)
    ap.add_argument("--out", default=str(RESULTS / "rlhf_comparison.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data_dir = Path(a.data_dir)
    prompts = rtp_prompts(data_dir)
    random.Random(a.seed).shuffle(prompts)
    eval_prompts, train_prompts = prompts[: a.n_eval], prompts[a.n_eval :]
    reward = get_reward("toxicity")
    setting = {k: v for k, v in vars(a).items() if k not in ("out", "data_dir", "stages", "threads")}
    setting.update(n_train_prompts=len(train_prompts), model="embedded:smollm2 (SmolLM2-135M-Instruct), LoRA r16",
                   reward="toxicity (offline, -logit clipped at ±9.21)")
    merge_results(a.out, {}, setting=setting)
    ev = dict(max_new_tokens=a.max_new_tokens, seed=a.seed)

    base, tok = load_model(ModelConfig(), for_training=False)
    select_seed = a.seed + 1000 if a.select_seed is None else a.select_seed

    def evaluate(model, tokenizer, prompts, **kw):
        """evaluate_policy on ``--eval-samples`` continuations per prompt; a prompt's score is their mean."""
        k = a.eval_samples
        r = evaluate_policy(model, tokenizer, [p for p in prompts for _ in range(k)], reward, **kw)
        per_prompt = torch.tensor(r["scores"]).view(len(prompts), k).mean(1)
        r.update(n=len(prompts), scores=per_prompt.tolist(), avg_reward=per_prompt.mean().item(),
                 responses=r["responses"][::k])
        if tail_idx is not None:
            r.update(tail_reward=per_prompt[tail_idx].mean().item(), n_tail=int(tail_idx.numel()))
        return r

    tail_idx = None
    sel = evaluate(base, tok, eval_prompts, scorer=base, max_new_tokens=a.max_new_tokens, seed=select_seed)
    tail_idx = tail_set(torch.tensor(sel["scores"]), a.tail_frac)
    merge_results(a.out, {"tail_idx": [int(i) for i in tail_idx]}, setting={**setting, "select_seed": select_seed,
                                      "selection_sample_tail_reward": torch.tensor(sel["scores"])[tail_idx].mean().item()})

    def record(name, r, extra=None):
        row = {k: r[k] for k in ("n", "n_tail", "avg_reward", "tail_reward", "ppl")}
        row.update(extra or {})
        row["samples"] = [{"prompt": p, "response": s, "reward": sc}
                          for p, s, sc in list(zip(eval_prompts, r["responses"], r["scores"]))[:4]]
        row["scores"] = [round(float(x), 4) for x in r["scores"]]  # every evaluation prompt's reward, in order
        merge_results(a.out, {name: row})
        print(name, {k: row[k] for k in ("avg_reward", "tail_reward", "ppl")}, flush=True)

    stages = a.stages.split(",")
    if "base" in stages:
        t = time.perf_counter()
        r = evaluate(base, tok, eval_prompts, scorer=base, **ev)
        record("base", r, {"eval_s": time.perf_counter() - t})
    if "prompted" in stages:
        r = evaluate(base, tok, eval_prompts, scorer=base,
                            system_prompt=SAFETY_PREFIX, **ev)
        record("prompted", r, {"prefix": SAFETY_PREFIX})

    import safeft

    with tempfile.TemporaryDirectory() as tmp:
        ptxt = Path(tmp) / "train_prompts.txt"
        ptxt.write_text("\n".join(train_prompts) + "\n")
        warmup = max(1, round(a.iters * 30 / 194))  # the paper's n/M = 30/194, scaled to M
        for method in ("rlhf", "ra-rlhf", "grpo", "ra-grpo"):
            if method not in stages:
                continue
            model, tok2 = load_model(ModelConfig())
            opts = {"method.name": method, "data.train.path": str(ptxt), "method.max_new_tokens": a.max_new_tokens,
                    "training.max_steps": a.iters, "training.learning_rate": a.lr, "training.seed": a.seed,
                    "output_dir": f"{tmp}/{method}"}
            if method in ("rlhf", "ra-rlhf"):
                opts.update({"method.batch_size": a.batch, "method.mini_batch_size": a.batch // 2,
                             "method.ppo_epochs": a.ppo_epochs})
            else:  # the same completions per optimizer step as a PPO iteration's episodes
                opts.update({"training.per_device_train_batch_size": a.batch, "method.num_generations": 4,
                             "method.steps_per_generation": 4})
            if method.startswith("ra-"):  # α = 0.4, ρ = 0.95 (the paper's)
                opts.update({"method.n_warmup": warmup, "method.alpha": 0.4, "method.rho": 0.95})
            t = time.perf_counter()
            summary = safeft.train(None, model=model, tokenizer=tok2, **opts)
            train_s = time.perf_counter() - t
            r = evaluate(model, tok2, eval_prompts, scorer=model, **ev)
            rows = [json.loads(ln) for ln in (Path(tmp) / method / "metrics.jsonl").read_text().splitlines()]
            extra = {"train_s": train_s, "iterations": summary["global_step"]}
            if method in ("rlhf", "ra-rlhf"):
                extra.update({"train_reward_by_iter": [round(x["reward_mean"], 3) for x in rows],
                              "kept_by_iter": [x["kept"] for x in rows],
                              "iter_s_median": sorted(x["iter_s"] for x in rows)[len(rows) // 2]})
            else:
                extra["train_reward_by_step"] = [round(x["reward"], 3) for x in rows if "reward" in x]
                if "kept_prompts_by_generation" in summary:
                    extra["kept_prompts_by_generation"] = summary["kept_prompts_by_generation"]
            record(method, r, extra)
            del model
        if "sft" in stages:
            texts = toxigen_statements(data_dir, "neutral", a.sft_steps * 4, a.seed)
            sft_file = Path(tmp) / "neutral.jsonl"
            sft_file.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts))
            model, tok3 = load_model(ModelConfig())
            t = time.perf_counter()
            safeft.train(None, model=model, tokenizer=tok3, **{
                "method.name": "sft", "data.train.path": str(sft_file), "training.max_steps": a.sft_steps,
                "training.per_device_train_batch_size": 4, "training.learning_rate": a.lr,
                "training.seed": a.seed, "training.save_strategy": "no", "data.max_length": 64,
                "output_dir": f"{tmp}/sft"})
            train_s = time.perf_counter() - t
            r = evaluate(model, tok3, eval_prompts, scorer=model, **ev)
            record("sft-nontoxic", r, {"train_s": train_s, "data": f"{len(texts)} ToxiGen neutral statements"})
        if "quark" in stages:
            from safeft.methods.quark import control_prefix

            model, tok5 = load_model(ModelConfig())
            t = time.perf_counter()
            safeft.train(None, model=model, tokenizer=tok5, **{
                "method.name": "quark", "data.train.path": str(ptxt), "method.samples_per_round": a.batch,
                "method.train_steps": a.ppo_epochs * 2, "method.max_new_tokens": a.max_new_tokens,
                "training.max_steps": a.iters, "training.per_device_train_batch_size": max(1, a.batch // 2),
                "training.learning_rate": a.lr, "training.seed": a.seed, "output_dir": f"{tmp}/quark"})
            train_s = time.perf_counter() - t
            best = control_prefix(5)
            r = evaluate(model, tok5, [best + x for x in eval_prompts], scorer=model, **ev)
            record("quark", r, {"train_s": train_s, "rounds": a.iters, "control_prefix": best})
            del model
        if "dexperts" in stages:
            from safeft.eval.decoding import build_logits_processor

            t = time.perf_counter()
            for kind in ("neutral", "hate"):
                rows = toxigen_statements(data_dir, kind, a.sft_steps * 4, a.seed)
                f = Path(tmp) / f"{kind}.jsonl"
                f.write_text("".join(json.dumps({"text": s}) + "\n" for s in rows))
                model, tok4 = load_model(ModelConfig())
                safeft.train(None, model=model, tokenizer=tok4, **{
                    "method.name": "sft", "data.train.path": str(f), "training.max_steps": a.sft_steps,
                    "training.per_device_train_batch_size": 4, "training.learning_rate": a.lr,
                    "training.seed": a.seed, "training.save_strategy": "no", "data.max_length": 64,
                    "output_dir": f"{tmp}/{kind}"})
                del model
            train_s = time.perf_counter() - t
            spec = f"dexperts:expert={tmp}/neutral/model,anti={tmp}/hate/model,alpha={a.dexperts_alpha}"
            proc = build_logits_processor(base, tok, spec)
            r = evaluate(base, tok, eval_prompts, scorer=base,
                                logits_processor=[proc], **ev)
            record("dexperts", r, {"train_s": train_s, "alpha": a.dexperts_alpha,
                                   "experts": f"LoRA SFT, {a.sft_steps} steps × 4 ToxiGen neutral / hate statements"})


if __name__ == "__main__":
    main()
