"""SAP, safety-aware probing (Wu, Zhang, Wei, Zhang, Sun, "Mitigating Fine-tuning Risks in
LLMs via Safety-Aware Probing Optimization", 2025; arXiv:2505.16737).

Notation (paper, Sec. 3). ``W`` are the trainable weights (the LoRA matrices under LoRA, every
weight under full fine-tuning). A probe ``V = {v_j}`` is added to the output hidden state of
chosen decoder layers, ``x_j = l_j(x_{j-1}) + v_j`` (one vector per layer, broadcast over every
token), giving the probed model ``f_{W,V}``. ``L(W, V, D)`` is the token-averaged LM loss.

- Contrastive safety loss (Def. 3.1): ``L_safety(W) = L(W, D_safe) − L(W, D_harmful)``;
  ``D_safe`` are harmful prompts with refusals, ``D_harmful`` the same kind of prompts with
  compliant answers. Its gradient ``∇_W L_safety`` points towards *less* safe weights
  (refusals less likely, compliance more likely); ``−∇_W L_safety`` is the safety-critical
  direction (Def. 3.2).
- Each step (the paper's bi-level scheme):

  1. ``ΔW = ε · ∇_W L_safety``: the weights moved a small step towards the harmful region;
  2. ``V_safe = β · ∇_V [L_useful(W + ΔW, V) − L_useful(W, V)]``: one ascent step on the
     gap ``L_su(V) = L_useful(W+ΔW, V) − L_useful(W, V)``;
  3. ``W ← W − α · ∇_W L_useful(W, V_safe)``: the optimizer step, on the task loss computed
     with the probe in place (here: :meth:`SAP.compute_loss` returns that loss; the Trainer
     steps).

**Signs.** To first order ``L_su(V) ≈ ε ⟨∇_W L_useful(W, V), ∇_W L_safety⟩``, so ascending it
makes the task gradient taken under ``V_safe`` lean *towards* ``∇_W L_safety``, and the
descent step ``−α ∇_W L_useful(W, V_safe)`` then lowers ``L_safety``. Explicitly, with
``J(W) = ∇_V L_useful(W, 0)`` and ``M = (∂J/∂W)ᵀ(∂J/∂W)`` (positive semi-definite)::

    ∇_W L_useful(W, V_safe) ≈ ∇_W L_useful(W) + βε · M ∇_W L_safety

so the change of ``L_safety`` over one step is SFT's minus ``αβε · gᵀMg ≤ 0``. This is the
reading of Theorem A.1 (an (α, β) step moves ``L_su`` like ``−L_safety``): with ``ε, β > 0``
and *ascent* on the gap, the probe steers the task update away from the harmful direction. A
descent on the gap (the other sign) would steer it *towards* harm; the authors' code ascends
(it zeroes the probe, then takes an optimizer step on ``L(W, V) − L(W+ΔW, V)``).

**Scales (our choices; the paper fixes neither).** The authors' code normalises the safety
gradient and scales it by the norm of the LoRA weights (``ΔW = ε ‖W‖ g/‖g‖``, ε = 2e-5), and
sets the probe with an Adam step of learning rate 0.05 from zero, whose size is about the
learning rate per coordinate whatever the gradient's scale. We do the same in closed form:
``epsilon`` is the relative radius ``‖ΔW‖ = ε ‖W‖``, and ``beta`` the probe's RMS per
coordinate (``V_safe = β √n · d/‖d‖`` with ``d`` the exact gap gradient, ``n`` its size: a
fixed-length step along the exact ascent direction). ``probe_step: raw`` gives the literal
``V_safe = β · d`` instead (``d`` from token-mean losses).

**Memory.** The safety pass runs in length-sorted micro-batches of at most
``safety_tokens_per_pass`` padded tokens (default: half the task micro-batch's size), each
back-propagated on its own, so it never holds more activations than a task step.

**Schedules** (``schedule``). ``exact``: every refresh step runs the safety pass, then two
probe-gradient passes at ``V = 0`` (``W + ΔW`` and ``W``) on the current batch, then the task
pass under ``V_safe``: four passes. ``shared`` (default, as the authors' code): the task pass
at ``(W, V)`` also yields ``∇_V L_useful(W, V)`` from the same backward, so a refresh step
costs the safety pass plus one probe pass at ``W + ΔW``; the probe it produces is applied from
the next step on (one step late, as in the authors' code). The first step is always done the
``exact`` way, so the very first update is already probed. ``refresh_every = k`` recomputes
``ΔW`` and ``V_safe`` every ``k`` optimizer steps (k = 1 is the paper) and reuses ``V_safe`` in
between. The probe passes differentiate with respect to ``V`` only: the trainable weights
are frozen for them (no weight gradients, no graph below the lowest probed layer), and
``ΔW`` is applied in place under ``no_grad`` and restored exactly from a copy.

**Fixes to the reference code.** Its safety pass feeds only the prompt as input and scores
the response tokens against logits of the (padded) prompt positions, with no shift; here
every pass feeds prompt + response and scores token t+1 from position t
(:mod:`safeft.losses`, LM head only at response positions). Its safety loss is the logistic
``−log σ(log p(safe) − log p(harmful))`` of summed log-probabilities; we use the paper's
difference of token-averaged losses (Def. 3.1).

The probe exists only during training forward passes: it is not a parameter, not saved, and
the released model is the plain fine-tuned model (same format, same inference cost).
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import losses
from ..config import DatasetSpec
from ..data import Collator, load_rows, tokenize_rows
from ..errors import ConfigError, DataError
from ..models import is_peft, unwrap
from . import register
from .base import LossOutput, Method

log = logging.getLogger(__name__)


class SAPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    safe_data: str | DatasetSpec
    """D_safe: harmful prompts with refusals. A local file / hub id, a dataset mapping
    (``{path, split, prompt_field, ...}``), or ``builtin`` (Do-Not-Answer train prompts with
    template refusals, :func:`safeft.data.safety.refusal_pairs`)."""
    harmful_data: str | DatasetSpec
    """D_harmful: harmful prompts with compliant answers (same forms; ``builtin`` gives
    :func:`safeft.data.safety.harmful_compliance_pairs`)."""
    epsilon: float = Field(1e-4, gt=0, description="ε: ‖ΔW‖ = ε·‖W‖ (authors' code: 2e-5)")
    beta: float = Field(0.01, gt=0, description="β: probe RMS / hidden-state RMS at each probed layer")
    probe_step: Literal["normalized", "raw"] = "normalized"
    layers: Literal["middle", "all"] | list[int] = "middle"
    """Decoder layers whose output gets the probe: ``middle`` (the middle third), ``all``, or
    indices (negative counts from the end)."""
    safety_batch_size: int = Field(4, ge=1, description="examples drawn from each safety set per refresh")
    safety_max_length: int = Field(256, ge=8)
    safety_tokens_per_pass: int | None = Field(None, ge=8)
    """Most padded tokens (rows × longest) per safety forward; the safety batch is split into
    micro-batches of this size. Default: half the task micro-batch's size, so the safety pass
    (its graph plus the gradient buffers it accumulates into) stays under a task step's peak."""
    refresh_every: int = Field(1, ge=1, description="k: recompute ΔW and V_safe every k optimizer steps")
    schedule: Literal["shared", "exact"] = "shared"
    seed: int = 0

    @field_validator("layers")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("expected at least one layer index")
        return v


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a (peft-wrapped) causal LM."""
    inner = unwrap(model)
    base = inner.get_base_model() if is_peft(inner) else inner
    dec = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"cannot find the decoder layers of {type(base).__name__}", field="method.layers")
    return layers


def resolve_layers(spec, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    if spec == "middle":
        lo = n_layers // 3
        return list(range(lo, max(lo + 1, n_layers - lo)))
    out = []
    for i in spec:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"layer {i} out of range for a model with {n_layers} layers", field="method.layers")
        out.append(j)
    return sorted(set(out))


def load_safety_set(spec: str | DatasetSpec, which: str, tokenizer, data_dir: str | None, max_length: int,
                    seed: int) -> list[dict]:
    field = f"method.{which}"
    if spec == "builtin":
        try:
            from ..data import safety
        except ImportError:  # pragma: no cover - the recipe module is optional
            raise ConfigError("'builtin' safety data needs safeft.data.safety", field=field) from None
        rows = (safety.refusal_pairs(data_dir, "train", seed=seed) if which == "safe_data"
                else safety.harmful_compliance_pairs(data_dir, "train", seed=seed))
        spec = DatasetSpec(path="builtin", format="prompt_response")
    else:
        spec = spec if isinstance(spec, DatasetSpec) else DatasetSpec(path=spec)
        try:
            rows = load_rows(spec, data_dir)
        except DataError as e:
            raise DataError(str(e), field=field) from None
    if not rows:
        raise DataError(f"{spec.path}: no rows", field=field)
    examples = tokenize_rows(rows, tokenizer, spec, max_length)
    examples = [ex for ex in examples if any(lbl != -100 for lbl in ex["labels"][1:])]
    if not examples:
        raise DataError(f"{spec.path}: no example has a response token", field=field)
    return examples


class _Sampler:
    """Endless seeded passes over a list, in a fresh random order each pass."""

    def __init__(self, items: list, seed: int):
        self.items, self.rng, self.order = items, random.Random(seed), []

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
            out.append(self.items[self.order.pop()])
        return out


@register
class SAP(Method):
    name = "sap"
    summary = "safety-aware probing: a hidden-state probe steers task updates away from the harmful direction"
    paper = "Wu, Zhang, Wei, Zhang, Sun, Mitigating Fine-tuning Risks in LLMs via Safety-Aware Probing Optimization (2025)"
    Params = SAPParams

    def __init__(self, params, run):
        super().__init__(params, run)
        p = params
        tok, dd = run.tokenizer, run.cfg.data.data_dir
        self.safe = load_safety_set(p.safe_data, "safe_data", tok, dd, p.safety_max_length, p.seed)
        self.harmful = load_safety_set(p.harmful_data, "harmful_data", tok, dd, p.safety_max_length, p.seed)
        seed = p.seed + run.cfg.training.seed
        self._safe_sampler = _Sampler(self.safe, seed)
        self._harm_sampler = _Sampler(self.harmful, seed + 1)
        self._collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0)
        blocks = decoder_layers(run.model)
        self.layers = resolve_layers(p.layers, len(blocks))
        hidden = run.model.config.hidden_size if hasattr(run.model, "config") else unwrap(run.model).config.hidden_size
        self.V = torch.zeros(len(self.layers), hidden)
        """The current probe, one row per probed layer (zero until the first refresh)."""
        self._rms = [torch.ones(())] * len(self.layers)  # hidden-state RMS at each probed layer (last pass)
        self._have_probe = False
        self._active: torch.Tensor | None = None  # the probe the hooks add (None: off)
        self._hooks = [blocks[j].register_forward_hook(self._hook(i)) for i, j in enumerate(self.layers)]
        self._step = -1
        self._refresh = False
        self._delta: list[torch.Tensor] | None = None  # ΔW of the current refresh step
        self._delta_done = False
        self._acc: dict | None = None  # shared schedule: Σ ∇_V L(W+ΔW, V), scale of the task backward

    # --- the probe ---------------------------------------------------------------------------

    def _hook(self, i: int):
        def add_probe(module, args, output):
            v = self._active
            if v is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            self._rms[i] = h.detach().float().pow(2).mean().sqrt()
            h = h + v[i].to(h.dtype)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        return add_probe

    @contextmanager
    def _probe(self, v: torch.Tensor | None):
        prev, self._active = self._active, v
        try:
            yield
        finally:
            self._active = prev

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def train(self):
        try:
            return super().train()
        finally:
            self.remove_hooks()

    # --- passes ------------------------------------------------------------------------------

    @staticmethod
    def _trainable(model) -> list[torch.nn.Parameter]:
        return [p for p in unwrap(model).parameters() if p.requires_grad]

    @contextmanager
    def _frozen(self, params):
        """Trainable weights frozen: a backward reaches the probe only (no weight gradients)."""
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    @staticmethod
    def _ce_sum(model, batch, pos) -> torch.Tensor:
        """Token-summed CE through the chunked LM head (as SFT computes it: no [N, vocab] tensor)."""
        hidden, _ = losses.position_hidden(model, batch, pos)
        targets = pos.targets
        total, _ = losses.chunked_loss(
            model, hidden, lambda logits, s, e: (F.cross_entropy(logits, targets[s:e], reduction="sum"), {}))
        return total

    @staticmethod
    def _n_targets(ex: dict) -> int:
        return sum(lbl != -100 for lbl in ex["labels"][1:])

    @staticmethod
    def _pack(examples: list[dict], budget: int) -> list[list[dict]]:
        """Length-sorted micro-batches whose padded size (rows × longest) stays within ``budget``."""
        out: list[list[dict]] = []
        for ex in sorted(examples, key=lambda e: len(e["input_ids"])):
            mb = out[-1] if out else None
            if mb and (len(mb) + 1) * len(ex["input_ids"]) <= budget:
                mb.append(ex)
            else:
                out.append([ex])
        return out

    def _safety_gradient(self, model, device, budget: int) -> tuple[list[torch.Tensor], dict]:
        """∇_W L_safety on a fresh safety batch; L_safety = L(D_safe) − L(D_harmful) (Def. 3.1).

        The safety examples go through the model in micro-batches of at most ``budget`` padded
        tokens (by default half the task micro-batch's size), each back-propagated on its own and
        the weight gradients summed, so the safety pass never holds more activations than a task step.
        """
        n = self.params.safety_batch_size
        params = self._trainable(model)
        grads = [torch.zeros_like(p) for p in params]
        nll = {}
        for name, examples, sign in (("safe", self._safe_sampler.take(n), 1.0),
                                     ("harm", self._harm_sampler.take(n), -1.0)):
            n_tok = max(sum(self._n_targets(ex) for ex in examples), 1)
            total = 0.0
            for mb in self._pack(examples, budget):
                batch = {k: v.to(device) for k, v in self._collate(mb).items()}
                ce = self._ce_sum(model, batch, losses.response_positions(batch["labels"]))
                total += ce.item()
                for acc, g in zip(grads, torch.autograd.grad(ce * (sign / n_tok), params, allow_unused=True)):
                    if g is not None:
                        acc.add_(g)
            nll[name] = total / n_tok
        m = {"nll_safe": nll["safe"], "nll_harmful": nll["harm"], "l_safety": nll["safe"] - nll["harm"]}
        return grads, m

    def _compute_delta(self, model, device, budget: int) -> dict:
        """ΔW = ε‖W‖ · g/‖g‖ with g = ∇_W L_safety (towards the harmful region)."""
        grads, m = self._safety_gradient(model, device, budget)
        params = self._trainable(model)
        with torch.no_grad():
            g_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            w_norm = torch.sqrt(sum((p.float() ** 2).sum() for p in params))
            scale = (self.params.epsilon * w_norm / g_norm) if g_norm > 0 else torch.zeros(())
            for g in grads:
                g.mul_(scale.to(g.dtype))
        self._delta = grads
        m["delta_norm"] = float(scale * g_norm)
        return m

    @contextmanager
    def _perturbed(self, model):
        """The trainable weights at W + ΔW for the duration of the block, restored exactly."""
        params = self._trainable(model)
        backup = []
        with torch.no_grad():
            for p, d in zip(params, self._delta):
                backup.append(p.detach().clone())
                p.add_(d)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def _probe_grad(self, model, batch, pos, v: torch.Tensor) -> tuple[torch.Tensor, float]:
        """∇_V of the token-summed task loss at probe ``v``, weights fixed (V-only backward)."""
        leaf = v.detach().clone().requires_grad_(True)
        with self._frozen(self._trainable(model)), self._probe(leaf):
            loss = self._ce_sum(model, batch, pos)
        (g,) = torch.autograd.grad(loss, leaf)
        return g, loss.item()

    def _set_probe(self, d: torch.Tensor, n_tokens: int) -> None:
        """V_safe from d = ∇_V[L(W+ΔW, V) − L(W, V)]: ``raw``: β·d (d of the token-mean loss);
        ``normalized``: per layer, a step along d whose RMS is β × the layer's hidden-state RMS."""
        p = self.params
        if p.probe_step == "raw":
            v = p.beta * d / max(n_tokens, 1)
        else:
            norm = d.norm(dim=-1, keepdim=True)
            rms = torch.stack([r.to(d.device) for r in self._rms])[:, None]
            v = torch.where(norm > 0, d * (p.beta * rms * math.sqrt(d.shape[-1]) / norm.clamp_min(1e-30)), 0.0)
        self.V = v.detach()
        self._have_probe = True

    # --- the step ----------------------------------------------------------------------------

    def _new_step(self, step: int) -> None:
        if self._acc is not None:
            self._finish_shared()
        self._step = step
        self._refresh = step % self.params.refresh_every == 0 or not self._have_probe
        self._delta = None
        self._delta_done = False

    def _finish_shared(self) -> None:
        """Shared schedule: V_safe from Σ∇_V L(W+ΔW, V) and the task backward's ∇_V L(W, V)."""
        acc, self._acc = self._acc, None
        leaf = acc["leaf"]
        scale = acc["scale"]
        if leaf.grad is None or scale is None or float(scale) == 0.0:
            return  # the task loss was never back-propagated (e.g. a skipped step)
        b = leaf.grad / scale
        self._set_probe(acc["a"] - b, acc["n"])

    def compute_loss(self, model, batch, trainer) -> LossOutput:
        pos = losses.response_positions(batch["labels"])
        if not (model.training and torch.is_grad_enabled()):
            ce = self._ce_sum(model, batch, pos)  # evaluation: the plain model, no probe
            return LossOutput(ce, pos.n, {"ce": ce.item() / max(pos.n, 1)})
        device = batch["input_ids"].device
        self.V = self.V.to(device)
        step = trainer.state.global_step
        if step != self._step:
            self._new_step(step)
        metrics: dict[str, float] = {}
        leaf = None
        if self._refresh:
            first = not self._delta_done
            if first:
                budget = self.params.safety_tokens_per_pass or batch["input_ids"].numel() // 2
                metrics.update(self._compute_delta(model, device, budget))
                self._delta_done = True
            if self.params.schedule == "exact" or not self._have_probe:
                if first:  # V_safe from this step's first micro-batch, gradients at V = 0
                    zero = torch.zeros_like(self.V)
                    with self._perturbed(model):
                        a, _ = self._probe_grad(model, batch, pos, zero)
                    b, _ = self._probe_grad(model, batch, pos, zero)
                    self._delta = None
                    self._set_probe(a - b, pos.n)
            else:
                with self._perturbed(model):
                    a, l_pert = self._probe_grad(model, batch, pos, self.V)
                if self._acc is None:
                    self._acc = {"a": torch.zeros_like(self.V), "n": 0, "scale": None,
                                 "leaf": self.V.detach().clone().requires_grad_(True)}
                self._acc["a"] += a
                self._acc["n"] += pos.n
                leaf = self._acc["leaf"]
                metrics["probe_gap"] = l_pert / max(pos.n, 1)
        with self._probe(leaf if leaf is not None else self.V):
            ce = self._ce_sum(model, batch, pos)
        if leaf is not None:
            acc = self._acc

            def keep_scale(g):
                acc["scale"] = g.detach()

            ce.register_hook(keep_scale)
            metrics["probe_gap"] -= ce.item() / max(pos.n, 1)
        metrics["ce"] = ce.item() / max(pos.n, 1)
        metrics["probe_rms"] = self.V.pow(2).mean().sqrt().item()
        return LossOutput(ce, pos.n, metrics)
