"""Turn rows into token ids with a loss mask.

- ``chat``: a list of messages; the loss covers the last assistant turn only.
- ``prompt_response``: formatted with the tokenizer's chat template (user -> assistant);
  the loss covers the response tokens only.
- ``text``: raw text, continued-pretraining style; the loss covers every token.

Truncation keeps at most ``max_length`` tokens; a prompt that would leave no room for its
response is cut from the left (its end, nearest the answer, is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DatasetSpec
from ..errors import DataError

IGNORE = -100


def detect_format(rows: list[dict], spec: DatasetSpec) -> str:
    if spec.format != "auto":
        needed = {
            "chat": [spec.messages_field],
            "prompt_response": [spec.prompt_field, spec.response_field],
            "text": [spec.text_field],
        }[spec.format]
        missing = [f for f in needed if f not in rows[0]]
        if missing:
            raise DataError(
                f"column {missing[0]!r} not found for format {spec.format!r}; columns found: "
                f"{', '.join(sorted(rows[0]))}",
                field="data",
            )
        return spec.format
    cols = rows[0].keys()
    if spec.messages_field in cols:
        return "chat"
    if spec.prompt_field in cols and spec.response_field in cols:
        return "prompt_response"
    if spec.text_field in cols:
        return "text"
    raise DataError(
        f"cannot tell the data format: expected a {spec.messages_field!r} column, "
        f"{spec.prompt_field!r}+{spec.response_field!r}, or {spec.text_field!r}; "
        f"columns found: {', '.join(sorted(cols))}",
        field="data",
    )


def chat_messages(prompt: str, response: str | None, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text that precedes the assistant's answer (chat template, generation prompt on)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt_msgs: list[dict], response: str, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids = _encode(tokenizer, render_prompt(tokenizer, prompt_msgs))
    end = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            prompt_msgs + [{"role": "assistant", "content": response}], tokenize=False
        )
        full_ids = _encode(tokenizer, full)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            resp_ids = full_ids[len(prompt_ids):]
        else:  # template re-renders the prefix differently: fall back to plain concatenation
            resp_ids = _encode(tokenizer, response + end)
    else:
        resp_ids = _encode(tokenizer, response + end)
    resp_room = max(1, min(len(resp_ids), max_length // 2))
    if len(prompt_ids) + len(resp_ids) > max_length and len(prompt_ids) > max_length - resp_room:
        prompt_ids = prompt_ids[-(max_length - resp_room):]
    ids = (prompt_ids + resp_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + resp_ids)[:max_length]
    return ids, labels


def tokenize_rows(rows: list[dict], tokenizer, spec: DatasetSpec, max_length: int, packing: bool = False) -> list[dict]:
    """Rows -> ``[{"input_ids", "labels", "idx"}]``; ``idx`` is the example's stable index."""
    fmt = detect_format(rows, spec)
    out = []
    for i, r in enumerate(rows):
        if fmt == "text":
            text = r[spec.text_field]
            if not isinstance(text, str):
                raise DataError(f"row {i}: {spec.text_field!r} is {type(text).__name__}, expected text", field="data")
            ids = _encode(tokenizer, text)
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            out.append({"input_ids": ids[:max_length], "labels": list(ids[:max_length])})
            continue
        if fmt == "chat":
            msgs = r[spec.messages_field]
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise DataError(f"row {i}: {spec.messages_field!r} must be a list of messages ending with an assistant turn", field="data")
            prompt_msgs, response = msgs[:-1], msgs[-1]["content"]
        else:
            prompt, response = r[spec.prompt_field], r[spec.response_field]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(f"row {i}: {spec.prompt_field!r} and {spec.response_field!r} must be text", field="data")
            prompt_msgs = chat_messages(prompt, None, spec.system_prompt)
        ids, labels = encode_pair(tokenizer, prompt_msgs, response, max_length)
        out.append({"input_ids": ids, "labels": labels})
    if packing:
        if fmt != "text":
            raise DataError("packing applies to plain-text data only", field="data.packing")
        out = pack(out, max_length)
    for i, ex in enumerate(out):
        ex["idx"] = i
    return out


def pack(examples: list[dict], block: int) -> list[dict]:
    stream = [t for ex in examples for t in ex["input_ids"]]
    blocks = [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)] or [stream]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


@dataclass
class Collator:
    """Right-pads a batch; labels padded with -100; keeps each example's ``idx``."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "idx" in features[0]:
            batch["idx"] = torch.as_tensor([f["idx"] for f in features], dtype=torch.long)
        return batch
