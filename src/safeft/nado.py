"""The token-level constraint model R of NADO (Meng, Lu, Peng, Chang, "Controllable Text
Generation with Neurally-Decomposed Oracle", NeurIPS 2022), as used for posterior
regularization by Meng et al., "Attribute Controlled Fine-tuning for Large Language Models:
A Case Study on Detoxification" (EMNLP 2024 Findings).

What R estimates
    R(x, y≤i) = P(the finished sequence satisfies the constraint | x, y≤i), here "the
    continuation is not toxic". NADO's parameterisation: from the hidden state of the prefix
    (x, y<i) one head emits a logit for *every candidate next token* v, so R(x, y<i ∘ v) for
    all v costs one matrix product, exactly like the LM head's next-token logits.

Our head (a "light model on the LLM's hidden states")
    u = W₂·GELU(W₁·h)   (h: the LLM's final, post-norm hidden state of the prefix; detached)
    logit R(x, y<i ∘ v) = u·E_v + b_v + c
    E is the LLM's own output-embedding matrix (frozen, not stored with R), b a per-token
    bias, c a scalar. The token basis E makes the head small (two H×d layers and V+1
    biases) and lets it be evaluated on just k candidate tokens by gathering k rows of E
    (:func:`ConstraintModel.log_r` with ``idx``). W₂, b and c start at zero, so an untrained
    R is the constant ½: the projection q below then equals p_θ and the regularizer is 0.
    NADO's reference code uses extra transformer layers over the base model's states; a
    linear-in-E head is our cheaper choice for CPU fine-tuning (documented in docs/pr-nado.md).

Training objective (NADO, the token-level likelihood of the oracle label)
    For a sequence (x, y) sampled from the current LLM and labelled C(x, y) ∈ [0, 1] by a
    judge (1 = satisfies; soft labels allowed: C = 1 − toxicity score), every completion
    position i is a training example for R(x, y≤i) with target C:
        L_R = Σ_i BCE(σ(logit R(x, y<i ∘ y_i)), C(x, y)).
    NADO adds a forward-consistency regulariser R(x, y<i) ≈ Σ_v p(v | x, y<i)·R(x, y<i ∘ v).
    We leave it out: the projection q is normalised per token explicitly, so the value of
    R(x, y<i) (the left side) cancels and never enters the fine-tuning loss (see
    :func:`project`).

The projection (posterior regularization's E-step)
    q(y_i | x, y<i) = p_θ(y_i | x, y<i) · R(x, y≤i) / R(x, y<i)  (papers' form), normalised
    over y_i. R(x, y<i) does not depend on y_i, so after normalisation
        q(v) = p_θ(v)·R(x, y<i ∘ v) / Σ_u p_θ(u)·R(x, y<i ∘ u);
    the two forms coincide exactly when R satisfies NADO's consistency equation, and the
    normalised form is a distribution whatever R's errors.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from . import losses
from .errors import ConfigError
from .models import unwrap

TOXIC_THRESHOLD = 0.5


class ConstraintHead(nn.Module):
    """logit R(prefix ∘ v) = (W₂·GELU(W₁·h))·E_v + b_v + c, for all v or k candidates."""

    def __init__(self, hidden_size: int, vocab_size: int, inner: int = 256):
        super().__init__()
        self.hidden_size, self.vocab_size, self.inner = hidden_size, vocab_size, inner
        self.w1 = nn.Linear(hidden_size, inner)
        self.w2 = nn.Linear(inner, hidden_size, bias=False)
        nn.init.zeros_(self.w2.weight)
        self.token_bias = nn.Parameter(torch.zeros(vocab_size))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` [N, H]; ``emb`` [V, H]; ``idx`` [N, k] candidate ids or None (all V).

        Returns R's logits [N, V] or [N, k].
        """
        u = self.w2(F.gelu(self.w1(hidden.float())))
        emb = emb.float()
        if idx is None:
            return u @ emb.T + self.token_bias + self.bias
        cand = emb[idx]  # [N, k, H]
        return torch.einsum("nkh,nh->nk", cand, u) + self.token_bias[idx] + self.bias


@dataclass
class ConstraintModel:
    """R plus what it needs to be reloaded: the head and its sizes."""

    head: ConstraintHead

    @classmethod
    def for_model(cls, model, inner: int = 256, seed: int = 0) -> "ConstraintModel":
        emb = output_embeddings(model)
        gen = torch.random.fork_rng()
        with gen:
            torch.manual_seed(seed)
            head = ConstraintHead(emb.shape[1], emb.shape[0], inner)
        return cls(head)

    def log_r(self, hidden: torch.Tensor, emb: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """log R(prefix ∘ v) = log σ(logit), for all v or the candidates ``idx``."""
        return F.logsigmoid(self.head(hidden, emb, idx))

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)

    def save(self, path: str | Path) -> Path:
        """Write ``path/constraint.safetensors`` and ``path/constraint.json`` (atomically)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"hidden_size": self.head.hidden_size, "vocab_size": self.head.vocab_size, "inner": self.head.inner}
        tmp = out / ".constraint.safetensors.tmp"
        save_file(self.state(), str(tmp))
        tmp.replace(out / "constraint.safetensors")
        (out / "constraint.json").write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "ConstraintModel":
        p = Path(path)
        if not (p / "constraint.safetensors").is_file() or not (p / "constraint.json").is_file():
            raise ConfigError(f"{p} holds no constraint model (constraint.safetensors + constraint.json)", field="nado")
        meta = json.loads((p / "constraint.json").read_text())
        cm = cls(ConstraintHead(meta["hidden_size"], meta["vocab_size"], meta["inner"]))
        cm.load_state(load_file(str(p / "constraint.safetensors")))
        return cm

    def check_compatible(self, model) -> None:
        emb = output_embeddings(model)
        if tuple(emb.shape) != (self.head.vocab_size, self.head.hidden_size):
            raise ConfigError(
                f"constraint model was trained for vocab {self.head.vocab_size} x hidden {self.head.hidden_size}, "
                f"this model has {emb.shape[0]} x {emb.shape[1]}",
                field="nado",
            )


def output_embeddings(model) -> torch.Tensor:
    """The LLM's output-embedding matrix E [V, H], detached (R's frozen token basis)."""
    return losses.lm_head(model).weight.detach()


# --- the projection and the regularizer -----------------------------------------------------
def project(logp: torch.Tensor, log_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q on a candidate set S, and the mass m that p_θ puts outside S.

    ``logp``: log p_θ(v) for v ∈ S [N, k] (S = the whole vocabulary when k = V);
    ``log_r``: log R(prefix ∘ v) on S. Returns ``q`` [N, k] and ``m`` [N] with
    Σ_S q + m = 1. Tokens outside S carry no R estimate and are treated as *neutral*: they
    keep their probability (q(v) = p_θ(v)), and the mass 1 − m inside S is redistributed
    in proportion to p_θ·R — the normalised form of q ∝ p_θ·R(x, y≤i)/R(x, y<i).
    """
    m = (1.0 - logp.exp().sum(-1)).clamp_min(0.0)
    q = torch.softmax(logp + log_r, dim=-1) * (1.0 - m)[:, None]
    return q, m


def pr_kl(logits: torch.Tensor, log_r: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(q ‖ p_θ) with q held fixed (posterior regularization's M-step).

    ``logits`` [N, V]: p_θ's logits (with grad); ``log_r``: log R on the candidates ``idx``
    [N, k] (or on all V when ``idx`` is None). q is a stop-gradient target, as in PR's
    alternating E/M steps: the gradient w.r.t. logit u is p_θ(u) − q(u), which is zero
    outside the candidates (there q = p_θ). The returned tensor has the exact KL as its
    value and exactly that gradient, from k gathered logits (no full-vocabulary q).
    """
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    sel = logits if idx is None else logits.gather(-1, idx)
    lp = sel - logz
    with torch.no_grad():
        q, _ = project(lp, log_r.float())
        value = (q * (torch.log(q.clamp_min(1e-30)) - lp)).sum(-1)
        coef = lp.exp() - q
    surrogate = (coef * sel).sum(-1)
    return value + surrogate - surrogate.detach()


def candidates(logits: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k most likely next tokens under p_θ (None = all: k ≤ 0 or k ≥ V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return None
    return logits.detach().topk(k, dim=-1).indices


# --- sampling and labelling -----------------------------------------------------------------
def sample_completions(
    model, prompts: list[list[int]], *, pad_id: int, eos_id: int | None, max_new_tokens: int = 32,
    temperature: float = 1.0, batch_size: int = 8, seed: int = 0,
) -> list[list[int]]:
    """Sample one completion per prompt (token ids, eos kept, padding dropped) from ``model``.

    Works on token ids rather than text so R is trained on exactly the tokens the model
    produced (decoding and re-encoding text can change the tokenisation).
    """
    inner = unwrap(model)
    was = inner.training
    inner.eval()
    device = next(inner.parameters()).device
    out: list[list[int]] = []
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            for s in range(0, len(prompts), batch_size):
                chunk = prompts[s : s + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, p in enumerate(chunk):
                    ids[j, width - len(p):] = torch.as_tensor(p)
                    mask[j, width - len(p):] = 1
                gen = inner.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                    temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id, eos_token_id=eos_id,
                )
                for row in gen[:, width:].tolist():
                    comp = []
                    for t in row:
                        comp.append(t)
                        if eos_id is not None and t == eos_id:
                            break
                    out.append(comp)
    finally:
        inner.train(was)
    return out


class JudgeChoice(BaseModel):
    """The ``judge`` / ``judge_opts`` options of the methods that score text with a judge of
    the evaluation framework (pr-nado, filter); the name is checked against the registry."""

    judge: str = "toxicity"
    """The judge: ``toxicity`` (offline profanity classifier), ``implicit-hate``, ..."""
    judge_opts: dict[str, Any] = Field(default_factory=dict, description="options of the judge")

    @field_validator("judge")
    @classmethod
    def _registered(cls, v: str) -> str:
        from .eval.judges import known_judge

        return known_judge(v)


def judge_scorer(name: str = "toxicity", opts: dict | None = None):
    """texts -> unsafety scores in [0, 1] from a judge of the evaluation framework (default the
    offline ``toxicity`` classifier). A judge that gives no score counts 1 for unsafe, 0 for safe."""
    from .eval.judges import get_judge

    judge = get_judge(name, **(opts or {}))

    def score(texts: list[str]) -> list[float]:
        verdicts = judge.judge([""] * len(texts), texts)
        return [float(v.score) if v.score is not None else float(bool(v.unsafe)) for v in verdicts]

    return score


def labels_from_scores(scores: list[float], soft: bool = True, threshold: float = TOXIC_THRESHOLD) -> list[float]:
    """C = 1 − toxicity (soft) or 1[toxicity < threshold] (hard): 1 means "satisfies"."""
    return [1.0 - s if soft else float(s < threshold) for s in scores]


@dataclass
class RFeatures:
    hidden: torch.Tensor  # [N, H] prefix hidden states
    target: torch.Tensor  # [N] the token that followed
    label: torch.Tensor  # [N] the sequence's label C, repeated per token


def collect_features(model, prompts: list[list[int]], completions: list[list[int]], labels: list[float],
                     *, pad_id: int, batch_size: int = 8) -> RFeatures:
    """One no-grad LLM pass per batch: the hidden state before each completion token."""
    inner = unwrap(model)
    was = inner.training
    inner.eval()
    device = next(inner.parameters()).device
    hs, tg, lb = [], [], []
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), batch_size):
                seqs = [(p, c, y) for p, c, y in zip(prompts[s:s + batch_size], completions[s:s + batch_size], labels[s:s + batch_size]) if c]
                if not seqs:
                    continue
                width = max(len(p) + len(c) for p, c, _ in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, (p, c, _) in enumerate(seqs):
                    ids[j, : len(p) + len(c)] = torch.as_tensor(p + c)
                    mask[j, : len(p) + len(c)] = 1
                hidden = losses.final_hidden(inner, ids.to(device), mask.to(device))
                for j, (p, c, y) in enumerate(seqs):
                    a = len(p) - 1
                    hs.append(hidden[j, a : a + len(c)].float().cpu())
                    tg.append(torch.as_tensor(c))
                    lb.append(torch.full((len(c),), float(y)))
    finally:
        inner.train(was)
    if not hs:
        raise ValueError("no non-empty completion to train the constraint model on")
    return RFeatures(torch.cat(hs), torch.cat(tg), torch.cat(lb))


def train_constraint(cm: ConstraintModel, feats: RFeatures, emb: torch.Tensor, *, epochs: int = 4,
                     lr: float = 1e-3, batch_size: int = 256, seed: int = 0) -> list[float]:
    """Fit R by NADO's token-level BCE; returns the mean BCE of each epoch (before its updates
    are all applied, i.e. the training loss as it goes)."""
    head = cm.head
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = feats.target.numel()
    emb = emb.float()
    history = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, batch_size):
            b = order[s : s + batch_size]
            logit = head(feats.hidden[b], emb, feats.target[b][:, None]).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logit, feats.label[b], reduction="sum")
            opt.zero_grad(set_to_none=True)
            (loss / b.numel()).backward()
            opt.step()
            total += loss.item()
        history.append(total / n)
    head.eval()
    return history


def bce(cm: ConstraintModel, feats: RFeatures, emb: torch.Tensor) -> float:
    """Mean token-level BCE of R on ``feats`` (no grad)."""
    with torch.no_grad():
        logit = cm.head(feats.hidden, emb.float(), feats.target[:, None]).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logit, feats.label).item()


def fit_round(model, cm: ConstraintModel, prompts: list[list[int]], *, scorer, decode, pad_id: int,
              eos_id: int | None, max_new_tokens: int, temperature: float, soft_labels: bool,
              epochs: int, lr: float, seed: int) -> dict:
    """One R update: sample from the current LLM, label with the judge, fit R by BCE."""
    completions = sample_completions(model, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed)
    scores = scorer([decode(c) for c in completions])
    labels = labels_from_scores(scores, soft_labels)
    feats = collect_features(model, prompts, completions, labels, pad_id=pad_id)
    history = train_constraint(cm, feats, output_embeddings(model), epochs=epochs, lr=lr, seed=seed)
    return {
        "samples": len(completions),
        "tokens": int(feats.target.numel()),
        "mean_toxicity": sum(scores) / max(len(scores), 1),
        "toxic_frac": sum(s >= TOXIC_THRESHOLD for s in scores) / max(len(scores), 1),
        "bce_first_epoch": history[0],
        "bce_last_epoch": history[-1],
    }


# --- NADO decoding --------------------------------------------------------------------------
class NadoLogitsProcessor:
    """Decoding with R guiding an unchanged model: q(v) ∝ p(v)·R(prefix ∘ v)^α at every step.

    R needs the prefix's final hidden state, which a LogitsProcessor is not given; a forward
    hook on the model's final norm keeps the last position's state of each forward pass
    (the one whose logits are being processed), so guidance costs one small head evaluation
    per step and no extra LLM pass. For tractability R is evaluated on the ``top_k`` most
    likely tokens of p only; the others are removed (−inf), i.e. top-k decoding reweighted
    by R. Used through ``safeft eval --decoding nado:PATH[,top_k=K][,alpha=A]``.
    """

    def __init__(self, model, cm: ConstraintModel, top_k: int = 32, alpha: float = 1.0):
        cm.check_compatible(model)
        self.cm, self.top_k, self.alpha = cm, top_k, alpha
        self.emb = output_embeddings(model)
        state: dict = {}
        self._state = state

        def keep(module, args, output):  # a closure over `state`, not `self`: the hook never pins the processor
            hidden = output[0] if isinstance(output, tuple) else output
            state["last"] = hidden[:, -1].detach()

        self._handle = _final_norm(model).register_forward_hook(keep)
        weakref.finalize(self, self._handle.remove)

    @property
    def _last(self) -> torch.Tensor | None:
        return self._state.get("last")

    @_last.setter
    def _last(self, value: torch.Tensor) -> None:
        self._state["last"] = value

    def close(self) -> None:
        """Remove the hook now (it is also removed when the processor is garbage-collected)."""
        self._handle.remove()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is None or self._last.shape[0] != scores.shape[0]:
            raise RuntimeError("NADO decoding: no hidden state captured for this step")
        logp = torch.log_softmax(scores.float(), dim=-1)
        k = min(self.top_k, scores.shape[-1]) if self.top_k > 0 else scores.shape[-1]
        top_lp, idx = logp.topk(k, dim=-1)
        with torch.no_grad():
            log_r = self.cm.log_r(self._last.to(self.emb.device), self.emb, idx)
        out = torch.full_like(scores, -math.inf)
        out.scatter_(-1, idx, (top_lp + self.alpha * log_r).to(scores.dtype))
        return out


def _final_norm(model) -> nn.Module:
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None) or getattr(decoder, "ln_f", None)
    if norm is None:
        raise ConfigError(f"NADO decoding: cannot find the final norm of {type(inner).__name__}", field="decoding")
    return norm


def parse_decoding_spec(spec: str) -> tuple[str, dict]:
    """``PATH[,top_k=K][,alpha=A]`` -> (path, options)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError("nado decoding needs the constraint model's directory: nado:PATH", field="decoding")
    opts: dict = {}
    for p in parts[1:]:
        key, _, val = p.partition("=")
        if key == "top_k":
            opts["top_k"] = int(val)
        elif key == "alpha":
            opts["alpha"] = float(val)
        else:
            raise ConfigError(f"unknown nado decoding option {key!r} (options: top_k, alpha)", field="decoding")
    return parts[0], opts


def nado_decoding(model, tokenizer, spec: str) -> NadoLogitsProcessor:
    """Factory for ``safeft.eval.decoding``: ``spec`` = ``PATH[,top_k=K][,alpha=A]``."""
    path, opts = parse_decoding_spec(spec)
    return NadoLogitsProcessor(model, ConstraintModel.load(path), **opts)
