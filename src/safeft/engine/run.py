"""A run: the resolved config, the model and tokenizer, the tokenized data and the output dir."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from ..config import RunConfig, dump_config
from ..data import load_rows, tokenize_rows
from ..errors import ConfigError, DataError
from ..models import is_peft, load_model

log = logging.getLogger(__name__)

# What safeft itself writes into an output directory; --overwrite replaces only these.
OWNED = ("checkpoints", "model", "metrics.jsonl", "config.yaml", "reference_cache.safetensors",
         "train_summary.json", "epoch_eval")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def tokenize(cfg: RunConfig, spec, tokenizer) -> datasets.Dataset:
    rows = load_rows(spec, cfg.data.data_dir)
    examples = tokenize_rows(rows, tokenizer, spec, cfg.data.max_length, cfg.data.packing)
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
    out = prepare_output_dir(cfg)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    return Run(cfg, model, tokenizer, train_ds, eval_ds, out)


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
