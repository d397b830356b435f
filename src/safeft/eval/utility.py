"""Utility: what the fine-tune was for, measured next to safety.

- ``perplexity``: token-weighted perplexity, exp(sum NLL / sum tokens), on held-out domain
  text (PubMedQA test-split abstracts + long answers by default, or any texts passed in);
  CI by bootstrap over documents.
- ``pubmedqa``: PubMedQA PQA-L test questions (Jin et al. 2019), in the chat format safeft
  trains on (:func:`safeft.data.readers.pubmedqa_prompt`). ``pubmedqa_acc_loglik``: the
  answer is the option (Yes / No / Maybe, as the assistant's first word) with the highest
  log-likelihood; ``pubmedqa_acc_gen``: greedy generation, the first yes/no/maybe word is the
  answer (none found = wrong).
- ``gsm8k``: GSM8K test exact match (Cobbe et al. 2021): the number after ``####`` in the
  answer, else the last number in it, compared with the reference as a number.
- lm-evaluation-harness tasks (MMLU, ...): only when ``lm_eval`` is installed
  (:func:`lm_eval_available`); this module does not call it otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
from pathlib import Path

import torch

from ..config import DatasetSpec
from ..data.loaders import load_rows
from ..data.readers import GSM8K_HUB, PUBMEDQA_HUB
from ..errors import ConfigError
from ..models import unwrap
from .generate import format_prompts, generate
from .metrics import bootstrap_ratio, wilson

log = logging.getLogger(__name__)

UTILITY_TASKS = ("perplexity", "pubmedqa", "gsm8k")
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _sample(rows: list, n: int | None, seed: int) -> list:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in (order[:n] if n else order)]


def _pubmedqa_rows(data_dir) -> list[dict]:
    """The official PubMedQA test questions, from ``data_dir`` or the hub (the data loader's reader)."""
    return load_rows(DatasetSpec(path=PUBMEDQA_HUB[0], reader="pubmedqa", split="test"), data_dir)


def _gsm8k_rows(data_dir) -> list[dict]:
    """GSM8K test problems, from ``data_dir`` or the hub (the data loader's reader)."""
    return load_rows(DatasetSpec(path=GSM8K_HUB[0], reader="gsm8k", split="test"), data_dir)


@torch.no_grad()
def sequence_nll(model, tokenizer, texts: list[str], *, max_length: int = 512, batch_size: int = 8,
                 prefix_lens: list[int] | None = None) -> tuple[list[float], list[int]]:
    """Per text: summed next-token NLL and the number of scored tokens. ``prefix_lens[i]``
    tokens at the start of text i are context only (not scored)."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll, count = [0.0] * len(texts), [0] * len(texts)
    was = inner.training
    inner.eval()
    try:
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):  # right-padded: positions need no correction
                ids[r, :len(enc[i])] = torch.tensor(enc[i])
                mask[r, :len(enc[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            firsts = [max(1, prefix_lens[i] if prefix_lens else 1) for i in idx]
            start = min(firsts) - 1  # the LM head runs only from here (context-only prefixes skip it)
            logits = inner(input_ids=ids, attention_mask=mask, logits_to_keep=width - start).logits[:, :-1].float()
            target = ids[:, start + 1:]
            lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            for r, i in enumerate(idx):
                # logits column c is position start + c, which predicts token start + c + 1
                sel = lp[r, firsts[r] - 1 - start:len(enc[i]) - 1 - start]
                nll[i] = float(-sel.sum())
                count[i] = int(sel.numel())
    finally:
        inner.train(was)
    return nll, count


def perplexity(model, tokenizer, texts: list[str], *, max_length: int = 512, batch_size: int = 8,
               seed: int = 0) -> dict:
    """Token-weighted perplexity with a bootstrap CI over documents."""
    import numpy as np

    nll, count = sequence_nll(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return bootstrap_ratio(nll, count, seed=seed, transform=np.exp)


def _assistant_prefix(tokenizer, prompt: str) -> str:
    return format_prompts(tokenizer, [prompt], chat=True)[0]


def _next_token_nll(model, tokenizer, prefixes: list[str], option_ids: list[int], batch_size: int,
                    max_length: int) -> list[float]:
    """−log p(option token | prefix) for ``len(option_ids) // len(prefixes)`` options a prefix."""
    per = len(option_ids) // len(prefixes)
    inner = unwrap(model)
    device = next(inner.parameters()).device
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"][-(max_length - 1):] for t in prefixes]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [0.0] * len(option_ids)
    was = inner.training
    inner.eval()
    try:
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        with torch.no_grad():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                width = max(len(enc[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(idx):  # left-padded: the last column is every prefix's end
                    ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                    mask[r, width - len(enc[i]):] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = inner(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=pos.to(device), logits_to_keep=1).logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                for r, i in enumerate(idx):
                    for j in range(per):
                        out[per * i + j] = float(-logp[r, option_ids[per * i + j]])
    finally:
        inner.train(was)
    return out


def _pubmedqa_options(tokenizer, rows: list[dict], max_length: int):
    """Per row: its assistant prefix, the three option texts (prefix + Yes/No/Maybe), the
    prefix length, and each option's single next token id (None where an option is not exactly
    one token after its prefix)."""
    texts, prefix_lens, prefixes, option_ids = [], [], [], []
    for r in rows:
        prefix = _assistant_prefix(tokenizer, r["prompt"])
        p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        prefixes.append(prefix)
        for opt in PUBMEDQA_OPTIONS:
            texts.append(prefix + opt.capitalize())
            prefix_lens.append(len(p_ids))
            full = tokenizer(texts[-1], add_special_tokens=False)["input_ids"]
            single = len(full) == len(p_ids) + 1 and full[: len(p_ids)] == p_ids and len(full) <= max_length
            option_ids.append(full[-1] if single else None)
    return texts, prefix_lens, prefixes, option_ids


def _pubmedqa_scored(rows: list[dict], nll: list[float]) -> tuple[dict, list[dict]]:
    details, correct = [], 0
    for i, r in enumerate(rows):
        scores = [-nll[3 * i + j] for j in range(3)]
        pred = PUBMEDQA_OPTIONS[max(range(3), key=lambda j: scores[j])]
        correct += pred == r["label"]
        details.append({"question": r["question"], "label": r["label"], "pred": pred,
                        "loglik": dict(zip(PUBMEDQA_OPTIONS, scores))})
    return wilson(correct, len(rows)), details


def pubmedqa_loglik(model, tokenizer, rows: list[dict], *, batch_size: int = 8,
                    max_length: int = 1024) -> tuple[dict, list[dict]]:
    """Accuracy of argmax over options of log P(option | prompt) (options as the assistant's
    first word, capitalised as in safeft's training format)."""
    options = _pubmedqa_options(tokenizer, rows, max_length)
    return _pubmedqa_scored(rows, _options_nll(model, tokenizer, options, batch_size, max_length))


def _options_nll(model, tokenizer, options, batch_size: int, max_length: int) -> list[float]:
    texts, prefix_lens, prefixes, option_ids = options
    if all(t is not None for t in option_ids):
        # every option is one token after its prefix: one forward per question scores all
        # three from the same next-token distribution (3x cheaper, exactly the same numbers)
        return _next_token_nll(model, tokenizer, prefixes, option_ids, batch_size, max_length)
    nll, _ = sequence_nll(model, tokenizer, texts, prefix_lens=prefix_lens, batch_size=batch_size,
                          max_length=max_length)
    return nll


def pubmedqa(model, tokenizer, rows: list[dict], *, batch_size: int = 8, max_new_tokens: int = 16,
             seed: int = 0, max_length: int = 1024) -> tuple[dict, list[dict], dict, list[dict]]:
    """Both PubMedQA accuracies: ``(loglik, loglik details, gen, gen details)``.

    Where the three options are the same single tokens for every question (the usual case),
    the log-likelihoods are read off the first step of the greedy generation: one prefill of
    the long abstract serves both metrics, instead of one for each.
    """
    options = _pubmedqa_options(tokenizer, rows, max_length)
    option_ids = options[3]
    shared = all(t is not None for t in option_ids) and all(
        option_ids[3 * i: 3 * i + 3] == option_ids[:3] for i in range(len(rows)))
    prompts = [r["prompt"] for r in rows]
    if shared:
        gens, scores = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                seed=seed, max_prompt_tokens=max_length - 1, score_token_ids=option_ids[:3])
        loglik, loglik_details = _pubmedqa_scored(rows, [-x for row in scores for x in row])
    else:
        loglik, loglik_details = _pubmedqa_scored(rows, _options_nll(model, tokenizer, options, batch_size, max_length))
        gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    preds = [parse_pubmedqa(g) for g in gens]
    gen = wilson(sum(p == r["label"] for p, r in zip(preds, rows)), len(rows))
    gen_details = [{"question": r["question"], "label": r["label"], "response": g, "pred": p}
                   for r, g, p in zip(rows, gens, preds)]
    return loglik, loglik_details, gen, gen_details


def parse_pubmedqa(text: str) -> str | None:
    m = re.search(r"\b(yes|no|maybe)\b", text.lower())
    return m.group(1) if m else None


def parse_number(text: str) -> str | None:
    """The answer after ``####`` if present, else the last number; commas and a trailing
    ``.`` removed."""
    tail = text.split("####")[-1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    if not nums:
        return None
    pick = nums[0] if "####" in text else nums[-1]
    return pick.replace(",", "").rstrip(".")


def same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a.strip() == b.strip()


def run_utility(model, tokenizer, tasks: list[str], *, data_dir=None, n: int | None = None, seed: int = 0,
                batch_size: int = 8, out_dir: str | Path | None = None, ppl_texts: list[str] | None = None,
                gen_max_new_tokens: int = 16, gsm8k_max_new_tokens: int = 256) -> dict:
    """The utility metrics of ``tasks`` (see the module doc), each ``{"value","lo","hi","n"}``.
    Per-item details go to ``out_dir/utility/<task>.jsonl``."""
    unknown = [t for t in tasks if t not in UTILITY_TASKS]
    if unknown:
        hint = " (lm-evaluation-harness is not installed)" if not lm_eval_available() else ""
        raise ConfigError(f"unknown utility task {unknown[0]!r}; available: {', '.join(UTILITY_TASKS)}{hint}",
                          field="utility")
    out: dict[str, dict] = {}
    details: dict[str, list[dict]] = {}
    if "perplexity" in tasks:
        texts = ppl_texts or [r["text"] for r in _sample(_pubmedqa_rows(data_dir), n, seed)]
        out["perplexity"] = perplexity(model, tokenizer, texts, batch_size=batch_size, seed=seed)
    if "pubmedqa" in tasks:
        rows = _sample(_pubmedqa_rows(data_dir), n, seed)
        (out["pubmedqa_acc_loglik"], details["pubmedqa_loglik"],
         out["pubmedqa_acc_gen"], details["pubmedqa_gen"]) = pubmedqa(
            model, tokenizer, rows, batch_size=batch_size, max_new_tokens=gen_max_new_tokens, seed=seed)
    if "gsm8k" in tasks:
        rows = _sample(_gsm8k_rows(data_dir), n, seed)
        gens = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=gsm8k_max_new_tokens,
                        batch_size=batch_size, seed=seed)
        preds = [parse_number(g) for g in gens]
        out["gsm8k_em"] = wilson(sum(same_number(p, r["answer"]) for p, r in zip(preds, rows)), len(rows))
        details["gsm8k"] = [{"question": r["question"], "answer": r["answer"], "response": g, "pred": p}
                            for r, g, p in zip(rows, gens, preds)]
    if out_dir is not None and details:
        d = Path(out_dir) / "utility"
        d.mkdir(parents=True, exist_ok=True)
        for task, rows in details.items():
            (d / f"{task}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


__all__ = ["UTILITY_TASKS", "lm_eval_available", "parse_number", "parse_pubmedqa", "perplexity",
           "pubmedqa", "pubmedqa_loglik", "run_utility", "same_number", "sequence_nll"]
