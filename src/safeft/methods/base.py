"""What a method is: a name, a paper, validated options, and its loss (or its own loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..engine.run import Run


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class LossOutput:
    """A micro-batch's loss as a *sum over response tokens* and the token count.

    The engine divides by the number of response tokens in the whole (accumulated,
    all-process) batch, so losses are token-averaged exactly as transformers' own CE is,
    whatever the gradient accumulation or process count.
    """

    loss_sum: torch.Tensor
    n_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``name``, ``summary``, ``paper`` and ``Params``.

    A loss-based method overrides :meth:`compute_loss` (and :meth:`prepare` for a
    preparation pass, e.g. caching reference log-probs); a method with its own loop
    (PPO, rounds of sampling) overrides :meth:`train`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, run: Run):
        self.params = params
        self.run = run

    @classmethod
    def validate_params(cls, raw: dict[str, Any]) -> BaseModel:
        try:
            return cls.Params.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            known = ", ".join(cls.Params.model_fields) or "none"
            raise ConfigError(
                f"{msg} for method {cls.name!r} (got {err.get('input')!r}; options: {known})",
                field=f"method.{loc}",
            ) from None

    def prepare(self, trainer) -> None:
        """Runs once after the trainer is built, before the first step."""

    def checkpoint_problem(self, ckpt: Path) -> str | None:
        """Why the method's own files in Trainer checkpoint ``ckpt`` cannot be resumed from
        (None if whole). A method that saves state beside the Trainer's checks it here; a
        checkpoint with a problem is skipped like one with broken weights."""
        return None

    def compute_loss(self, model, batch: dict, trainer) -> LossOutput:
        raise NotImplementedError

    def train(self):
        """Default loop: transformers' Trainer with this method's loss."""
        from ..engine.trainer import fit

        return fit(self.run, self)
