"""transformers' Trainer with a method's loss, JSONL metrics, resume and epoch-end hooks."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import struct
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..data import Collator
from ..models import save_model
from .run import Run, append_jsonl, atomic_write_text, process_state

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


class InterruptFlag:
    """Ctrl-C (SIGINT) or SIGTERM: a flag that the training loop reads at a step boundary.

    The handler only sets the flag; the loop asks :meth:`any_rank` at the end of each step,
    which OR-reduces it across processes (a signal may reach the ranks a step apart, and a
    rank that stopped alone would leave the others waiting in an all-reduce), so every rank
    saves the same step and stops. A second Ctrl-C more than 2 s later aborts at once (the
    last completed checkpoint stays usable). Used by :class:`InterruptCallback` (the Trainer)
    and, as a context manager, by the methods with their own loop.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.flag = False
        self._first = 0.0
        self._previous: dict = {}

    def _handle(self, signum, frame):
        import time

        now = time.monotonic()
        if self.flag:
            # under a launcher a worker gets Ctrl-C twice at once (from the terminal and
            # forwarded by torchrun): only a later, deliberate second Ctrl-C aborts
            if signum == signal.SIGINT and now - self._first > 2.0:
                raise KeyboardInterrupt
            return
        self.flag, self._first = True, now
        log.warning("%s received: saving a checkpoint after this step, then stopping "
                    "(Ctrl-C again to abort now)", signal.Signals(signum).name)

    def install(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> InterruptFlag:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def any_rank(self, device) -> bool:
        """Whether any process has been signalled (a collective under N processes)."""
        dist = torch.distributed
        if not dist.is_initialized() or dist.get_world_size() <= 1:
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class InterruptCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM (:class:`InterruptFlag`): finish the current step, save a
    checkpoint, stop. ``should_save`` and ``should_training_stop`` are set together, so every
    rank saves the same step."""

    def __init__(self):
        self.signals = InterruptFlag()
        self.interrupted = False

    def on_train_begin(self, args, state, control, **kw):
        self.signals.install()

    def on_train_end(self, args, state, control, **kw):
        self.signals.restore()

    def on_step_end(self, args, state, control, **kw):
        if self.signals.any_rank(args.device):
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True


def stop_interrupted(step: int, checkpoint) -> None:
    """After an interrupted run saved ``checkpoint``: say how to continue, then raise
    ``KeyboardInterrupt`` (the CLI prints ``safeft: interrupted`` and exits 130)."""
    log.warning("stopped at step %d; checkpoint %s; continue with --resume (same output dir)", step, checkpoint)
    raise KeyboardInterrupt


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def safetensors_problem(path: Path) -> str | None:
    """Check a safetensors file's header and that its size matches (catches truncation)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                return f"{path.name} is truncated"
            (n,) = struct.unpack("<Q", head)
            if n > path.stat().st_size - 8:
                return f"{path.name} is truncated or unreadable (header of {n} bytes)"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    if path.stat().st_size != 8 + n + end:
        return f"{path.name} is truncated ({path.stat().st_size} of {8 + n + end} bytes)"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a Trainer checkpoint directory cannot be resumed from, or None if it looks whole.

    Checked without loading weights: ``trainer_state.json`` parses and names this step; a
    weights file (full model or LoRA adapter) exists and every safetensors file's size
    matches its header; every torch-saved state (optimizer, scheduler, RNG) is a complete zip.
    """
    state_file = ckpt / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__})"
    m = _CKPT.match(ckpt.name)
    if not isinstance(state, dict) or (m and state.get("global_step") != int(m.group(1))):
        return "trainer_state.json does not match the checkpoint's step"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for w in weights:
        problem = safetensors_problem(w)
        if problem:
            return problem
    for f in [*ckpt.glob("*.pt"), *ckpt.glob("*.pth")]:
        if not zipfile.is_zipfile(f):
            return f"{f.name} is truncated or corrupt"
    return None


def last_good_checkpoint(folder: Path, extra_check: Callable[[Path], str | None] | None = None) -> str | None:
    """The newest checkpoint in ``folder`` that passes :func:`checkpoint_problem` (and
    ``extra_check``: what a checkpoint needs beyond the Trainer's files, e.g.
    :func:`safeft.engine.loop_checkpoints.loop_checkpoint_problem` or a method's
    :meth:`~safeft.methods.base.Method.checkpoint_problem`).

    Newer, broken ones (a kill during a save, a full disk) are skipped with a warning naming
    what is wrong; the main process renames them ``broken-checkpoint-N`` (outside the
    ``checkpoint-*`` pattern, replacing an older one of that name), so the Trainer's rotation
    and the next save of step N do not mix with their leftovers.
    """
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))),
        reverse=True,
    )
    main = process_state().is_main_process
    for _, ckpt in found:
        problem = checkpoint_problem(ckpt) or (extra_check(ckpt) if extra_check else None)
        if problem is None:
            return str(ckpt)
        log.warning("checkpoint %s is incomplete or corrupt (%s); falling back to the previous one",
                    ckpt, problem)
        if main:
            target = ckpt.with_name("broken-" + ckpt.name)
            try:
                if target.exists():
                    shutil.rmtree(target)
                ckpt.rename(target)
            except OSError as e:
                log.warning("could not move %s aside (%s)", ckpt, e)
    return None


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
        if "loss" in logs and (self._method_logs or self.accelerator.num_processes > 1):
            local = {k: sum(v) / len(v) for k, v in self._method_logs.items() if v}
            self._method_logs.clear()
            if self.accelerator.num_processes > 1:
                # every rank logs here; report the mean over ranks, not rank 0's shard alone
                from accelerate.utils import gather_object

                merged: dict[str, list[float]] = defaultdict(list)
                for part in gather_object([local]):
                    for k, v in part.items():
                        merged[k].append(v)
                local = {k: sum(v) / len(v) for k, v in merged.items()}
            logs.update(local)
        super().log(logs, *args, **kwargs)

    def _finalize_training(self, *args, **kwargs):
        # transformers adds the loss accumulated since the last log step from this rank only;
        # under N processes make that tail the mean over ranks, so ``train_loss`` is the
        # global-batch loss whatever logging_steps is (as the logged losses already are)
        tail = getattr(self, "_tr_loss", None)
        if self.accelerator.num_processes > 1 and isinstance(tail, torch.Tensor):
            self._tr_loss = self.accelerator.reduce(tail.detach().clone(), reduction="mean")
        return super()._finalize_training(*args, **kwargs)

    @property
    def epoch_index(self) -> float:
        """Epoch of the current step: integer during epoch e (0-based), or fractional."""
        return float(self.state.epoch or 0.0)


def _trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop records a killed run logged after its last checkpoint (and a last
    line the kill cut in half), so the resumed run's records follow on without duplicates."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= upto_step:
            keep.append(ln)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def resume_checkpoint(run: Run, extra_check: Callable[[Path], str | None] | None = None) -> str | None:
    """With ``resume`` set: the newest usable checkpoint in ``output_dir/checkpoints`` (see
    :func:`last_good_checkpoint`), with ``metrics.jsonl`` trimmed to its step (to nothing when
    none is usable and training starts over), so no step is logged twice. None otherwise."""
    if not run.cfg.resume:
        return None
    ckpt = last_good_checkpoint(run.output_dir / "checkpoints", extra_check)
    step = json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"] if ckpt else 0
    if process_state().is_main_process:
        _trim_metrics(run.output_dir / "metrics.jsonl", step)
    if ckpt:
        log.info("resuming from %s", ckpt)
    else:
        log.info("no usable checkpoint in %s; starting from the beginning", run.output_dir / "checkpoints")
    return ckpt


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


def _save_final_model(trainer: SafeftTrainer, run: Run) -> None:
    """``output_dir/model`` as safetensors, written once (rank 0), atomically.

    Under FSDP / DeepSpeed the weights are sharded: gathering them is collective, so every
    rank calls the Trainer's ``save_model`` (FULL_STATE_DICT / ``zero3_save_16bit_model``,
    see configs/accelerate/) into a staging dir, which rank 0 then renames into place.
    """
    import os

    out = run.output_dir / "model"
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        staging = run.output_dir / ".model-gathering"
        trainer.save_model(str(staging))
        if trainer.is_world_process_zero():
            if run.cfg.model.lora.merge:
                log.warning("lora.merge is skipped under FSDP/DeepSpeed; merge the saved adapter afterwards")
            run.tokenizer.save_pretrained(staging)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
    elif trainer.is_world_process_zero():
        save_model(run.model, run.tokenizer, out, merge=run.cfg.model.lora.merge)
    trainer.accelerator.wait_for_everyone()


def fit(run: Run, method, callbacks=()) -> dict:
    """Train with ``method``'s loss; returns the summary also written to train_summary.json."""
    interrupt = InterruptCallback()
    trainer = build_trainer(run, method, [*callbacks, interrupt])
    resume_from = resume_checkpoint(run, method.checkpoint_problem)
    method.prepare(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    if interrupt.interrupted:
        ckpt = last_good_checkpoint(run.output_dir / "checkpoints", method.checkpoint_problem)
        stop_interrupted(trainer.state.global_step, ckpt)
    _save_final_model(trainer, run)
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

