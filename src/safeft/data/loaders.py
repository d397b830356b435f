"""Load rows from the hub (``datasets``), local files, or a built-in reader.

Local formats: ``.jsonl``, ``.json`` (a list of objects), ``.csv``, ``.parquet``, ``.txt``
(one example per line, as ``{"text": ...}``). Malformed rows are an error naming the file
and line, unless ``on_bad_rows: skip`` (then they are skipped and counted).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from ..config import DatasetSpec
from ..errors import DataError
from . import readers

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _read_jsonl(path: Path, skip_bad: bool) -> tuple[list[dict], int]:
    rows, bad = [], 0
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except (json.JSONDecodeError, ValueError) as e:
                if skip_bad:
                    bad += 1
                    continue
                msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                raise DataError(
                    f"{path}:{i}: malformed row ({msg}); fix it or set on_bad_rows: skip", field="data"
                ) from None
            rows.append(row)
    return rows, bad


def _read_csv(path: Path, skip_bad: bool) -> tuple[list[dict], int]:
    """CSV rows; a row with more or fewer fields than the header is malformed."""
    rows, bad = [], 0
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for r in reader:
                if None in r or None in r.values():
                    if skip_bad:
                        bad += 1
                        continue
                    n = len(reader.fieldnames or [])
                    raise DataError(
                        f"{path}:{reader.line_num}: malformed row (expected {n} fields like the header); "
                        "fix it or set on_bad_rows: skip", field="data",
                    )
                rows.append(r)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})", field="data") from None
    return rows, bad


def read_local(path: Path, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Rows of a local file, and how many malformed rows were skipped."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, skip_bad)
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})", field="data") from None
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of objects", field="data")
            good = [r for r in data if isinstance(r, dict)]
            if len(good) != len(data) and not skip_bad:
                raise DataError(f"{path}: item {next(i for i, r in enumerate(data) if not isinstance(r, dict))} is not an object", field="data")
            return good, len(data) - len(good)
        if suffix == ".csv":
            return _read_csv(path, skip_bad)
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist(), 0
            except (pa.ArrowException, OSError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DataError(f"{path}: not a readable Parquet file ({first})", field="data") from None
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [{"text": ln} for ln in lines if ln.strip()], 0
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", field="data") from None
    raise DataError(f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(LOCAL_SUFFIXES)})", field="data.path")


def _load_hub(path: str, name: str | None, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"cannot load hub dataset {path!r} (split {split!r}): {first}; "
            "for offline use pass a local file or --data-dir",
            field="data.path",
        ) from None
    return [dict(r) for r in ds]


def _builtin(spec: DatasetSpec, data_dir: str | None) -> list[dict]:
    local = Path(data_dir) if data_dir else (Path(spec.path) if Path(spec.path).exists() else None)
    if spec.reader in ("pubmedqa", "pubmedqa-text"):
        if local is not None:
            rows = readers.read_pubmedqa(local, spec.split)
        else:
            hub, cfg = readers.PUBMEDQA_HUB
            splits = {"train": ["train", "validation"], "test": ["test"], "all": ["train", "validation", "test"]}
            if spec.split not in splits:
                raise DataError(f"unknown PubMedQA split {spec.split!r} (expected train, test or all)", field="data.split")
            records = {}
            for hub_split in splits[spec.split]:
                for i, r in enumerate(_load_hub(hub, cfg, hub_split)):
                    records[str(r.get("pubid", f"{hub_split}-{i}"))] = r
            rows = readers.pubmedqa_rows_from_records(records)
        if spec.reader == "pubmedqa-text":
            rows = [{"text": r["text"], "id": r["id"]} for r in rows]
        return rows
    if spec.reader == "gsm8k":
        if local is not None:
            return readers.read_gsm8k(local, spec.split)
        hub, cfg = readers.GSM8K_HUB
        return [
            {"question": r["question"], "prompt": r["question"], "response": r["answer"],
             "answer": readers.gsm8k_answer(r["answer"])}
            for r in _load_hub(hub, cfg, spec.split)
        ]
    raise DataError(f"unknown reader {spec.reader!r}", field="data.reader")


def load_rows(spec: DatasetSpec, data_dir: str | None = None) -> list[dict]:
    """Rows for one dataset spec; raises :class:`DataError` on anything unusable."""
    if spec.reader != "auto":
        rows = _builtin(spec, data_dir)
    else:
        p = Path(spec.path).expanduser()
        if p.is_file():
            rows, bad = read_local(p, spec.on_bad_rows == "skip")
            if bad:
                log.warning("%s: skipped %d malformed rows", p, bad)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in LOCAL_SUFFIXES)
            if not files:
                raise DataError(f"{p}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files", field="data.path")
            rows = []
            for f in files:
                part, bad = read_local(f, spec.on_bad_rows == "skip")
                if bad:
                    log.warning("%s: skipped %d malformed rows", f, bad)
                rows.extend(part)
        elif spec.path.startswith((".", "/", "~")) or spec.path.endswith(LOCAL_SUFFIXES):
            raise DataError(f"{spec.path}: file not found", field="data.path")
        else:
            rows = _load_hub(spec.path, spec.name, spec.split)
    if spec.limit:
        rows = rows[: spec.limit]
    if not rows:
        raise DataError(f"{spec.path}: the dataset is empty", field="data.path")
    return rows
