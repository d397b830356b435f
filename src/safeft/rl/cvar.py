"""The risk-averse (CVaR) episode filter of RA-RLHF and its risk-level schedule.

Chaudhary, Dinesha, Kalathil, Shakkottai, "Risk-Averse Fine-tuning of Large Language
Models" (NeurIPS 2024). The objective is CVaR_α of the episode return
X = Σ_t γ^t (r(s_t, a_t) − β log π_θ(a_t|s_t)/π_ref(a_t|s_t)); the paper optimises it by
running PPO on the α-tail only: of the B episodes of an iteration, the ⌈α′·B⌉ with the lowest
returns are kept for the update. The risk level α′ follows a schedule over the M iterations:

    α′(i) = 1                                    for i ≤ n            (warm-up: plain RLHF)
    α′(i) = 1 − (1 − α)·(i − n)/(⌈ρ·M⌉ − n)      for n < i < ⌈ρ·M⌉    (linear decrease)
    α′(i) = α                                    for i ≥ ⌈ρ·M⌉        (kept)

with i the 1-based iteration. The paper's IMDB values are B = 128, M = 194, n = 30,
α = 0.4, ρ = 0.95. Iterations are 1-based here as in the paper's description ("for the
first n iterations"); ``keep_count`` takes a 0-based loop index and converts.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-9


def risk_level(iteration: int, total: int, n_warmup: int, alpha: float, rho: float) -> float:
    """α′ at 1-based ``iteration`` of ``total`` (M) iterations."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    end = math.ceil(rho * total - _EPS)
    if iteration <= n_warmup:
        return 1.0
    if iteration >= end or end <= n_warmup:
        return alpha
    return 1.0 - (1.0 - alpha) * (iteration - n_warmup) / (end - n_warmup)


def keep_count(step: int, total: int, batch: int, n_warmup: int, alpha: float, rho: float) -> int:
    """⌈α′·B⌉ episodes kept at 0-based loop ``step`` (at least one)."""
    a = risk_level(step + 1, total, n_warmup, alpha, rho)
    return max(1, min(batch, math.ceil(a * batch - _EPS)))


def tail_indices(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` lowest returns; ties go to the earlier episode."""
    if k >= returns.numel():
        return torch.arange(returns.numel())
    order = torch.sort(returns.detach().float().cpu(), stable=True).indices
    return order[:k].sort().values


__all__ = ["keep_count", "risk_level", "tail_indices"]
