"""Plain supervised fine-tuning: token-averaged cross-entropy on response tokens."""

from __future__ import annotations

import torch.nn.functional as F

from .. import losses
from . import register
from .base import LossOutput, Method


@register
class SFT(Method):
    name = "sft"
    summary = "plain supervised fine-tuning (the baseline every method is compared against)"
    paper = "-"

    def compute_loss(self, model, batch, trainer) -> LossOutput:
        hidden, pos = losses.position_hidden(model, batch)
        targets = pos.targets

        def fn(logits, s, e):
            ce = F.cross_entropy(logits, targets[s:e], reduction="sum")
            return ce, {"ce": ce.detach()}

        total, stats = losses.chunked_loss(model, hidden, fn)
        return LossOutput(total, pos.n, {"ce": stats.get("ce", 0.0) / max(pos.n, 1)})
