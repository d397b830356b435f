"""Evaluation at every epoch end, appended to the run's ``metrics.jsonl``.

Enabled by the ``epoch_eval`` config section (:class:`safeft.config.EpochEvalConfig`):
``suites``, ``n``, ``max_new_tokens``, ``judges``, ``seed``. The same fixed, seeded subset
is evaluated at every epoch, so the curves compare like with like (the per-epoch toxicity
curves of the KL-decay paper, Vorontsov et al. 2024). Each epoch's generations and
results.json go to ``RUN_DIR/epoch_eval/epoch-<e>/``; one record
``{"step", "epoch", "eval/<suite>/<metric>": value, ...}`` is appended to
``RUN_DIR/metrics.jsonl``. It runs on the main process only (the others wait at their next
collective operation); generation is seeded inside a forked RNG, so training's random stream
is the same with or without it.

Suite names ``perplexity``, ``pubmedqa`` and ``gsm8k`` in ``suites`` are utility tasks
(:mod:`safeft.eval.utility`), logged as ``eval/utility/<metric>``.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..engine.run import append_jsonl
from .utility import UTILITY_TASKS

log = logging.getLogger(__name__)


def flatten_results(results: dict) -> dict:
    """results.json -> ``{"eval/<suite>/<metric>": value}`` (and ``eval/utility/<metric>``)."""
    flat = {}
    for suite, body in results.get("suites", {}).items():
        for metric, s in body.get("metrics", {}).items():
            flat[f"eval/{suite}/{metric}"] = s["value"]
    for metric, s in results.get("utility", {}).items():
        flat[f"eval/utility/{metric}"] = s["value"]
    return flat


class EpochEvalCallback(TrainerCallback):
    def __init__(self, run, batch_size: int = 16):
        self.run = run
        self.cfg = run.cfg.epoch_eval
        self.batch_size = batch_size

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        from .runner import evaluate

        model = model if model is not None else self.run.model
        tokenizer = processing_class if processing_class is not None else self.run.tokenizer
        epoch = state.epoch or 0.0
        tag = f"{epoch:g}"
        suites = [s for s in self.cfg.suites if s not in UTILITY_TASKS]
        utility = [s for s in self.cfg.suites if s in UTILITY_TASKS]
        out_dir = self.run.output_dir / "epoch_eval" / f"epoch-{tag}"
        log.info("epoch-end evaluation (epoch %s): %s", tag, ", ".join(self.cfg.suites))
        results = evaluate(
            model, tokenizer, suites=suites, judges=list(self.cfg.judges), out_dir=out_dir, n=self.cfg.n,
            seed=self.cfg.seed, data_dir=self.run.cfg.data.data_dir, max_new_tokens=self.cfg.max_new_tokens,
            batch_size=self.batch_size, utility=utility, model_name=self.run.cfg.model.name_or_path,
            method=self.run.cfg.method.name,
        )
        append_jsonl(self.run.output_dir / "metrics.jsonl",
                     {"step": state.global_step, "epoch": epoch, **flatten_results(results)})


__all__ = ["EpochEvalCallback", "flatten_results"]
