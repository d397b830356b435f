"""The RA-RLHF paper's report: average reward, tail reward, perplexity.

- *Average reward*: mean reward of one sampled continuation per evaluation prompt.
- *Tail reward*: mean reward on the *tail prompts*, the ⌈q·n⌉ prompts whose continuations by
  the **base** model score worst (Chaudhary et al. 2024, §5: the riskiest prompts are
  those on which the base model does worst). The tail set is fixed once from the base
  model and reused for every model compared, so the numbers are on the same prompts.
- *Perplexity*: of each model's continuations under a fixed scorer (the base model),
  exp(Σ NLL / Σ tokens) over response tokens. The paper reports the perplexity of the
  generations as a fluency check; with one fixed scorer the numbers compare across models.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..models import is_peft, reference_mode
from .ppo import Episodes, generate_episodes, response_forward
from .rewards import Reward


def tail_set(base_scores: torch.Tensor, frac: float) -> torch.Tensor:
    """Indices of the ⌈frac·n⌉ lowest base scores (ties: earlier prompt first), ascending."""
    n = base_scores.numel()
    k = max(1, min(n, math.ceil(frac * n - 1e-9)))
    return torch.sort(base_scores.float(), stable=True).indices[:k].sort().values


@torch.no_grad()
def perplexity(scorer, episodes: Episodes, batch_size: int = 16) -> float:
    """exp(mean NLL) of the episodes' response tokens under ``scorer``.

    ``scorer`` is a plain model, or a peft model (then scored with adapters disabled, i.e.
    the base model).
    """
    nll, count = 0.0, 0
    ctx = reference_mode(scorer) if is_peft(scorer) else nullcontext(scorer)
    with ctx as m:
        m.eval()
        for i in range(0, len(episodes.prompts), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(episodes.prompts)))
            logp, _ = response_forward(m, *episodes.take(idx))
            mask = episodes.response_mask[idx].to(logp.device).float()
            nll -= (logp * mask).sum().item()
            count += int(mask.sum().item())
    return math.exp(nll / max(count, 1))


def evaluate_policy(
    model, tokenizer, prompts: list[str], reward: Reward, *, scorer, tail_idx: torch.Tensor | None = None,
    max_new_tokens: int = 48, seed: int = 0, chat: bool = False, system_prompt: str | None = None,
    logits_processor=None, batch_size: int = 16,
) -> dict:
    """Sample one continuation per prompt (seeded) and report the three metrics."""
    torch.manual_seed(seed)
    ep = generate_episodes(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat, system_prompt=system_prompt,
        batch_size=batch_size, logits_processor=logits_processor,
    )
    scores = reward(ep.prompts, ep.responses).float()
    out = {
        "n": len(prompts),
        "avg_reward": scores.mean().item(),
        "ppl": perplexity(scorer, ep, batch_size),
        "scores": scores.tolist(),
        "responses": ep.responses,
    }
    if tail_idx is not None:
        out["tail_reward"] = scores[tail_idx].mean().item()
        out["n_tail"] = int(tail_idx.numel())
    return out


__all__ = ["evaluate_policy", "perplexity", "tail_set"]
