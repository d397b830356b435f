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
