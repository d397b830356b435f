"""RA-RLHF: risk-averse RLHF by CVaR (Chaudhary, Dinesha, Kalathil, Shakkottai, "Risk-Averse
Fine-tuning of Large Language Models", NeurIPS 2024).

The same PPO loop as ``rlhf`` (:mod:`safeft.rl.ppo`), but each iteration's update uses only
the ⌈α′·B⌉ episodes with the lowest returns: the α′-tail whose mean is CVaR_α′ of the
return. α′ = 1 for the first n iterations (plain RLHF, so the policy first learns what
the reward wants), then decreases linearly to α, reached at iteration ⌈ρ·M⌉ and kept
(:mod:`safeft.rl.cvar`). Paper defaults (IMDB): α = 0.4, n = 30, ρ = 0.95, B = 128.

Reading chosen: the "return" that ranks episodes is the KL-shaped return of eq. 1,
Σ_t γ^t (r_t − β·kl_t) (``tail_by: return``, default); ``tail_by: score`` ranks by the
reward model's score alone. The KL coefficient adapts on the KL of all B episodes, and
advantages are whitened over the kept episodes only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..rl.cvar import keep_count
from ..rl.ppo import PPOParams
from . import register
from .rlhf import RLHF


class RARLHFParams(PPOParams):
    alpha: float = Field(0.4, gt=0, le=1, description="α, the final risk level (tail fraction)")
    n_warmup: int = Field(30, ge=0, description="n, iterations with α′ = 1")
    rho: float = Field(0.95, gt=0, le=1, description="ρ: α′ reaches α at iteration ⌈ρ·M⌉")
    tail_by: Literal["return", "score"] = "return"


@register
class RARLHF(RLHF):
    name = "ra-rlhf"
    summary = "risk-averse PPO: update only on the ⌈α′·B⌉ lowest-return episodes (CVaR), α′ scheduled 1→α"
    paper = "Chaudhary, Dinesha, Kalathil, Shakkottai, Risk-Averse Fine-tuning of LLMs (NeurIPS 2024)"
    Params = RARLHFParams

    def keep(self, step: int, total: int, batch: int) -> int:
        p = self.params
        return keep_count(step, total, batch, p.n_warmup, p.alpha, p.rho)
