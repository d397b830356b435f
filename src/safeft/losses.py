"""Token-level loss pieces shared by the methods.

Every method works on *response positions*: the positions whose next-token label is not
-100. The LM head runs only there (prompt tokens of chat data carry no loss, so computing
their 49k-way logits would be wasted work), and one log-softmax feeds both the cross-entropy
and any regularizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import unwrap


@dataclass
class Positions:
    """Response positions of a batch: ``mask[b, t]`` is True when position t predicts label t+1."""

    mask: torch.Tensor  # [B, T-1] bool
    targets: torch.Tensor  # [N] next-token ids at the selected positions

    @property
    def n(self) -> int:
        return int(self.targets.numel())


def response_positions(labels: torch.Tensor) -> Positions:
    shifted = labels[:, 1:]
    mask = shifted.ne(-100)
    return Positions(mask=mask, targets=shifted[mask])


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Last-layer (post-norm) hidden states, without computing the full logits tensor.

    Calls the model through its outer wrapper (DDP, peft) so distributed hooks still fire;
    ``logits_to_keep=1`` leaves just one position's logits to compute.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1]


def lm_head(model) -> torch.nn.Module:
    return unwrap(model).get_output_embeddings()


def position_logits(model, hidden: torch.Tensor, pos: Positions) -> torch.Tensor:
    """Float32 logits ``[N, V]`` at the response positions."""
    h = hidden[:, :-1][pos.mask]
    return lm_head(model)(h).float()


def response_logits(model, batch: dict, pos: Positions | None = None) -> tuple[torch.Tensor, Positions]:
    pos = pos or response_positions(batch["labels"])
    hidden = final_hidden(model, batch["input_ids"], batch.get("attention_mask"))
    return position_logits(model, hidden, pos), pos


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row, via one fused logsumexp."""
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def kl_full(logp: torch.Tensor, ref_logp: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """Exact per-token KL over the whole vocabulary from two log-softmaxes.

    ``forward``: KL(p_θ ‖ p_ref); ``reverse``: KL(p_ref ‖ p_θ).
    """
    if direction == "forward":
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def kl_topk(
    logits: torch.Tensor, ref_idx: torch.Tensor, ref_logp: torch.Tensor, direction: str = "forward"
) -> torch.Tensor:
    """Per-token KL on the reference's top-k support, both distributions renormalised on it.

    ``logits``: [N, V] policy logits; ``ref_idx``/``ref_logp``: [N, k] the reference's top-k
    token ids and log-probs. Restricting to S = top-k(p_ref) and renormalising gives
    KL(p̃_θ ‖ p̃_ref) = Σ_{v∈S} p̃_θ(v) (log p̃_θ(v) − log p̃_ref(v)). No full-vocabulary
    softmax is needed for it: only k logits are gathered.
    """
    lp = torch.log_softmax(logits.gather(-1, ref_idx.long()), dim=-1)
    lr = torch.log_softmax(ref_logp.float(), dim=-1)
    if direction == "forward":
        return (lp.exp() * (lp - lr)).sum(-1)
    return (lr.exp() * (lr - lp)).sum(-1)
