"""Helpers for code that runs under ``accelerate launch`` (N processes).

:func:`generate_across_processes` spreads an evaluation's prompts over the processes and
returns every response, in prompt order, on every rank.
"""

from __future__ import annotations

from .engine.run import process_state


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


__all__ = ["generate_across_processes"]
