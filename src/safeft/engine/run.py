"""A run: the resolved config, the model and tokenizer, the tokenized data and the output dir."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from ..config import RunConfig, dump_config
from ..data import detect_format, load_rows, tokenize_rows
from ..errors import ConfigError, DataError
from ..models import is_peft, load_model

log = logging.getLogger(__name__)

# What safeft itself writes into an output directory; --overwrite replaces only these.
OWNED = ("checkpoints", "model", "metrics.jsonl", "config.yaml", "reference_cache.safetensors",
         "train_summary.json", "epoch_eval", "mix_report.json")


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a unique temp file beside ``path``, fsync it, then rename over ``path``:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def process_state():
    """accelerate's process state, initialised as the Trainer will (gloo on CPU-only hosts).

    ``PartialState()`` without ``cpu=True`` on a machine with no GPU reports one process
    even under ``accelerate launch``, and being a shared singleton would stay so.
    """
    import torch
    from accelerate.state import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1:
        _register_teardown()
    return state


@functools.cache
def _register_teardown() -> None:
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter
    shutdown, gloo's worker threads can be destroyed while still joinable, and the
    process aborts ("terminate called without an active exception", SIGABRT) after its
    work is done, failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare_output_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory", field="output_dir")
    if out.is_dir() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(
            f"{out} exists and is not empty; pass --overwrite to replace safeft's outputs there, "
            "or --resume to continue",
            field="output_dir",
        )
    if cfg.overwrite and not cfg.resume and out.is_dir():
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Run:
    cfg: RunConfig
    model: object
    tokenizer: object
    train_dataset: datasets.Dataset | None
    eval_dataset: datasets.Dataset | None
    output_dir: Path
    extras: dict = field(default_factory=dict)

    @property
    def is_lora(self) -> bool:
        return is_peft(self.model)


def _type_name(v) -> str:
    return "missing" if v is None else type(v).__name__


def row_problem(row: dict, fmt: str, spec) -> str | None:
    """Why one data row cannot be used in format ``fmt`` (None if it can)."""
    if fmt == "text":
        v = row.get(spec.text_field)
        return None if isinstance(v, str) else f"{spec.text_field!r} is {_type_name(v)}, expected text"
    if fmt == "prompt_response":
        for f in (spec.prompt_field, spec.response_field):
            if not isinstance(row.get(f), str):
                return f"{f!r} is {_type_name(row.get(f))}, expected text"
        return None
    msgs = row.get(spec.messages_field)
    if not isinstance(msgs, list) or len(msgs) < 2:
        got = f"{len(msgs)} message(s)" if isinstance(msgs, list) else _type_name(msgs)
        return f"{spec.messages_field!r} must be a list of at least two messages (got {got})"
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"{spec.messages_field!r}[{j}] must be an object with text 'role' and 'content'"
        if m["role"] not in ("system", "user", "assistant", "tool"):
            return f"{spec.messages_field!r}[{j}] has role {m['role'][:40]!r} (expected system, user, assistant or tool)"
    if msgs[-1]["role"] != "assistant":
        return f"{spec.messages_field!r} must end with an assistant turn"
    return None


def _detect(rows: list[dict], spec) -> str:
    """The data format, read off the first row that shows one (a malformed first row is then
    reported as that row, or skipped, instead of hiding the format of the rest)."""
    err = None
    for r in rows[:1000]:
        try:
            return detect_format([r], spec)
        except DataError as e:
            err = err or e
    msg = str(err)
    if err.field and msg.startswith(f"{err.field}: "):
        msg = msg[len(err.field) + 2:]
    raise DataError(f"{spec.path}: {msg}", field="data") from None


def _usable_rows(rows: list[dict], spec) -> list[dict]:
    """Rows with the fields their format needs; a bad one is an error naming the file and row,
    or with ``on_bad_rows: skip`` is skipped and counted."""
    fmt = _detect(rows, spec)
    good, bad = [], 0
    for i, r in enumerate(rows, 1):
        problem = row_problem(r, fmt, spec)
        if problem is None:
            good.append(r)
        elif spec.on_bad_rows == "skip":
            bad += 1
        else:
            raise DataError(f"{spec.path}: row {i}: {problem}; fix it or set on_bad_rows: skip", field="data")
    if bad:
        log.warning("%s: skipped %d malformed rows (on_bad_rows: skip)", spec.path, bad)
    if not good:
        raise DataError(f"{spec.path}: no usable row ({bad} malformed)", field="data")
    return good


def tokenize(cfg: RunConfig, spec, tokenizer) -> datasets.Dataset:
    rows = _usable_rows(load_rows(spec, cfg.data.data_dir), spec)
    try:
        examples = tokenize_rows(rows, tokenizer, spec, cfg.data.max_length, cfg.data.packing)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a chat template rejecting a conversation
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{spec.path}: cannot format the data ({first})", field="data") from None
    examples = [ex for ex in examples if any(lbl != -100 for lbl in ex["labels"][1:])]
    if not examples:
        raise DataError(f"{spec.path}: no example has a response token left after truncation to {cfg.data.max_length}", field="data.max_length")
    return datasets.Dataset.from_list(examples)


def build_run(cfg: RunConfig, *, model=None, tokenizer=None) -> Run:
    """Validate everything that can fail on user input *before* touching the output dir."""
    if cfg.data.train is None and model is None:
        raise ConfigError("no training data: set data.train.path (or pass --data)", field="data.train")
    if model is None:
        model, tokenizer = load_model(cfg.model)
    train_ds = tokenize(cfg, cfg.data.train, tokenizer) if cfg.data.train else None
    eval_ds = tokenize(cfg, cfg.data.eval, tokenizer) if cfg.data.eval else None
    out = _prepare_output_dir_once(cfg)
    return Run(cfg, model, tokenizer, train_ds, eval_ds, out)


def _prepare_output_dir_once(cfg: RunConfig) -> Path:
    """Under N processes only the main one checks, clears and writes the output dir; the
    others wait for it (else they would find the main process's config.yaml and refuse a
    "non-empty" directory, or delete what it just wrote)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        out = prepare_output_dir(cfg)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        return out
    state = process_state()
    with state.main_process_first():
        if state.is_main_process:
            out = prepare_output_dir(cfg)
            atomic_write_text(out / "config.yaml", dump_config(cfg))
        else:
            out = Path(cfg.output_dir)
    return out


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as one ``write`` of one line; a kill mid-write can leave at most a
    cut last line, which readers skip and a resumed run trims (see ``_trim_metrics``)."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
