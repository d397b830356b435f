"""DExperts decoding (Liu et al., "DExperts: Decoding-Time Controlled Text Generation with
Experts and Anti-Experts", ACL 2021), a baseline of RA-RLHF (Chaudhary et al. 2024).

At every step the next-token logits are (Liu et al., eq. 1)::

    z̃_t = z_t + α·(z⁺_t − z⁻_t)

with z the base model's logits, z⁺ those of an *expert* fine-tuned on desirable
(non-toxic) text and z⁻ those of an *anti-expert* fine-tuned on undesirable (toxic) text;
sampling then proceeds from softmax(z̃) with the usual warpers. The paper uses α = 2.

Registered as the decoding ``dexperts`` (``safeft eval --decoding dexperts:SPEC``), with
SPEC ``expert=DIR,anti=DIR[,alpha=2.0]``: two model directories saved by safeft (LoRA
adapter directories load with their base model). The experts must share the base model's
tokenizer. Train them with safeft itself, e.g. ``safeft train --method sft --data
neutral.jsonl`` and ``--data hate.jsonl`` with ToxiGen's neutral and hate statements
(``docs/rlhf.md`` has the commands).

The experts keep their own KV caches across the steps of one ``generate`` call (a new call
is detected when the input is not the previous input plus one token), so each step costs
one token's forward per expert. Left padding is read from the input: the leading
pad tokens of each row are masked out.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..errors import ConfigError
from ..eval.decoding import register_decoding
from ..models import load_model, unwrap


class DExpertsProcessor(LogitsProcessor):
    """``scores + α·(expert − anti-expert)`` on the last position."""

    def __init__(self, expert, anti_expert, alpha: float, pad_token_id: int | None):
        self.models = {"expert": expert.eval(), "anti": anti_expert.eval()}
        self.alpha, self.pad = float(alpha), pad_token_id
        self._state: dict[str, tuple] = {}

    def _mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return torch.ones_like(input_ids)
        return (input_ids.ne(self.pad).long().cumsum(-1) > 0).long()

    @torch.no_grad()
    def _logits(self, which: str, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.models[which]
        device = next(unwrap(model).parameters()).device
        ids = input_ids.to(device)
        mask = self._mask(ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        prev = self._state.get(which)
        continues = (prev is not None and prev[1].shape[0] == ids.shape[0]
                     and prev[1].shape[1] == ids.shape[1] - 1 and torch.equal(prev[1], ids[:, :-1]))
        if continues:
            out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                        past_key_values=prev[0], use_cache=True)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self._state[which] = (out.past_key_values, ids)
        return out.logits[:, -1].float()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        delta = self._logits("expert", input_ids) - self._logits("anti", input_ids)
        v = min(scores.shape[-1], delta.shape[-1])
        out = scores.clone()
        out[:, :v] = out[:, :v] + self.alpha * delta[:, :v].to(scores.device, scores.dtype)
        return out


def parse_spec(spec: str) -> dict:
    opts = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in ("expert", "anti", "alpha"):
            raise ConfigError(f"dexperts spec: expected expert=DIR,anti=DIR[,alpha=A], got {part!r}", field="--decoding")
        opts[key] = value
    if "expert" not in opts or "anti" not in opts:
        raise ConfigError("dexperts spec needs expert=DIR and anti=DIR", field="--decoding")
    try:
        opts["alpha"] = float(opts.get("alpha", 2.0))
    except ValueError:
        raise ConfigError(f"dexperts alpha must be a number, got {opts['alpha']!r}", field="--decoding") from None
    return opts


@register_decoding("dexperts")
def dexperts_factory(model, tokenizer, spec: str) -> DExpertsProcessor:
    opts = parse_spec(spec)
    expert, _ = load_model(opts["expert"], for_training=False)
    anti, _ = load_model(opts["anti"], for_training=False)
    device = next(unwrap(model).parameters()).device
    return DExpertsProcessor(expert.to(device), anti.to(device), opts["alpha"], tokenizer.pad_token_id)


__all__ = ["DExpertsProcessor", "dexperts_factory", "parse_spec"]
