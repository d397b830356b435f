"""Shared helpers for benchmark scripts: timing, peak memory, merging results JSON."""

from __future__ import annotations

import datetime as _dt
import json
import os
import resource
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def merge_results(path: str | Path, entries: dict, **top_level) -> dict:
    """Add/replace ``entries`` (and top-level keys) in a results JSON, atomically."""
    p = Path(path)
    data = json.loads(p.read_text()) if p.is_file() else {}
    data.update(top_level)
    data.update(entries)
    data["date"] = _dt.date.today().isoformat()
    tmp = p.with_name(f".{p.name}.tmp")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)
    return data


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB). Use a fresh subprocess per mode,
    spawned while the parent is still small: Linux keeps the peak across fork + exec."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_engine_run(overrides: dict) -> tuple[dict, dict]:
    """One whole run through the real engine (config -> run -> method.train()), seed 0.

    Returns the timing record ``{"run_s", "peak_mem_mb", "steps", "examples"}`` (wall time from
    the method's start to the saved model) and the training summary.
    """
    from transformers import set_seed

    from safeft.config import load_config
    from safeft.engine.run import build_run
    from safeft.methods import get_method_class

    cfg = load_config(None, overrides)
    cls = get_method_class(cfg.method.name)
    set_seed(0)
    run = build_run(cfg)
    method = cls(cls.validate_params(cfg.method.params()), run)
    t = time.perf_counter()
    summary = method.train()
    record = {"run_s": time.perf_counter() - t, "peak_mem_mb": peak_rss_mb(),
              "steps": summary["global_step"], "examples": len(run.train_dataset)}
    return record, summary
