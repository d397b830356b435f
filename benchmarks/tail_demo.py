"""A controlled tail test: does RA-RLHF's CVaR filter raise the tail reward more than RLHF?

The task is built so that the tail is real and measurable. A word-level tokenizer over 95
words, 4 of them *shouted* (LOUD, YES, NOW, STOP); a random tiny Llama emits them at about
the uniform rate, u ≈ 4 % of its words. Prompts are of two kinds, ``Easy request : write
about A and B .`` (80 %) and ``Hard request : ...`` (20 %), and the reward (deterministic
given prompt and response, registered as ``tail-demo``) is

- hard prompts: r = 10·u (the base model scores ≈ 0.3: the tail),
- easy prompts: r = 10·(easy_base + easy_slope·u); by default 10·(1 − 0.5·u), so the base
  model is near the maximum of 10 and shouting there costs a little (``--easy-base 0.9
  --easy-slope 0.1``: shouting helps a little everywhere).

The hard prompts are the lowest returns of every batch, and they carry a real learning
signal (each shouted word is worth 10/12 on a 12-word response).

``--hidden-kind``: the prompt no longer says which kind it is (``request : write about A and
B .`` for both); a prompt is hard when a hash of its topic pair falls in the lowest
``hard_frac`` of the hash range, a fixed but patternless function of the pair. A policy can
at best memorise the kinds of its training prompts; on held-out prompts it must choose one
shouting rate for both kinds. That is where the mean and the CVaR disagree: with the default
easy reward the mean is 8 − 2·u (shouting loses on average), while the tail's reward is 10·u.

The policy is the tiny Llama (2 layers, hidden 64, a fresh one per seed), fully fine-tuned:
LoRA cannot move the output distribution of a model this small, whose tied output rows and
final norm it leaves frozen. ``rlhf`` and ``ra-rlhf`` (α = 0.4, n = round(30/194·M),
ρ = 0.95) run through the real engine with the same seed, iterations, batch and learning
rate. Evaluation: ``--samples`` sampled continuations per held-out prompt; average reward
over the 80/20 mix, tail reward (mean on the hard prompts), CVaR₁₀ (mean of the worst 10 %
of all sampled rewards), the easy prompts' reward, and the perplexity of the continuations
under the base model; per seed, and mean ± standard error over seeds, with the paired
per-seed difference RA-RLHF − RLHF.

    OMP_WAIT_POLICY=passive nice -n 10 python benchmarks/tail_demo.py
    OMP_WAIT_POLICY=passive nice -n 10 python benchmarks/tail_demo.py --easy-base 0.9 --easy-slope 0.1 --tag shout-helps

Writes the entry ``--tag`` of ``benchmarks/results/rlhf_tail_demo.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, merge_results  # noqa: E402

import safeft  # noqa: E402
from safeft.config import LoraConfig, ModelConfig  # noqa: E402
from safeft.models import load_model, tiny_llama  # noqa: E402
from safeft.rl.metrics import evaluate_policy  # noqa: E402
from safeft.rl.rewards import register_reward  # noqa: E402

TOPICS = ["rivers", "bread", "trains", "winter", "music", "cats", "gardens", "markets", "bridges", "storms",
          "books", "coffee", "islands", "robots", "forests", "letters", "clocks", "boats", "lamps", "mountains"]
FILLER = ("the a of to in is it was on with as at by from this that but not or have had one all were when we "
          "there can an your which their said if do will each how up other out many then them these so some "
          "her would make like him into time has look two more go see").split()
TARGET = ("LOUD", "YES", "NOW", "STOP")  # the shouted words
PROMPT_WORDS = ["Easy", "Hard", "request", ":", "write", "about", "and", "."]
MODELS = ("base", "rlhf", "ra-rlhf")
METRICS = ("avg", "tail", "cvar10", "easy", "ppl")


def hash_hard(a: str, b: str, hard_frac: float) -> bool:
    """Whether the topic pair (a, b) is hard under ``--hidden-kind``: its CRC-32 is in the lowest
    ``hard_frac`` of the range."""
    return zlib.crc32(f"{a} {b}".encode()) % 10_000 < hard_frac * 10_000


def is_hard(prompt: str, hard_frac: float = 0.2) -> bool:
    """``Hard request : ...`` prompts, or hidden-kind prompts (``request : write about A and B .``)
    whose pair is :func:`hash_hard`."""
    words = prompt.split()
    return words[0] == "Hard" or (words[0] == "request" and hash_hard(words[4], words[6], hard_frac))


def shout(text: str) -> float:
    """Fraction of the words of ``text`` that are shouted (in :data:`TARGET`; 0 for an empty text)."""
    words = text.split()
    return sum(w in TARGET for w in words) / len(words) if words else 0.0


@register_reward("tail-demo")
def tail_demo_reward(scale: float = 10.0, easy_base: float = 1.0, easy_slope: float = -0.5, hard_frac: float = 0.2):
    """r = ``scale``·u on hard prompts, ``scale``·(``easy_base`` + ``easy_slope``·u) on easy ones
    (u: :func:`shout`; ``hard_frac`` only decides hidden-kind prompts, see :func:`is_hard`)."""

    def reward(prompts, responses):
        return scale * torch.tensor([shout(r) if is_hard(p, hard_frac) else easy_base + easy_slope * shout(r)
                                     for p, r in zip(prompts, responses)])

    return reward


def word_tokenizer():
    """A word-level tokenizer over the task's 95 words (whitespace-split; decoding joins with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *PROMPT_WORDS, *TOPICS, *FILLER, *TARGET]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False)


def make_prompts(n_train: int, n_eval: int, hard_frac: float, hidden: bool = False) -> tuple[list[str], list[str]]:
    """Disjoint training and evaluation prompts (distinct topic pairs), each set ⌈hard_frac·n⌉ hard;
    ``hidden``: prompts that do not name their kind, hard by :func:`hash_hard` (about hard_frac)."""
    pairs = [(a, b) for a in TOPICS for b in TOPICS if a != b]
    random.Random(0).shuffle(pairs)
    if hidden:
        prompts = [f"request : write about {a} and {b} ." for a, b in pairs]
        return prompts[:n_train], prompts[n_train : n_train + n_eval]
    sets = []
    for chunk in (pairs[:n_train], pairs[n_train : n_train + n_eval]):
        n_hard = math.ceil(hard_frac * len(chunk) - 1e-9)
        sets.append([f"{'Hard' if i < n_hard else 'Easy'} request : write about {a} and {b} ."
                     for i, (a, b) in enumerate(chunk)])
    return sets[0], sets[1]


def evaluate(model, tok, base, prompts: list[str], reward, a) -> dict:
    rep = [p for p in prompts for _ in range(a.samples)]
    r = evaluate_policy(model, tok, rep, reward, scorer=base, max_new_tokens=a.max_new_tokens, seed=a.eval_seed,
                        batch_size=64)
    s = torch.tensor(r["scores"])
    hard = torch.tensor([is_hard(p, a.hard_frac) for p in rep])
    worst = torch.sort(s).values[: math.ceil(0.1 * len(s))]
    return {"avg": s.mean().item(), "tail": s[hard].mean().item(), "easy": s[~hard].mean().item(),
            "cvar10": worst.mean().item(), "ppl": r["ppl"],
            "examples": [{"prompt": p, "response": t, "reward": round(x, 4)}
                         for p, t, x in list(zip(rep, r["responses"], r["scores"]))[:: a.samples][:4]]}


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--iters", type=int, default=30, help="M, PPO iterations")
    ap.add_argument("--batch", type=int, default=80, help="B, episodes per iteration")
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--mini-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--easy-base", type=float, default=1.0)
    ap.add_argument("--easy-slope", type=float, default=-0.5, help="easy prompts: r = 10·(base + slope·u)")
    ap.add_argument("--hard-frac", type=float, default=0.2)
    ap.add_argument("--hidden-kind", action="store_true",
                    help="prompts do not say whether they are hard; a hash of the topic pair decides")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-eval", type=int, default=50, help="held-out prompts (same easy/hard mix)")
    ap.add_argument("--samples", type=int, default=8, help="continuations per evaluation prompt")
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--alpha", type=float, default=0.4)
    ap.add_argument("--rho", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="shout-costs-on-easy", help="the entry of the results file")
    ap.add_argument("--out", default=str(RESULTS / "rlhf_tail_demo.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    n_warmup = round(a.iters * 30 / 194)
    reward_options = {"easy_base": a.easy_base, "easy_slope": a.easy_slope, "hard_frac": a.hard_frac}
    reward = tail_demo_reward(**reward_options)
    tok = word_tokenizer()
    train_prompts, eval_prompts = make_prompts(a.n_train, a.n_eval, a.hard_frac, a.hidden_kind)
    setting = {k: v for k, v in vars(a).items() if k not in ("out", "threads", "tag")}
    setting.update(n_warmup=n_warmup, n_hard={"train": sum(is_hard(p, a.hard_frac) for p in train_prompts),
                                              "eval": sum(is_hard(p, a.hard_frac) for p in eval_prompts)},
                   reward=f"hard: 10·u; easy: 10·({a.easy_base} + {a.easy_slope}·u); "
                   f"u = fraction of words in {list(TARGET)}",
                   model=f"tiny_llama(hidden 64, 2 layers, word-level vocabulary of {len(tok)}, seed = run seed), "
                   "full fine-tuning")
    per_seed: dict[str, dict[str, dict]] = {m: {} for m in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        ptxt = Path(tmp) / "train_prompts.txt"
        ptxt.write_text("\n".join(train_prompts) + "\n")
        for seed in seeds:
            model_dir = Path(tmp) / f"tiny-{seed}"
            tiny_llama(vocab_size=len(tok), hidden=64, layers=2, seed=seed).save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
            full_ft = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(enabled=False))
            base, _ = load_model(full_ft, for_training=False)
            per_seed["base"][str(seed)] = evaluate(base, tok, base, eval_prompts, reward, a)
            for method in ("rlhf", "ra-rlhf"):
                model, _ = load_model(full_ft)
                opts = {"method.name": method, "data.train.path": str(ptxt), "method.reward": "tail-demo",
                        "method.reward_options": reward_options,
                        "method.batch_size": a.batch, "method.mini_batch_size": a.mini_batch,
                        "method.ppo_epochs": a.ppo_epochs, "method.max_new_tokens": a.max_new_tokens,
                        "training.max_steps": a.iters, "training.learning_rate": a.lr, "training.seed": seed,
                        "training.save_strategy": "no", "output_dir": f"{tmp}/{method}-{seed}"}
                if method == "ra-rlhf":
                    opts.update({"method.alpha": a.alpha, "method.n_warmup": n_warmup, "method.rho": a.rho})
                t = time.perf_counter()
                safeft.train(None, model=model, tokenizer=tok, **opts)
                row = evaluate(model, tok, base, eval_prompts, reward, a)
                row["train_s"] = time.perf_counter() - t
                log = (Path(tmp) / f"{method}-{seed}" / "metrics.jsonl").read_text().splitlines()
                log = [json.loads(ln) for ln in log]
                row["kept_by_iter"] = [x["kept"] for x in log]
                row["train_reward_by_iter"] = [round(x["reward_mean"], 3) for x in log]
                per_seed[method][str(seed)] = row
                print(f"seed {seed} {method}: " + ", ".join(f"{k} {row[k]:.3f}" for k in METRICS), flush=True)
            print(f"seed {seed} base: " + ", ".join(f"{k} {per_seed['base'][str(seed)][k]:.3f}" for k in METRICS),
                  flush=True)
    summary = {m: {k: mean_se([per_seed[m][str(s)][k] for s in seeds]) for k in METRICS} for m in MODELS}
    diff = {k: mean_se([per_seed["ra-rlhf"][str(s)][k] - per_seed["rlhf"][str(s)][k] for s in seeds])
            for k in METRICS}
    merge_results(a.out, {a.tag: {"setting": setting, "per_seed": per_seed, "summary": summary,
                                  "ra_minus_rlhf": diff}})
    print(f"\n{len(seeds)} seeds, mean ± standard error; M = {a.iters}, B = {a.batch}, n = {n_warmup}\n")
    print("| model | avg reward ↑ | tail reward (hard prompts) ↑ | CVaR₁₀ ↑ | easy prompts ↑ | perplexity |")
    print("|---|---|---|---|---|---|")
    for name, row in [*summary.items(), ("RA-RLHF − RLHF (paired)", diff)]:
        print(f"| {name} | " + " | ".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in METRICS) + " |")


if __name__ == "__main__":
    main()
