"""Token-wise constrained SFT (Qi, Panda, Lyu, Ma, Roy, Beirami, Mittal, Henderson, "Safety
Alignment Should Be Made More Than Just a Few Tokens Deep", 2024; ICLR 2025), Section 4, eq. 3.

For response token t with log-ratio Δ_t = log π_θ(y_t | x, y_<t) − log π_aligned(y_t | x, y_<t)::

    ℓ_t = −(2/β_t) · log σ(β_t · Δ_t)  =  (2/β_t) · softplus(−β_t · Δ_t)

π_aligned is the aligned model the run starts from. The per-token loss is averaged over
response tokens like the cross-entropy (the paper writes a sum over t inside an expectation;
token averaging only rescales the learning rate and keeps the loss comparable with ``sft``).

Limits (Section 4.1): as β_t → 0, ℓ_t = −Δ_t + (2/β_t)·log 2 + O(β_t), so the gradient is the
cross-entropy gradient; as β_t grows, ℓ_t → 2·max(0, −Δ_t) and the token's probability is
held near the aligned model's (only a drop below it is penalised). The gradient with respect to
log π_θ(y_t) is −2·σ(−β_t·Δ_t): a token whose probability has already risen above the aligned
model's gets a vanishing push, which is what limits drift on the first tokens.

β schedule (the paper's fine-tuning-attack experiments, Table 3): β_1 = 0.5, β_t = 2 for
2 ≤ t ≤ 5, β_t = 0.1 for t > 5; t counts response tokens from 1, prompt tokens carry no loss.
Here ``betas`` lists β for the first response tokens and ``beta`` is used after them.

Reference (``reference``): ``live`` = the adapter-disabled model under LoRA (a frozen copy
under full fine-tuning); ``cached`` = the reference log-prob of each training target computed
once before the first step (:class:`safeft.engine.reference.Reference`), exact, one float per
token, reused every epoch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import losses
from ..engine.reference import Reference
from . import register
from .base import LossOutput, Method

PAPER_BETAS = (0.5, 2.0, 2.0, 2.0, 2.0)
PAPER_BETA_LATE = 0.1


class ConstrainedSFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    betas: list[float] = Field(default_factory=lambda: list(PAPER_BETAS),
                               description="β for response tokens 1, 2, ... (the paper: 0.5, 2, 2, 2, 2)")
    beta: float = Field(PAPER_BETA_LATE, gt=0, description="β for every later response token (the paper: 0.1)")
    reference: Literal["live", "cached"] = "live"

    @field_validator("betas")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(b <= 0 for b in v):
            raise ValueError("every β must be > 0")
        return v


def beta_at(offsets: torch.Tensor, betas: list[float] | tuple[float, ...], beta: float) -> torch.Tensor:
    """β per response token from its 0-based offset in the response."""
    table = torch.tensor([*betas, beta], dtype=torch.float32, device=offsets.device)
    return table[offsets.clamp(max=len(betas))]


def constrained_token_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ℓ_t = (2/β_t)·softplus(−β_t·(logp − ref_logp)) = −(2/β_t)·log σ(β_t·Δ_t), per token."""
    return 2.0 / beta * F.softplus(-beta * (logp - ref_logp))


@register
class ConstrainedSFT(Method):
    name = "constrained-sft"
    summary = "token-wise constrained SFT: −(2/β_t)·log σ(β_t·log π_θ/π_aligned), large β on the first tokens"
    paper = "Qi et al., Safety Alignment Should Be Made More Than Just a Few Tokens Deep (2024; ICLR 2025)"
    Params = ConstrainedSFTParams

    def __init__(self, params, run):
        super().__init__(params, run)
        # the cache needs only each target's exact log-prob; top_k=1 keeps it at ~3 numbers a token
        self.reference = Reference(run.model, params.reference, top_k=1)

    def prepare(self, trainer) -> None:
        if self.params.reference != "cached":
            return
        self.reference.ensure_cache(trainer, self.run.train_dataset, self.run.output_dir)

    def compute_loss(self, model, batch, trainer) -> LossOutput:
        p = self.params
        hidden, pos = losses.position_hidden(model, batch)
        targets = pos.targets
        beta = beta_at(losses.response_offsets(pos), p.betas, p.beta)
        if p.reference == "cached":
            ref_tgt = self.reference.lookup(batch, hidden.device)[2].float()
            ref_of = lambda s, e: ref_tgt[s:e]  # noqa: E731
        else:
            ref_hidden = self.reference.live_hidden(model, batch, pos)

            def ref_of(s, e):
                return losses.token_logprobs(self.reference.head_logits(model, ref_hidden[s:e]), targets[s:e])

        def fn(logits, s, e):
            logp = losses.token_logprobs(logits, targets[s:e])
            ref = ref_of(s, e)
            loss = constrained_token_loss(logp, ref, beta[s:e])
            return loss.sum(), {"ce": -logp.sum().detach(), "log_ratio": (logp - ref).sum().detach()}

        total, stats = losses.chunked_loss(model, hidden, fn)
        n = max(pos.n, 1)
        return LossOutput(total, pos.n, {k: stats.get(k, 0.0) / n for k in ("ce", "log_ratio")})
