"""Batched generation for evaluation: left-padded, length-bucketed, KV-cached.

Prompts are tokenized once, sorted by length (longest first, so an out-of-memory batch shows
up at once), cut into batches of similar lengths (little padding), left-padded (so every
row's next token sits in the last column), decoded with ``model.generate`` (KV cache on),
and returned in the caller's order. Sampling is seeded and runs inside a forked RNG, so
evaluating in the middle of training leaves the training RNG untouched.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..models import unwrap


def format_prompts(tokenizer, prompts: list[str], chat: bool, system_prompt: str | None = None) -> list[str]:
    """Chat template with the assistant turn opened, or the raw text for continuation."""
    if not chat:
        return list(prompts)
    if getattr(tokenizer, "chat_template", None) is None:
        return list(prompts)
    out = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, ties by index) cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
    return ids, mask


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    chat: bool = True,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    logits_processor: LogitsProcessor | LogitsProcessorList | list | None = None,
    system_prompt: str | None = None,
    add_special_tokens: bool | None = None,
    max_prompt_tokens: int | None = None,
    score_token_ids: list[int] | None = None,
) -> list[str] | tuple[list[str], list[list[float]]]:
    """Responses to ``prompts``: ``num_return_sequences`` per prompt, prompt i's samples at
    ``i*k .. i*k+k-1``; only the new text, special tokens removed.

    ``chat``: apply the tokenizer's chat template (user turn, assistant turn opened); else
    continue the raw text. ``batch_size`` counts prompts (a batch decodes
    ``batch_size * num_return_sequences`` rows). ``logits_processor`` is passed to
    ``model.generate`` (e.g. a registered decoding, :mod:`safeft.eval.decoding`).
    ``max_prompt_tokens`` keeps the last tokens of longer prompts.

    ``score_token_ids``: also return, for every row, log p(token | prompt) of these tokens under
    the model's raw first-step distribution (before any logits processor): a multiple-choice
    log-likelihood read off the same forward pass that starts the generation.
    """
    if not prompts:
        return []
    k = int(num_return_sequences)
    texts = format_prompts(tokenizer, prompts, chat, system_prompt)
    if add_special_tokens is None:
        # a chat template writes its own special tokens; a raw continuation gets the usual BOS
        add_special_tokens = not (chat and getattr(tokenizer, "chat_template", None) is not None)
    encoded = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    if max_prompt_tokens:
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    inner = unwrap(model)
    base_cfg = getattr(inner, "generation_config", None) or GenerationConfig()
    gen_cfg = GenerationConfig.from_dict({**base_cfg.to_dict(), "max_new_tokens": int(max_new_tokens),
                                          "max_length": None, "min_length": 0, "min_new_tokens": None,
                                          "num_return_sequences": k, "do_sample": bool(do_sample),
                                          "temperature": float(temperature) if do_sample else None,
                                          "top_p": float(top_p) if do_sample else None,
                                          "top_k": None if do_sample else None, "num_beams": 1,
                                          "pad_token_id": pad_id, "use_cache": True,
                                          "output_logits": score_token_ids is not None,
                                          "return_dict_in_generate": score_token_ids is not None})
    if gen_cfg.eos_token_id is None:
        gen_cfg.eos_token_id = tokenizer.eos_token_id
    if logits_processor is not None and not isinstance(logits_processor, LogitsProcessorList):
        logits_processor = LogitsProcessorList(
            logits_processor if isinstance(logits_processor, (list, tuple)) else [logits_processor])

    device = _device(inner)
    was_training = inner.training
    inner.eval()
    out: list[str | None] = [None] * (len(prompts) * k)
    scores: list[list[float]] = [[] for _ in out]
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in length_buckets([len(e) for e in encoded], max(1, int(batch_size))):
                ids, mask = left_pad([encoded[i] for i in batch], pad_id)
                res = inner.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg, logits_processor=logits_processor)
                seqs = res.sequences if score_token_ids is not None else res
                first = (torch.log_softmax(res.logits[0].float(), dim=-1)[:, score_token_ids].tolist()
                         if score_token_ids is not None else None)
                new = seqs[:, ids.shape[1]:].tolist()
                for r, row in enumerate(new):
                    i, j = batch[r // k], r % k
                    out[i * k + j] = tokenizer.decode(row, skip_special_tokens=True)
                    if first is not None:
                        scores[i * k + j] = first[r]
    finally:
        inner.train(was_training)
    texts_out = [o or "" for o in out]
    return (texts_out, scores) if score_token_ids is not None else texts_out


__all__ = ["format_prompts", "generate", "left_pad", "length_buckets"]
