"""Helpers for code that runs under ``accelerate launch`` (N processes).

:func:`generate_across_processes` spreads an evaluation's prompts over the processes and
returns every response, in prompt order, on every rank. :func:`loop_accelerator` and
:func:`gather_batches` serve the methods with their own training loop (``rlhf``,
``ra-rlhf``, ``quark``): DDP over N processes, each rolling out its own shard, with the
statistics that must be global computed on the gathered batch.
"""

from __future__ import annotations

import os

import torch

from .engine.run import process_state
from .errors import ConfigError

_SHARDED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
            "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def loop_accelerator(method: str, *, bf16: bool = False):
    """The ``accelerate.Accelerator`` of a method with its own loop: one process, or DDP over
    N (gloo on CPU-only hosts).

    Such a loop generates with the whole policy between updates, so sharded parameters
    (FSDP, DeepSpeed ZeRO, Megatron) are refused with a one-line error. Mixed precision is the
    launch config's ``mixed_precision`` (``ACCELERATE_MIXED_PRECISION``), else bf16 when
    ``bf16`` (``training.bf16``) is set: the loop runs every forward pass (generation, the
    rollout's log-probs, the reference and value passes, the update) inside the
    accelerator's ``autocast``, so the rollout's log-probs and the update's come from the
    same arithmetic. fp16 needs a GPU (accelerate applies no fp16 autocast on a CPU) and is
    refused on a CPU-only host. As transformers' ``TrainingArguments`` does, the accelerator
    state left by an earlier run in this process is reset first (the process group,
    ``PartialState``, is kept).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    for var, name in _SHARDED.items():
        if os.environ.get(var, "false").lower() in ("1", "true", "yes"):
            raise ConfigError(f"{method} runs under DDP only (one process or --num-processes N); "
                              f"{name} is not supported: launch it without that accelerate config",
                              field="--accelerate-config")
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mp == "no" and bf16:
        mp = "bf16"
    if mp not in ("no", "bf16", "fp16"):
        raise ConfigError(f"{method} supports mixed_precision no, bf16 or fp16, not {mp!r}",
                          field="--accelerate-config")
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError(f"{method}: fp16 mixed precision needs a GPU (accelerate applies no fp16 autocast "
                          "on a CPU); use bf16", field="--accelerate-config")
    process_state()  # gloo on CPU-only hosts, as the Trainer does
    AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp)


def rank_seed(seed: int) -> int:
    """This process's sampling seed: ``seed`` on rank 0 (so one process is unchanged), a
    distinct stream on every other rank (each samples its own rollouts)."""
    return seed + 1_000_003 * process_state().process_index


def _cat_padded(parts: list[torch.Tensor], value, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in parts)
    out = []
    for t in parts:
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
        out.append(torch.cat([pad, t] if left else [t, pad], 1))
    return torch.cat(out)


def gather_batches(batch: dict, *, left_padded: tuple[str, ...] = (), pad_values: dict | None = None) -> dict:
    """Every process's ``batch`` joined in rank order, on every rank (a collective).

    Values are lists (concatenated), 1-D CPU tensors (concatenated) or 2-D CPU tensors
    ``[rows, width]``, padded to the widest process's width with ``pad_values[key]`` (default
    0), on the left for the keys in ``left_padded``, else on the right. With one process the
    batch is returned as it is.
    """
    from accelerate.utils import gather_object

    if process_state().num_processes == 1:
        return batch
    parts = gather_object([batch])
    pad_values = pad_values or {}
    out = {}
    for key, first in batch.items():
        vals = [p[key] for p in parts]
        if not isinstance(first, torch.Tensor):
            out[key] = [x for v in vals for x in v]
        elif first.dim() == 1:
            out[key] = torch.cat(vals)
        else:
            out[key] = _cat_padded(vals, pad_values.get(key, 0), key in left_padded)
    return out


def reduce_stats(stats: dict[str, float], op: str = "sum") -> dict[str, float]:
    """``stats`` reduced over processes (``sum``, ``mean`` or ``max``); as it is with one."""
    state = process_state()
    if state.num_processes == 1 or not stats:
        return dict(stats)
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=state.device)
    dist = torch.distributed
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t = t / state.num_processes
    return dict(zip(stats, t.tolist()))


def generate_across_processes(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """:func:`safeft.eval.generate.generate` with the prompts split across processes.

    Each process takes a contiguous shard (``PartialState.split_between_processes``) and
    generates for it; the shards are gathered in rank order, which is the prompt order, so
    the result is the list one process would return (``num_return_sequences`` per prompt,
    prompt i's at ``i*k .. i*k+k-1``). Greedy decoding gives the same text as one process;
    sampling gives equally valid but different samples (each process has its own stream).
    Every rank must call this (the gather is collective) and gets the full list.
    """
    from accelerate.utils import gather_object

    from .eval.generate import generate

    state = process_state()
    if state.num_processes == 1:
        return generate(model, tokenizer, list(prompts), **kwargs)
    with state.split_between_processes(list(prompts)) as shard:
        outs = generate(model, tokenizer, shard, **kwargs) if shard else []
    return list(gather_object(outs))


__all__ = ["gather_batches", "generate_across_processes", "loop_accelerator", "rank_seed", "reduce_stats"]
