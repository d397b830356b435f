"""Scalar rewards for RL fine-tuning: a registry of batched, gradient-free scorers.

A reward is any callable ``reward(prompts: list[str], responses: list[str]) -> torch.Tensor``
of shape ``[B]`` (float32, CPU). Rewards never see gradients: every built-in scorer runs
under :func:`torch.no_grad` and returns a detached tensor.

Spec strings (``method.reward`` in a config, ``get_reward(spec, **options)`` in Python):

- ``toxicity`` (default, offline): minus the toxicity of the response from the offline
  classifier (alt-profanity-check, a calibrated linear model). ``scale: logit`` (default)
  gives ``-log(p / (1 - p))`` with p clipped to [1e-4, 1 - 1e-4], the analogue of the
  paper's "negative toxic logit" reward (Chaudhary et al. 2024, §5: the toxic logit of
  unitary/toxic-bert); ``scale: prob`` gives ``-p``.
- ``judge:<name>``: any judge of :mod:`safeft.eval.judges` (``refusal``, ``toxicity``,
  ``hf-classifier``, ``llm``); reward = ``sign * score`` when the verdict has a score, else
  ``-1`` for unsafe and ``0`` for safe; a parse failure (``unsafe is None`` and no score)
  scores ``failure_reward`` (default 0).
- ``hf:<id or path>``: a transformers sequence classifier; ``label`` picks the class (name or
  index, default the last), ``output: logit|prob|logprob`` (default ``logit``), ``sign``
  (default ``+1``; use ``-1`` for "negative toxic logit"), ``max_length``, ``batch_size``,
  ``on: response|prompt+response`` (default ``response``).
- ``<module>:<function>``: a user callable ``fn(prompts, responses) -> sequence of floats``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError

Reward = Callable[[Sequence[str], Sequence[str]], torch.Tensor]
FACTORIES: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str):
    """Decorator: ``@register_reward("name")`` on a factory ``(**options) -> Reward``."""

    def deco(factory):
        FACTORIES[name] = factory
        return factory

    return deco


def _as_tensor(values, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if t.numel() != n:
        raise ConfigError(f"{what} returned {t.numel()} rewards for {n} responses", field="method.reward")
    if not torch.isfinite(t).all():
        raise ConfigError(f"{what} returned a non-finite reward", field="method.reward")
    return t


@register_reward("toxicity")
def offline_toxicity(scale: str = "logit", eps: float = 1e-4) -> Reward:
    """Minus the offline classifier's toxicity (logit or probability)."""
    if scale not in ("logit", "prob"):
        raise ConfigError(f"scale must be 'logit' or 'prob', got {scale!r}", field="method.reward_options.scale")
    from profanity_check import predict_prob

    def reward(prompts, responses):
        p = torch.as_tensor(predict_prob(list(responses)), dtype=torch.float32) if responses else torch.zeros(0)
        if scale == "prob":
            return -p
        p = p.clamp(eps, 1 - eps)
        return -(torch.log(p) - torch.log1p(-p))

    return reward


def judge_reward(name: str, sign: float = -1.0, failure_reward: float = 0.0, **opts) -> Reward:
    """A :mod:`safeft.eval.judges` judge as a reward (``sign * score``; see module doc)."""
    try:
        from ..eval.judges import get_judge
    except ImportError as e:  # the evaluation package is optional at import time
        raise ConfigError(f"judge rewards need safeft.eval.judges ({e})", field="method.reward") from None
    judge = get_judge(name, **opts)

    def reward(prompts, responses):
        out = []
        for v in judge.judge(list(prompts), list(responses)):
            if v.score is not None:
                out.append(sign * float(v.score))
            elif v.unsafe is None:
                out.append(failure_reward)
            else:
                out.append(-1.0 if v.unsafe else 0.0)
        return _as_tensor(out, len(responses), f"judge {name!r}")

    return reward


def hf_classifier_reward(
    name_or_path: str,
    label: str | int | None = None,
    output: str = "logit",
    sign: float = 1.0,
    max_length: int = 512,
    batch_size: int = 32,
    on: str = "response",
    device: str | None = None,
) -> Reward:
    """A transformers sequence classifier's chosen class as a reward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if output not in ("logit", "prob", "logprob"):
        raise ConfigError(f"output must be logit, prob or logprob, got {output!r}", field="method.reward_options.output")
    if on not in ("response", "prompt+response"):
        raise ConfigError(f"on must be 'response' or 'prompt+response', got {on!r}", field="method.reward_options.on")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        clf = AutoModelForSequenceClassification.from_pretrained(name_or_path)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot load classifier {name_or_path!r}: {first}", field="method.reward") from None
    clf.eval().requires_grad_(False)
    if device:
        clf.to(device)
    n_labels = clf.config.num_labels
    if label is None:
        idx = n_labels - 1
    elif isinstance(label, int) or str(label).lstrip("-").isdigit():
        idx = int(label) % n_labels
    else:
        by_name = {str(v).lower(): int(k) for k, v in clf.config.id2label.items()}
        if str(label).lower() not in by_name:
            raise ConfigError(
                f"label {label!r} not in the classifier's labels ({', '.join(by_name)})",
                field="method.reward_options.label",
            )
        idx = by_name[str(label).lower()]

    @torch.no_grad()
    def reward(prompts, responses):
        texts = list(responses) if on == "response" else [p + r for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            logits = clf(**enc.to(clf.device)).logits.float()
            if output == "prob":
                val = logits.softmax(-1)[:, idx]
            elif output == "logprob":
                val = logits.log_softmax(-1)[:, idx]
            else:
                val = logits[:, idx]
            out.append(val.cpu())
        return sign * torch.cat(out) if out else torch.zeros(0)

    return reward


def callable_reward(target: str, **opts) -> Reward:
    """``module:function``; extra options are passed as keyword arguments on each call."""
    mod_name, _, fn_name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import reward {target!r} ({e})", field="method.reward") from None
    if not callable(fn):
        raise ConfigError(f"{target!r} is not callable", field="method.reward")

    def reward(prompts, responses):
        with torch.no_grad():
            vals = fn(list(prompts), list(responses), **opts)
        if isinstance(vals, torch.Tensor):
            vals = vals.detach().float().flatten().tolist()
        return _as_tensor(vals, len(responses), target)

    return reward


def get_reward(spec: str | Reward = "toxicity", **options: Any) -> Reward:
    """Build a reward from a spec string (see the module doc) or pass a callable through."""
    if callable(spec):
        return spec
    if spec in FACTORIES:
        return FACTORIES[spec](**options)
    if spec.startswith("judge:"):
        return judge_reward(spec.split(":", 1)[1], **options)
    if spec.startswith("hf:"):
        return hf_classifier_reward(spec.split(":", 1)[1], **options)
    if ":" in spec and not spec.startswith(("/", ".")):
        return callable_reward(spec, **options)
    raise ConfigError(
        f"unknown reward {spec!r}: expected one of {', '.join(sorted(FACTORIES))}, 'judge:<name>', "
        "'hf:<classifier id or path>' or 'module:function'",
        field="method.reward",
    )


__all__ = ["FACTORIES", "Reward", "get_reward", "register_reward"]
