"""Checkpoints of the methods with their own training loop (``rlhf``, ``ra-rlhf``, ``quark``).

They follow the Trainer's layout and rules, so a killed run resumes as a Trainer-based one
does: ``output_dir/checkpoints/checkpoint-N`` after iteration N, written at
``training.save_strategy`` (``steps``: every ``save_steps`` iterations and after the last;
``epoch``: after each pass over the prompts), rotated to ``save_total_limit``, found on
``--resume`` by :func:`safeft.engine.trainer.resume_checkpoint` (newest usable one, broken
ones moved aside, ``metrics.jsonl`` trimmed). A checkpoint holds

- ``policy.safetensors``: the policy's trainable parameters by name (the LoRA adapter, or
  every weight under full fine-tuning); ``<name>.safetensors`` for side modules (the PPO
  value head) and the loop's own tensors (Quark's pool);
- ``optimizer.pt`` (and ``scaler.pt`` under fp16): torch-saved states, read back with
  ``weights_only=True``; no weights are pickled;
- ``rng_state.pth``: the python, numpy and torch (and CUDA) generators of every process;
- ``trainer_state.json``: ``global_step`` (the iteration), the method, and the loop's state
  (iteration counter, KL coefficient, prompt order, ...), as JSON.

Only the main process writes, into a temporary directory that is renamed into place once
complete, so a kill during a save leaves the previous checkpoint as the newest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..models import unwrap
from .run import Run
from .trainer import resume_checkpoint

STATE = "trainer_state.json"
REQUIRED = ("policy.safetensors", "optimizer.pt", "rng_state.pth")


def loop_checkpoint_problem(ckpt: Path) -> str | None:
    """What a loop checkpoint lacks beyond :func:`safeft.engine.trainer.checkpoint_problem`."""
    for name in REQUIRED:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError):
        return f"{STATE} is unreadable"
    if not isinstance(state, dict) or not isinstance(state.get("loop"), dict):
        return f"{STATE} holds no loop state"
    for name in state.get("tensors", []):
        if not (ckpt / f"{name}.safetensors").is_file():
            return f"{name}.safetensors is missing"
    return None


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)  # weights_only-loadable
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def random_state(saved: list) -> tuple:
    """A ``random.Random.getstate()`` stored as JSON, back as the tuple ``setstate`` takes."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def epoch_ended(step: int, per_step: int, n_items: int) -> bool:
    """Whether iteration ``step`` (1-based), drawing ``per_step`` of ``n_items`` prompts an
    iteration, completed a pass over them."""
    return step * per_step // n_items > (step - 1) * per_step // n_items


class LoopCheckpoints:
    """Save and restore a loop's checkpoints (see the module doc).

    ``model``: the policy (its trainable parameters are saved); ``optimizer``: the loop's
    (prepared) optimizer; ``modules``: side modules saved whole by name (the value head).
    """

    def __init__(self, run: Run, accelerator, method: str, model, optimizer, modules: dict | None = None):
        self.run, self.acc, self.method = run, accelerator, method
        self.model, self.optimizer, self.modules = model, optimizer, dict(modules or {})
        self.folder = run.output_dir / "checkpoints"
        self.resumed_from: str | None = None

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in unwrap(self.model).named_parameters() if p.requires_grad}

    def resume(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]] | None:
        """With ``resume`` set: restore the weights, optimizer and RNG states from the newest
        usable checkpoint and return its loop state (with ``step``) and its named tensors;
        None when there is none (training starts from the beginning)."""
        ckpt = resume_checkpoint(self.run, loop_checkpoint_problem)
        if ckpt is None:
            return None
        self.resumed_from, path = ckpt, Path(ckpt)
        meta = json.loads((path / STATE).read_text())
        if meta.get("method") != self.method:
            raise ConfigError(f"{ckpt} was written by method {meta.get('method')!r}, not {self.method!r}; resume "
                              "with the same method or start a new run", field="resume")
        params, saved = self._trainable(), load_file(str(path / "policy.safetensors"))
        if saved.keys() != params.keys():
            raise ConfigError(f"{ckpt}: its trainable weights do not match this model's (another model or LoRA "
                              "setting?); resume with the run's config", field="resume")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        for name, module in self.modules.items():
            module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
        optimizer = torch.load(path / "optimizer.pt", map_location=self.acc.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer)
        if self.acc.scaler is not None and (path / "scaler.pt").is_file():
            self.acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        rng = torch.load(path / "rng_state.pth", weights_only=True)
        if self.acc.process_index < len(rng):
            _set_rng_state(rng[self.acc.process_index])
        tensors = {name: load_file(str(path / f"{name}.safetensors")) for name in meta.get("tensors", [])}
        return {**meta["loop"], "step": meta["global_step"]}, tensors

    def due(self, step: int, total: int, epoch_end: bool) -> bool:
        """Whether ``training.save_strategy`` asks for a checkpoint after iteration ``step``
        of ``total`` (as the Trainer: ``steps`` also saves after the last one)."""
        t = self.run.cfg.training
        if t.save_strategy == "steps":
            return step % t.save_steps == 0 or step == total
        return t.save_strategy == "epoch" and epoch_end

    def save(self, step: int, loop_state: dict, tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write ``checkpoint-{step}`` (main process; a collective under N processes) and
        rotate to ``save_total_limit``."""
        from accelerate.utils import gather_object
        from transformers.trainer_utils import rotate_checkpoints

        rng = gather_object([_rng_state()]) if self.acc.num_processes > 1 else [_rng_state()]
        final = self.folder / f"checkpoint-{step}"
        if self.acc.is_main_process:
            tmp = self.folder / f".checkpoint-{step}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            cpu = {n: p.detach().cpu().contiguous() for n, p in self._trainable().items()}
            save_file(cpu, str(tmp / "policy.safetensors"))
            for name, module in self.modules.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in unwrap(module).state_dict().items()},
                          str(tmp / f"{name}.safetensors"))
            for name, named in (tensors or {}).items():
                save_file({k: v.detach().cpu().contiguous() for k, v in named.items()},
                          str(tmp / f"{name}.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.acc.scaler is not None:
                torch.save(self.acc.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(rng, tmp / "rng_state.pth")
            meta = {"global_step": step, "method": self.method, "num_processes": self.acc.num_processes,
                    "tensors": sorted(tensors or {}), "loop": loop_state}
            (tmp / STATE).write_text(json.dumps(meta))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate_checkpoints(str(self.folder), save_total_limit=self.run.cfg.training.save_total_limit)
        self.acc.wait_for_everyone()
        return final


__all__ = ["LoopCheckpoints", "epoch_ended", "loop_checkpoint_problem", "random_state"]
