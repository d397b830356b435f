"""The aligned reference p_ref for per-token regularizers, made cheap.

Modes:
- ``live``: under LoRA, the same weights with the adapter disabled (no second copy); under
  full fine-tuning, a frozen copy of the starting model.
- ``cached``: one no-grad pass over the training set before the first step stores, per
  response token, the reference's top-k token ids and log-probs and the log-prob of the
  training target. Every epoch then reuses it: no reference forward at all. Under full
  fine-tuning the pass runs on the model itself before any update (it *is* the reference
  then), so no copy is ever made.

The top-k KL is an approximation: both distributions are renormalised on the reference's
top-k support (see :func:`safeft.losses.kl_topk`); the target log-prob is exact.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import losses
from ..models import frozen_copy, is_peft, reference_mode, unwrap

log = logging.getLogger(__name__)


class Reference:
    def __init__(self, model, mode: str = "live", top_k: int = 32):
        if mode not in ("live", "cached"):
            raise ValueError(f"reference mode {mode!r}")
        self.mode, self.top_k = mode, top_k
        self._copy = None
        if mode == "live" and not is_peft(model):
            self._copy = frozen_copy(model)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def _as_reference(self, model):
        if self._copy is not None:
            # the copy is made before the Trainer moves the model to its device; follow it there
            device = next(unwrap(model).parameters()).device
            if next(self._copy.parameters()).device != device:
                self._copy.to(device)
            with torch.no_grad():
                yield self._copy
        elif is_peft(model):
            with reference_mode(model) as ref:
                yield ref
        else:  # cached pass on the not-yet-updated model
            inner = unwrap(model)
            was = inner.training
            inner.eval()
            try:
                with torch.no_grad():
                    yield inner
            finally:
                inner.train(was)

    def live_hidden(self, model, batch: dict, pos: losses.Positions) -> torch.Tensor:
        """The reference's final hidden states ``[N, H]`` at the response positions (no grad)."""
        with self._as_reference(model) as ref:
            return losses.position_hidden(ref, batch, pos)[0]

    def head_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """The reference's float32 logits for (a chunk of) :meth:`live_hidden` rows."""
        with self._as_reference(model) as ref:
            return losses.lm_head(ref)(hidden).float()

    def live_logits(self, model, batch: dict, pos: losses.Positions) -> torch.Tensor:
        """Reference logits ``[N, V]`` at the response positions (no grad)."""
        return self.head_logits(model, self.live_hidden(model, batch, pos))

    # --- cached mode ---------------------------------------------------------------------
    def build_cache(self, model, dataset, collator, batch_size: int, device) -> None:
        """One no-grad pass: per response token, the top-k ids/log-probs and the target's log-prob."""
        self.cache.clear()
        for start in range(0, len(dataset), batch_size):
            feats = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collator(feats).items()}
            pos = losses.response_positions(batch["labels"])
            hidden = self.live_hidden(model, batch, pos)
            parts = []
            for s in range(0, hidden.shape[0], losses.LOSS_CHUNK):
                e = min(s + losses.LOSS_CHUNK, hidden.shape[0])
                logp = torch.log_softmax(self.head_logits(model, hidden[s:e]), dim=-1)
                top_logp, top_idx = logp.topk(self.top_k, dim=-1)
                parts.append((top_idx, top_logp, logp.gather(-1, pos.targets[s:e, None]).squeeze(-1)))
            top_idx, top_logp, tgt = (torch.cat([q[j] for q in parts]) for j in range(3))
            counts = pos.mask.sum(1).tolist()
            for j, (a, b, c) in enumerate(zip(top_idx.split(counts), top_logp.split(counts), tgt.split(counts))):
                self.cache[int(batch["idx"][j])] = (a.to(torch.int32).cpu(), b.cpu(), c.cpu())

    def ensure_cache(self, trainer, dataset, output_dir: Path) -> None:
        """Load the run's cache if it is there (resume), else build it and save it (rank 0)."""
        path = output_dir / "reference_cache.safetensors"
        if self.load(path):
            return
        self.build_cache(trainer.model, dataset, trainer.data_collator,
                         trainer.args.per_device_eval_batch_size, trainer.args.device)
        if trainer.is_world_process_zero():
            self.save(path)

    def lookup(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenated (top-k ids, top-k log-probs, target log-probs) for a batch, row-major."""
        parts = [self.cache[int(i)] for i in batch["idx"]]
        return tuple(torch.cat([p[j] for p in parts]).to(device) for j in range(3))

    def save(self, path: Path) -> None:
        keys = sorted(self.cache)
        tensors = {}
        for k in keys:
            a, b, c = self.cache[k]
            tensors[f"{k}.idx"], tensors[f"{k}.logp"], tensors[f"{k}.tgt"] = a, b, c
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"top_k": str(self.top_k)})
        tmp.replace(path)

    def load(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a corrupt cache is rebuilt, not fatal
            log.warning("reference cache %s unreadable (%s); rebuilding", path, e)
            return False
        self.cache = {}
        for name in tensors:
            k, kind = name.split(".")
            if kind == "idx":
                self.cache[int(k)] = (tensors[name], tensors[f"{k}.logp"], tensors[f"{k}.tgt"])
        return bool(self.cache)
