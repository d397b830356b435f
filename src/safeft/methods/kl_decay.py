"""KL-decay regularized fine-tuning (Vorontsov, Ischenko, Kryzhanovskiy, "Safe LLM
regularization", 2024).

Loss, per response token, averaged like the cross-entropy (slides, eqs. 2-3)::

    L = CE(θ) + λ · γ^t · KL(p_θ ‖ p_ref)

p_ref is the aligned model the run starts from (θ*), γ the decay rate, t the epoch. The
slides write Reg = −γ^t·KL; added to a loss that is *minimised*, the minus would reward
drifting away from the aligned model, the opposite of the method's purpose, so the term is
implemented as a penalty (+). λ is our addition (the slides fix it to 1) so the strength
can be tuned; the default keeps the paper's value.

Reference modes (``reference``):
- ``live``: exact full-vocabulary KL; p_ref from the adapter-disabled model under LoRA, a
  frozen copy under full fine-tuning.
- ``cached``: the reference's top-k log-probs per response token, computed once before the
  first step and reused every epoch; the KL is taken on that support with both
  distributions renormalised (:func:`safeft.losses.kl_topk`). Its error against the exact
  KL is bounded by the probability mass outside the top-k and is tested.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .. import losses
from ..engine.reference import Reference
from . import register
from .base import LossOutput, Method


class KLDecayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(1.0, ge=0, description="λ, the KL weight at epoch 0 (the slides: 1)")
    gamma: float = Field(0.8, gt=0, le=1, description="γ, the per-epoch decay rate")
    direction: Literal["forward", "reverse"] = "forward"
    """``forward``: KL(p_θ ‖ p_ref) as in the slides; ``reverse``: KL(p_ref ‖ p_θ)."""
    per_step: bool = False
    """Use the fractional epoch (decays every step) instead of the integer epoch."""
    reference: Literal["live", "cached"] = "live"
    top_k: int = Field(32, ge=1, description="support size of the cached reference")


def decay_weight(lam: float, gamma: float, epoch: float, per_step: bool = False) -> float:
    """λ·γ^t with t the epoch (integer, or fractional when ``per_step``)."""
    t = epoch if per_step else math.floor(epoch + 1e-9)
    return lam * gamma**t


@register
class KLDecay(Method):
    name = "kl-decay"
    summary = "CE + λ·γ^epoch·KL(p_θ ‖ p_aligned): stay near the aligned model, less so each epoch"
    paper = "Vorontsov, Ischenko, Kryzhanovskiy, Safe LLM regularization (2024)"
    Params = KLDecayParams

    def __init__(self, params, run):
        super().__init__(params, run)
        self.reference = Reference(run.model, params.reference, params.top_k)

    def prepare(self, trainer) -> None:
        if self.params.reference != "cached":
            return
        self.reference.ensure_cache(trainer, self.run.train_dataset, self.run.output_dir)

    def compute_loss(self, model, batch, trainer) -> LossOutput:
        p = self.params
        hidden, pos = losses.position_hidden(model, batch)
        targets = pos.targets
        w = decay_weight(p.lam, p.gamma, trainer.epoch_index, p.per_step)
        if p.reference == "cached":
            idx, ref_top, _ = self.reference.lookup(batch, hidden.device)

            def fn(logits, s, e):
                ce = F.cross_entropy(logits, targets[s:e], reduction="none")
                kl = losses.kl_topk(logits, idx[s:e], ref_top[s:e], p.direction)
                return (ce + w * kl).sum(), {"ce": ce.sum().detach(), "kl": kl.sum().detach()}
        else:
            ref_hidden = self.reference.live_hidden(model, batch, pos)

            def fn(logits, s, e):
                logp = torch.log_softmax(logits, dim=-1)
                ref_logp = torch.log_softmax(self.reference.head_logits(model, ref_hidden[s:e]), dim=-1)
                ce = -logp.gather(-1, targets[s:e, None]).squeeze(-1)
                kl = losses.kl_full(logp, ref_logp, p.direction)
                return (ce + w * kl).sum(), {"ce": ce.sum().detach(), "kl": kl.sum().detach()}

        total, stats = losses.chunked_loss(model, hidden, fn)
        n = max(pos.n, 1)
        return LossOutput(total, pos.n, {"ce": stats.get("ce", 0.0) / n, "kl": stats.get("kl", 0.0) / n, "kl_weight": w})
