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
        logits, pos = losses.response_logits(model, batch)
        ce = F.cross_entropy(logits, pos.targets, reduction="sum")
        return LossOutput(ce, pos.n, {"ce": ce.item() / max(pos.n, 1)})
