"""The Python API, mirroring the CLI: ``safeft.train(...)`` == ``safeft train ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import set_seed

from .config import RunConfig, load_config
from .engine.run import build_run
from .methods import get_method_class


def train(config: RunConfig | str | Path | None = None, *, model=None, tokenizer=None, **overrides: Any) -> dict:
    """Fine-tune per a config (object or YAML path) with dotted overrides.

    ``train("run.yaml", **{"method.name": "kl-decay", "training.learning_rate": 1e-4})``.
    ``model``/``tokenizer`` may be passed in-memory (tests, notebooks) instead of
    ``model.name_or_path``. Returns the training summary.
    """
    if isinstance(config, RunConfig):
        cfg = load_config(None, overrides, base=config.model_dump(mode="json"))
    else:
        cfg = load_config(config, overrides)
    method_cls = get_method_class(cfg.method.name)
    params = method_cls.validate_params(cfg.method.params())
    set_seed(cfg.training.seed)
    run = build_run(cfg, model=model, tokenizer=tokenizer)
    return method_cls(params, run).train()

