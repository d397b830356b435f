"""Token-level loss pieces shared by the methods.

Every method works on *response positions*: the positions whose next-token label is not
-100. The LM head runs only there (prompt tokens of chat data carry no loss, so computing
their 49k-way logits would be wasted work), and one log-softmax feeds both the cross-entropy
and any regularizer.

:func:`chunked_loss` goes one step further: the LM head and the per-token loss run over
chunks of positions, and each chunk's gradient (with respect to the hidden states and any
trainable head weight) is taken at once, inside the forward pass. No ``[N, vocab]`` tensor
for the whole batch ever exists, so a regularizer that needs a second full-vocabulary
distribution (a live reference) costs no extra peak memory, and nothing is recomputed.
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


def response_offsets(pos: Positions) -> torch.Tensor:
    """Per selected position, its index within the row's response tokens (0 = first token)."""
    return (pos.mask.long().cumsum(1) - 1)[pos.mask]


LOSS_CHUNK = 256
"""Positions per chunk in :func:`chunked_loss` (a 49k-vocabulary chunk is ~50 MB in fp32)."""


class _ChunkedLoss(torch.autograd.Function):
    """Σ_chunks fn(head(h[chunk])) with each chunk's gradient computed in the forward pass.

    The result is a scalar sum, so the backward only scales the stored gradients by the
    incoming gradient: exact, and no chunk is recomputed.
    """

    @staticmethod
    def forward(ctx, fn, head, chunk, stats, hidden, *params):
        need_h = ctx.needs_input_grad[4]
        wants = [need_h] + [ctx.needs_input_grad[5 + i] for i in range(len(params))]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_p = [torch.zeros_like(p) if w else None for p, w in zip(params, wants[1:])]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            with torch.enable_grad():
                h = hidden[s:e].detach().requires_grad_(need_h)
                loss, metrics = fn(head(h).float(), s, e)
                inputs = [x for x, w in zip([h, *params], wants) if w]
                grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
            total += loss.detach()
            _add_stats(stats, metrics)
            it = iter(grads)
            if need_h:
                g = next(it)
                if g is not None:
                    grad_h[s:e] = g
            for i, w in enumerate(wants[1:]):
                if w:
                    g = next(it)
                    if g is not None:
                        grad_p[i] += g
        ctx.grads = (grad_h, grad_p)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_p = ctx.grads
        ctx.grads = None
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in grad_p]
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        return (None, None, None, None, gh, *scaled)


def _add_stats(stats: dict, metrics: dict) -> None:
    for k, v in metrics.items():
        stats[k] = stats.get(k, 0.0) + float(v)


def chunked_loss(model, hidden: torch.Tensor, fn, chunk: int | None = None) -> tuple[torch.Tensor, dict]:
    """``Σ_c fn(logits_c, start, end)`` over chunks of response positions, memory-flat.

    ``hidden``: ``[N, H]`` final hidden states at the response positions (from
    :func:`position_hidden`). ``fn(logits [n, V] float32, start, end) -> (loss_sum, metrics)``
    returns the chunk's loss summed over its tokens and a dict of plain-number sums (summed
    over chunks in the returned dict). Gradients are exact (tested against the unchunked loss).
    """
    head = lm_head(model)
    chunk = chunk or LOSS_CHUNK
    stats: dict = {}
    params = [p for p in head.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk):
                e = min(s + chunk, hidden.shape[0])
                loss, metrics = fn(head(hidden[s:e]).float(), s, e)
                total += loss
                _add_stats(stats, metrics)
        return total, stats
    return _ChunkedLoss.apply(fn, head, chunk, stats, hidden, *params), stats


def position_hidden(model, batch: dict, pos: Positions | None = None) -> tuple[torch.Tensor, Positions]:
    """Final hidden states ``[N, H]`` at the response positions of ``batch``."""
    pos = pos or response_positions(batch["labels"])
    hidden = final_hidden(model, batch["input_ids"], batch.get("attention_mask"))
    return hidden[:, :-1][pos.mask], pos


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
