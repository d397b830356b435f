"""transformers' Trainer with a method's loss, JSONL metrics, resume and epoch-end hooks."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..data import Collator
from ..models import save_model
from .run import Run, append_jsonl, atomic_write_text

log = logging.getLogger(__name__)


def training_arguments(run: Run, **extra) -> TrainingArguments:
    t = run.cfg.training
    args = t.model_dump(exclude={"disable_tqdm"})
    args.update(
        output_dir=str(run.output_dir / "checkpoints"),
        remove_unused_columns=False,
        prediction_loss_only=True,
        logging_first_step=True,
        disable_tqdm=t.disable_tqdm,
        report_to=t.report_to,
        use_cpu=not _has_accelerator(),
    )
    args.update(extra)
    return TrainingArguments(**args)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


class MetricsCallback(TrainerCallback):
    """Appends every log record to ``metrics.jsonl`` (one JSON object a line)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


class SafeftTrainer(Trainer):
    """The Trainer, with the loss supplied by a :class:`safeft.methods.Method`."""

    def __init__(self, *args, method, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self._method_logs: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.method.compute_loss(model, inputs, self)
        for k, v in out.metrics.items():
            self._method_logs[k].append(float(v))
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            loss = out.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        else:
            loss = out.loss_sum / max(out.n_tokens, 1)
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._method_logs and "loss" in logs:
            for k, vals in self._method_logs.items():
                logs[k] = sum(vals) / len(vals)
            self._method_logs.clear()
        super().log(logs, *args, **kwargs)

    @property
    def epoch_index(self) -> float:
        """Epoch of the current step: integer during epoch e (0-based), or fractional."""
        return float(self.state.epoch or 0.0)


def _trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop records a killed run logged after its last checkpoint."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def build_trainer(run: Run, method, callbacks=(), **arg_overrides) -> SafeftTrainer:
    args = training_arguments(run, **arg_overrides)
    collator = Collator(run.tokenizer.pad_token_id)
    cbs = [MetricsCallback(run.output_dir / "metrics.jsonl"), *callbacks]
    if run.cfg.epoch_eval.enabled:
        from ..eval.callback import EpochEvalCallback

        cbs.append(EpochEvalCallback(run))
    return SafeftTrainer(
        model=run.model,
        args=args,
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        data_collator=collator,
        processing_class=run.tokenizer,
        callbacks=cbs,
        method=method,
    )


def fit(run: Run, method, callbacks=()) -> dict:
    """Train with ``method``'s loss; returns the summary also written to train_summary.json."""
    trainer = build_trainer(run, method, callbacks)
    resume_from = None
    if run.cfg.resume:
        resume_from = get_last_checkpoint(str(run.output_dir / "checkpoints"))
        if resume_from:
            state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
            _trim_metrics(run.output_dir / "metrics.jsonl", state["global_step"])
            log.info("resuming from %s", resume_from)
    method.prepare(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    save_model(run.model, run.tokenizer, run.output_dir / "model", merge=run.cfg.model.lora.merge)
    summary = {
        "method": method.name,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "epochs": trainer.state.epoch,
        "resumed_from": resume_from,
    }
    if trainer.is_world_process_zero():
        atomic_write_text(run.output_dir / "train_summary.json", json.dumps(summary, indent=2))
    return summary

