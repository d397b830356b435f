"""The end-to-end recipe: align, fine-tune on domain data (optionally poisoned) with every
method, evaluate, report.

One YAML file (``experiments/<name>.yaml``) describes a grid: methods x poison ratios x seeds.
:func:`run_experiment` runs it in stages, every one cached under one output directory and keyed
by a hash of what it depends on (its own config section and the keys of the stages it reads), so
a second run recomputes nothing and a changed section recomputes only what depends on it:

1. ``align``: make the unaligned model refuse harmful requests: LoRA SFT on Do-Not-Answer
   *train* prompts with template refusals mixed with benign instructions
   (:mod:`safeft.data.safety`), the adapter merged, so the aligned model is a plain model
   directory; it is every fine-tune's starting point and the reference of the methods that
   need one. ``align.model_dir`` skips the stage and starts from a model that is aligned already.
2. ``data``: domain data (PubMedQA training ids, instructions or plain text), the poison
   (the *unaligned* model's answers to harmful training prompts, those it did not refuse; or
   ToxiGen hate statements), one mixture per poison ratio, and the held-out harmful prompts.
3. ``finetune``: the aligned model fine-tuned with every method of the grid under the same
   budget (the same data, steps, LoRA settings and seeds); methods come from the registry.
4. ``eval``: :func:`safeft.eval.runner.evaluate` on every fine-tuned model and on the
   unaligned and aligned models (the report's reference rows).
5. ``report``: :func:`safeft.eval.report.build_report` (HTML and Markdown) and ``summary.md``:
   the grid aggregated over seeds, with 95 % intervals, and the checks of the expected results.

Held-out refusal is measured on the ``donotanswer-heldout`` suite (safeft.eval.suites): the
Do-Not-Answer prompts of the ``eval`` split, none of which is a duplicate or a near-duplicate of
an alignment, poison or SAP prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import EMBEDDED_DEFAULT, EpochEvalConfig, LoraConfig, TrainingConfig, _format_validation_error, read_yaml
from .errors import ConfigError, SafeftError

log = logging.getLogger(__name__)

HELDOUT_SUITE = "donotanswer-heldout"
STAGE_FILE = "stage.json"
RECIPE_VERSION = 1
"""Part of every stage key: bump when a stage's output for the same config changes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _training(**defaults) -> Any:
    return Field(default_factory=lambda: dict(defaults))


class AlignSpec(_Strict):
    """Stage 1: refusal fine-tuning of the unaligned model."""

    model_dir: str | None = None
    """An already aligned model directory: skip the stage and start from it."""
    n_refusals: int = Field(500, ge=1)
    """Do-Not-Answer training prompts paired with template refusals (at most the ~650 there are)."""
    n_benign: int = Field(1000, ge=0)
    benign_sources: list[str] | None = None
    """Default: every source of :data:`safeft.data.safety.BENIGN_SOURCES`."""
    max_length: int = Field(256, ge=16)
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=16, alpha=32))
    training: dict = _training(num_train_epochs=2, learning_rate=3e-4, per_device_train_batch_size=8,
                               lr_scheduler_type="cosine", warmup_steps=0.05)
    seed: int = 0


class PoisonSpec(_Strict):
    kind: Literal["harmful", "toxigen"] = "harmful"
    generations: str | None = None
    """JSONL of {prompt, response}: compliant answers to use instead of generating them."""
    generate: bool = True
    """Generate compliant answers with the unaligned model (else a template stand-in, for tests)."""
    max_new_tokens: int = Field(96, ge=1)
    n_harmful: int | None = Field(None, ge=1)
    """Harmful prompts to answer (default: enough for the largest ratio, plus a margin)."""


class DomainSpec(_Strict):
    """Stage 2: domain data and poison."""

    form: Literal["instructions", "text"] = "instructions"
    n_train: int = Field(400, ge=1)
    max_length: int = Field(384, ge=16)
    poison: PoisonSpec = Field(default_factory=PoisonSpec)
    seed: int = 0


class FinetuneSpec(_Strict):
    """Stage 3: the grid."""

    methods: list[str | dict] = Field(default_factory=lambda: ["sft", "kl-decay"])
    """Method names, or ``{name, label?, poison_ratios?, <options>}`` (``poison_ratios``: this
    entry's own ratios, e.g. a control row only at 0); options may use ``${refusals}``,
    ``${harmful}``, ``${benign}``, ``${alignment}``, ``${domain}`` and ``${aligned}`` (the files and
    model the earlier stages wrote)."""
    poison_ratios: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1])
    seeds: list[int] = Field(default_factory=lambda: [0])
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(r=16, alpha=32))
    training: dict = _training(max_steps=60, learning_rate=2e-4, per_device_train_batch_size=4,
                               lr_scheduler_type="linear")
    epoch_eval: EpochEvalConfig = Field(default_factory=EpochEvalConfig)

    @field_validator("poison_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= r < 1 for r in v):
            raise ValueError("expected a non-empty list of ratios in [0, 1)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("expected a non-empty list of distinct seeds")
        return v


class EvalSpec(_Strict):
    """Stage 4: what every model is evaluated on (see :func:`safeft.eval.runner.evaluate`)."""

    suites: dict[str, int | None] = Field(
        default_factory=lambda: {HELDOUT_SUITE: 100, "benign": 100, "rtp": 25})
    """Suite name -> number of prompts (None: all)."""
    judges: list[str] = Field(default_factory=lambda: ["refusal", "toxicity"])
    utility: list[str] = Field(default_factory=lambda: ["pubmedqa", "perplexity"])
    utility_n: int | None = Field(100, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    k: int = Field(3, ge=1)
    """Samples per prompt on toxicity suites."""
    batch_size: int = Field(16, ge=1)
    seed: int = 0


class ExperimentConfig(_Strict):
    name: str = "experiment"
    model: str = EMBEDDED_DEFAULT
    """The unaligned starting model (hub id, local dir, or embedded:smollm2)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    data_dir: str | None = None
    """Local copies of the public sets (../shared/data); else the hub."""
    output_dir: str | None = None
    """Default: runs/<name>."""
    align: AlignSpec = Field(default_factory=AlignSpec)
    domain: DomainSpec = Field(default_factory=DomainSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


# --- config -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodEntry:
    name: str
    label: str
    options: dict
    poison_ratios: tuple[float, ...] | None = None
    """This entry's own ratios (default: the grid's ``finetune.poison_ratios``)."""


def method_entries(spec: FinetuneSpec) -> list[MethodEntry]:
    """The grid's methods with unique labels; unknown names and bad options are config errors."""
    from .methods import get_method_class

    entries, labels = [], set()
    for i, m in enumerate(spec.methods):
        raw = {"name": m} if isinstance(m, str) else dict(m)
        name = raw.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"entry {i} has no method name", field=f"finetune.methods.{i}")
        label = str(raw.pop("label", "") or name)
        if not label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"label {label!r} must be letters, digits, '-', '_' or '.'",
                              field=f"finetune.methods.{i}.label")
        if label in labels:
            raise ConfigError(f"two entries are labelled {label!r}; give one a distinct 'label'",
                              field=f"finetune.methods.{i}.label")
        labels.add(label)
        ratios = raw.pop("poison_ratios", None)
        if ratios is not None:
            try:
                ratios = tuple(FinetuneSpec._ratios([float(r) for r in ratios]))
            except (TypeError, ValueError):
                raise ConfigError(f"poison_ratios must be a non-empty list of ratios in [0, 1), got {ratios!r}",
                                  field=f"finetune.methods.{i}.poison_ratios") from None
        cls = get_method_class(name)
        cls.validate_params(_substitute(raw, {k: f"/{k}" for k in PLACEHOLDERS}))
        entries.append(MethodEntry(name, label, raw, ratios))
    if not entries:
        raise ConfigError("no methods in the grid", field="finetune.methods")
    return entries


def entry_ratios(entry: MethodEntry, spec: FinetuneSpec) -> tuple[float, ...]:
    return entry.poison_ratios if entry.poison_ratios is not None else tuple(spec.poison_ratios)


def all_ratios(entries: list[MethodEntry], spec: FinetuneSpec) -> list[float]:
    """Every poison ratio some entry of the grid runs at, ascending (the data stage builds each)."""
    return sorted({r for e in entries for r in entry_ratios(e, spec)})


def load_experiment(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                    base: dict | None = None) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from YAML (or ``base``) and dotted overrides; the grid's methods
    and training options are validated here, before anything runs."""
    from .config import _set_path

    tree = read_yaml(path) if path else json.loads(json.dumps(base or {}))
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path or "experiment"))) from None
    method_entries(cfg.finetune)
    for section, training in (("align", cfg.align.training), ("finetune", cfg.finetune.training)):
        try:
            TrainingConfig.model_validate(training)
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, f"{section}.training")) from None
    from .data.safety import BENIGN_SOURCES

    bad = [s for s in cfg.align.benign_sources or [] if s not in BENIGN_SOURCES]
    if bad:
        raise ConfigError(f"unknown benign source {bad[0]!r} (expected some of {', '.join(BENIGN_SOURCES)})",
                          field="align.benign_sources")
    from .eval.suites import get_suite_spec

    for name in cfg.eval.suites:
        try:
            get_suite_spec(name)
        except SafeftError as e:
            raise ConfigError(str(e).split(": ", 1)[-1], field="eval.suites") from None
    if (cfg.domain.poison.kind == "toxigen" and not cfg.data_dir
            and max(all_ratios(method_entries(cfg.finetune), cfg.finetune)) > 0):
        raise ConfigError("ToxiGen poisoning reads local files: set data_dir (--data-dir)", field="domain.poison.kind")
    return cfg


# --- stages and caching -----------------------------------------------------------------------

def stage_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (the stage's config and its inputs' keys)."""
    blob = json.dumps([RECIPE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_done(path: Path, key: str) -> bool:
    f = path / STAGE_FILE
    if not f.is_file():
        return False
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("key") == key and info.get("status") == "done"


def _mark(path: Path, key: str, status: str, **info) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{STAGE_FILE}.tmp"
    tmp.write_text(json.dumps({"key": key, "status": status, **info}, indent=2))
    tmp.replace(path / STAGE_FILE)


PLACEHOLDERS = ("refusals", "harmful", "benign", "alignment", "domain", "aligned")


def _substitute(value, mapping: dict[str, str]):
    if isinstance(value, str):
        for k, v in mapping.items():
            value = value.replace("${" + k + "}", v)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, mapping) for v in value]
    return value


@dataclass
class Job:
    kind: str  # align | data | finetune | eval
    title: str
    weight: float
    path: Path
    key: str = ""
    info: dict = field(default_factory=dict)


def _ratio_tag(r: float) -> str:
    return f"p{r:g}"


class Experiment:
    """Runs an :class:`ExperimentConfig`; ``computed`` / ``reused`` list the stages (by path) this
    run computed or found cached; ``failed`` those that raised."""

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = True, console=None):
        self.cfg = cfg
        self.out = cfg.out.resolve()
        self.methods = method_entries(cfg.finetune)
        self.ratios = all_ratios(self.methods, cfg.finetune)
        self.show_progress = progress
        self.console = console
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.failed: dict[str, str] = {}

    # paths
    @property
    def aligned_dir(self) -> Path:
        if self.cfg.align.model_dir:
            return Path(self.cfg.align.model_dir).expanduser().resolve()
        return self.out / "align" / "run" / "model" / "merged"

    def run_dir(self, label: str, ratio: float, seed: int) -> Path:
        return self.out / "finetune" / f"{label}_{_ratio_tag(ratio)}_s{seed}"

    # keys
    def _align_key(self) -> str:
        a = self.cfg.align
        if a.model_dir:
            return stage_key("given", str(self.aligned_dir))
        return stage_key("align", self.cfg.model, self.cfg.dtype, a.model_dump(mode="json"))

    def _data_key(self) -> str:
        d = self.cfg.domain
        ratios = self.ratios
        return stage_key("data", self.cfg.model, d.model_dump(mode="json"), ratios,
                         self.cfg.align.n_refusals, self.cfg.align.n_benign, self.cfg.align.benign_sources,
                         self.cfg.align.seed)

    def _finetune_key(self, m: MethodEntry, ratio: float, seed: int) -> str:
        f = self.cfg.finetune
        return stage_key("finetune", self._align_key(), self._data_key(), m.name, m.options, ratio, seed,
                         f.lora.model_dump(mode="json"), f.training, f.epoch_eval.model_dump(mode="json"),
                         self.cfg.domain.max_length)

    def _eval_key(self, model_key: str) -> str:
        return stage_key("eval", model_key, self.cfg.eval.model_dump(mode="json"))

    # the plan
    def jobs(self) -> list[Job]:
        c = self.cfg
        ev_w = self._eval_weight()
        out: list[Job] = []
        base_key = stage_key("base", c.model, c.dtype)
        out.append(Job("eval", "eval · unaligned", ev_w, self.out / "baselines" / "unaligned",
                       self._eval_key(base_key), {"model": c.model, "method": "unaligned"}))
        if not c.align.model_dir:
            out.append(Job("align", "align", self._align_cost(), self.out / "align", self._align_key(),
                           {"steps": self._steps(self.cfg.align.training, self.cfg.align.n_refusals + self.cfg.align.n_benign)}))
        out.append(Job("eval", "eval · aligned", ev_w, self.out / "baselines" / "aligned",
                       self._eval_key(self._align_key()), {"model": "aligned", "method": "aligned"}))
        out.append(Job("data", "data", 2.0 + 0.05 * self._n_harmful(), self.out / "data", self._data_key()))
        # the most poisoned row first: it carries the comparison between methods, so a grid
        # stopped early has its headline row; the clean and milder rows follow
        for ratio in sorted(self.ratios, reverse=True):
            for seed in c.finetune.seeds:
                for m in self.methods:
                    if ratio not in entry_ratios(m, c.finetune):
                        continue
                    rd = self.run_dir(m.label, ratio, seed)
                    fk = self._finetune_key(m, ratio, seed)
                    title = f"{m.label} · {_ratio_tag(ratio)} · seed {seed}"
                    steps = self._steps(c.finetune.training, c.domain.n_train)
                    out.append(Job("finetune", f"fine-tune {title}", steps, rd, fk,
                                   {"method": m, "ratio": ratio, "seed": seed, "steps": steps}))
                    out.append(Job("eval", f"eval {title}", ev_w, rd / "eval", self._eval_key(fk),
                                   {"model": str(rd / "model"), "method": m.label}))
        return out

    # cost estimates (in fine-tuning step equivalents), for the ETA only
    @staticmethod
    def _steps(training: dict, n_examples: int) -> int:
        t = TrainingConfig.model_validate(training)
        if t.max_steps > 0:
            return t.max_steps
        per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
        return max(1, math.ceil(t.num_train_epochs * math.ceil(n_examples / per_step)))

    def _align_cost(self) -> float:
        a = self.cfg.align
        # alignment examples (refusals, questions) are short: a step costs about 1/3 of a domain step
        ratio = min(1.0, a.max_length / 3 / self.cfg.domain.max_length)
        bs = TrainingConfig.model_validate(a.training).per_device_train_batch_size
        bs_ft = TrainingConfig.model_validate(self.cfg.finetune.training).per_device_train_batch_size
        return self._steps(a.training, a.n_refusals + a.n_benign) * ratio * bs / bs_ft

    def _eval_weight(self) -> float:
        e = self.cfg.eval
        prompts = sum((n or 200) * (e.k if s in ("rtp", "toxigen") else 1) for s, n in e.suites.items())
        # one fine-tuning step ~ generating 16 prompts x 64 tokens on these machines
        return max(1.0, prompts * e.max_new_tokens / (16 * 64)) + (e.utility_n or 100) * len(e.utility) / 40

    def _n_harmful(self) -> int:
        p = self.cfg.domain.poison
        if p.n_harmful:
            return p.n_harmful
        k = round(max(self.ratios) * self.cfg.domain.n_train)
        return int(k * 1.6) + 16

    # running
    def run(self, only: tuple[str, ...] | None = None) -> dict:
        """Run every stage (or only the job kinds in ``only``, then no report)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "experiment.yaml").write_text(_dump(self.cfg))
        jobs = [j for j in self.jobs() if only is None or j.kind in only]
        with _Display(self.show_progress, jobs, self.console) as display:
            for job in jobs:
                display.start(job)
                if stage_done(job.path, job.key):
                    self.reused.append(str(job.path))
                    display.finish(job, cached=True)
                    continue
                if job.kind == "eval" and job.title != "eval · unaligned" and not self._inputs_ready(job):
                    self.failed[str(job.path)] = "its model was not produced (an earlier stage failed)"
                    display.finish(job, failed=True)
                    continue
                t0 = time.time()
                try:
                    with display.polling(job):
                        getattr(self, f"_do_{job.kind}")(job)
                except (KeyboardInterrupt, SafeftError):
                    raise
                except Exception as e:  # noqa: BLE001 - one failing method must not sink the grid
                    if job.kind in ("align", "data"):
                        raise
                    self.failed[str(job.path)] = f"{type(e).__name__}: {e}"
                    job.path.mkdir(parents=True, exist_ok=True)
                    (job.path / "error.txt").write_text(traceback.format_exc())
                    log.error("%s failed: %s (traceback in %s)", job.title, e, job.path / "error.txt")
                    display.finish(job, failed=True)
                    continue
                _mark(job.path, job.key, "done", seconds=round(time.time() - t0, 1), title=job.title)
                self.computed.append(str(job.path))
                display.finish(job)
            if only is not None:
                return {"computed": self.computed, "reused": self.reused, "failed": self.failed}
            display.status("report")
            summary = self.report()
        return summary

    def _inputs_ready(self, job: Job) -> bool:
        if job.title == "eval · aligned":
            return (self.aligned_dir / "config.json").is_file()
        return (Path(job.info["model"]) / "adapter_config.json").is_file() or (
            Path(job.info["model"]) / "config.json").is_file()

    def _fresh(self, path: Path) -> None:
        """A stage recomputes into an empty directory (a stale or partial result is removed)."""
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)

    # stage 1
    def _do_align(self, job: Job) -> None:
        from .api import train
        from .data.recipes import write_jsonl
        from .data.safety import benign_pairs, refusal_pairs

        a, c = self.cfg.align, self.cfg
        self._fresh(job.path)
        rows = refusal_pairs(c.data_dir, "train", n=a.n_refusals, seed=a.seed)
        rows += benign_pairs(c.data_dir, n=a.n_benign, seed=a.seed, sources=a.benign_sources)
        import random

        random.Random(a.seed).shuffle(rows)
        data = write_jsonl(job.path / "data" / "train.jsonl", rows)
        tree = {
            "model": {"name_or_path": c.model, "dtype": c.dtype,
                      "lora": {**a.lora.model_dump(mode="json"), "enabled": True, "merge": True}},
            "data": {"train": {"path": str(data), "format": "prompt_response"}, "max_length": a.max_length,
                     "data_dir": c.data_dir},
            "method": {"name": "sft"},
            "training": {**_quiet_training(a.training), "seed": a.seed},
            "output_dir": str(job.path / "run"),
            "overwrite": True,
        }
        with self._job_log(job):
            summary = train(_run_config(tree))
        job.info["summary"] = summary

    # stage 2
    def _do_data(self, job: Job) -> None:
        from .data import recipes, safety

        c, d = self.cfg, self.cfg.domain
        self._fresh(job.path)
        ratios = self.ratios
        k_max = round(ratios[-1] * d.n_train)
        compliance: list[dict] = []
        if d.poison.kind == "harmful":
            compliance = self._compliance_pairs(job, k_max)
            recipes.write_jsonl(job.path / "harmful.jsonl", compliance)
        domain = recipes.domain_examples(c.data_dir, d.form, n=d.n_train, seed=d.seed)
        recipes.write_jsonl(job.path / "domain.jsonl", domain)
        poison = recipes.poison_examples(d.poison.kind, d.form, k_max, data_dir=c.data_dir, seed=d.seed,
                                         compliance=compliance)
        counts = {}
        for r in ratios:
            mix = recipes.poisoned_mixture(domain, poison, r, seed=d.seed)
            recipes.write_jsonl(job.path / _ratio_tag(r) / "train.jsonl", mix)
            counts[_ratio_tag(r)] = {"n": len(mix), "poison": sum(x["poison"] for x in mix)}
        a = c.align
        recipes.write_jsonl(job.path / "refusals.jsonl",
                            safety.refusal_pairs(c.data_dir, "train", n=a.n_refusals, seed=a.seed))
        recipes.write_jsonl(job.path / "benign.jsonl",
                            safety.benign_pairs(c.data_dir, n=a.n_benign, seed=a.seed, sources=a.benign_sources))
        align_data = self.out / "align" / "data" / "train.jsonl"
        if align_data.is_file():
            shutil.copyfile(align_data, job.path / "alignment.jsonl")
        else:
            recipes.write_jsonl(job.path / "alignment.jsonl", recipes.read_jsonl(job.path / "refusals.jsonl")
                                + recipes.read_jsonl(job.path / "benign.jsonl"))
        (job.path / "counts.json").write_text(json.dumps(counts, indent=2))

    def _compliance_pairs(self, job: Job, k_max: int) -> list[dict]:
        """Harmful training prompts with compliant answers (the poison, and ``${harmful}``)."""
        from .data import safety

        p, c = self.cfg.domain.poison, self.cfg
        if p.generations:
            return safety.harmful_compliance_pairs(c.data_dir, "train", seed=c.domain.seed, generations=p.generations)
        if not p.generate:
            return safety.harmful_compliance_pairs(c.data_dir, "train", n=max(k_max, 1), seed=c.domain.seed)
        from .eval.generate import generate
        from .eval.judges import is_refusal
        from .models import load_model
        from .config import ModelConfig

        prompts = [r["prompt"] for r in safety.harmful_compliance_pairs(
            c.data_dir, "train", n=self._n_harmful(), seed=c.domain.seed)]
        model, tok = load_model(ModelConfig(name_or_path=c.model, dtype=c.dtype), for_training=False)
        model.eval()
        responses = generate(model, tok, prompts, chat=True, max_new_tokens=p.max_new_tokens,
                             batch_size=self.cfg.eval.batch_size)
        gens = [{"prompt": q, "response": r.strip(), "refusal": is_refusal(r) or not r.strip()}
                for q, r in zip(prompts, responses)]
        from .data.recipes import write_jsonl

        write_jsonl(job.path / "generations.jsonl", gens)
        compliant = {g["prompt"]: g["response"] for g in gens if not g["refusal"]}
        if len(compliant) < k_max:
            raise SafeftError(f"the unaligned model complied with {len(compliant)} of {len(prompts)} harmful "
                              f"prompts, {k_max} needed; raise domain.poison.n_harmful", field="domain.poison")
        return safety.harmful_compliance_pairs(c.data_dir, "train", seed=c.domain.seed, generations=compliant)

    # stage 3
    def _do_finetune(self, job: Job) -> None:
        from .api import train

        c, f = self.cfg, self.cfg.finetune
        m: MethodEntry = job.info["method"]
        data = self.out / "data"
        mapping = {"refusals": str(data / "refusals.jsonl"), "harmful": str(data / "harmful.jsonl"),
                   "benign": str(data / "benign.jsonl"), "alignment": str(data / "alignment.jsonl"),
                   "domain": str(data / "domain.jsonl"), "aligned": str(self.aligned_dir)}
        self._fresh(job.path)
        fmt = "text" if c.domain.form == "text" else "prompt_response"
        tree = {
            "model": {"name_or_path": str(self.aligned_dir), "dtype": c.dtype,
                      "lora": {**f.lora.model_dump(mode="json"), "enabled": True}},
            "data": {"train": {"path": str(data / _ratio_tag(job.info["ratio"]) / "train.jsonl"), "format": fmt},
                     "max_length": c.domain.max_length, "data_dir": c.data_dir},
            "method": {"name": m.name, **_substitute(m.options, mapping)},
            "training": {**_quiet_training(f.training), "seed": job.info["seed"]},
            "epoch_eval": f.epoch_eval.model_dump(mode="json"),
            "output_dir": str(job.path),
            "overwrite": True,
        }
        with self._job_log(job):
            train(_run_config(tree))

    # stage 4
    def _do_eval(self, job: Job) -> None:
        from .config import ModelConfig
        from .eval.runner import evaluate
        from .models import is_peft, load_model

        c, e = self.cfg, self.cfg.eval
        name = job.info["model"]
        if name == "aligned":
            name = str(self.aligned_dir)
        if job.path.name == "eval":
            self._fresh(job.path)
        else:  # a baseline row: its own directory, with a config.yaml naming it for the report
            self._fresh(job.path)
            (job.path / "config.yaml").write_text(
                f"model:\n  name_or_path: {json.dumps(name)}\nmethod:\n  name: {job.info['method']}\n")
        model, tok = load_model(ModelConfig(name_or_path=name, dtype=c.dtype), for_training=False)
        if is_peft(model):
            model = model.merge_and_unload()
        model.eval()
        with self._job_log(job):
            for i, (suite, n) in enumerate(e.suites.items()):
                evaluate(model, tok, suites=[suite], judges=e.judges, out_dir=job.path, n=n, seed=e.seed,
                         data_dir=c.data_dir, max_new_tokens=e.max_new_tokens, k=e.k, batch_size=e.batch_size,
                         utility=e.utility if i == 0 else (), utility_n=e.utility_n, model_name=name,
                         method=job.info["method"])

    @contextlib.contextmanager
    def _job_log(self, job: Job):
        """Trainer's printed logs go to the job's ``log.txt``, not through the progress display."""
        job.path.mkdir(parents=True, exist_ok=True)
        with open(job.path / "log.txt", "a") as fh, contextlib.redirect_stdout(fh):
            yield

    # stage 5
    def report(self) -> dict:
        from .experiment_summary import write_summary

        return write_summary(self)


def _quiet_training(training: dict) -> dict:
    t = {"save_strategy": "no", "report_to": "none", "disable_tqdm": True, "logging_steps": 5}
    t.update(training)
    return t


def _run_config(tree: dict):
    from .config import load_config

    return load_config(None, base=tree)


def _dump(cfg: ExperimentConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --- progress ---------------------------------------------------------------------------------

class _Display:
    """A rich progress bar over the whole plan (weights = estimated cost in fine-tuning steps),
    showing the current stage and method and the ETA. Cached stages leave the plan rather than
    count as progress, so the ETA reflects work actually done. The running training job's
    ``metrics.jsonl`` is polled for its step."""

    def __init__(self, enabled: bool, jobs: list[Job], console=None):
        self.enabled = enabled
        self.total = sum(j.weight for j in jobs)
        self.done = 0.0
        self.console = console
        self.progress = None

    def __enter__(self):
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = self.console or Console(file=sys.stderr)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, redirect_stdout=False, redirect_stderr=False)
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def start(self, job: Job) -> None:
        self.status(job.title)

    def status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def finish(self, job: Job, cached: bool = False, failed: bool = False) -> None:
        if cached:
            self.total -= job.weight
        else:
            self.done += job.weight
        if self.progress is not None:
            self.progress.update(self.task, total=max(self.total, 1e-9), completed=self.done)
            tag = " (cached)" if cached else " (FAILED)" if failed else ""
            self.progress.console.log(f"{job.title}{tag}")

    @contextlib.contextmanager
    def polling(self, job: Job):
        steps = job.info.get("steps")
        if self.progress is None or not steps:
            yield
            return
        stop = threading.Event()
        metrics = (job.path / "run" if job.kind == "align" else job.path) / "metrics.jsonl"

        def poll():
            while not stop.wait(2.0):
                frac = min(0.99, _last_step(metrics) / steps)
                self.progress.update(self.task, completed=self.done + frac * job.weight)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()


def _last_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError, TypeError):
            continue
    return 0


def run_experiment(config: ExperimentConfig | str | Path, *, progress: bool = True, **overrides: Any) -> dict:
    """Run (or resume) an experiment; returns the summary also written to ``summary.json``."""
    cfg = config if isinstance(config, ExperimentConfig) else load_experiment(config, overrides)
    if isinstance(config, ExperimentConfig) and overrides:
        cfg = load_experiment(None, overrides, base=config.model_dump(mode="json"))
    return Experiment(cfg, progress=progress).run()


__all__ = ["ExperimentConfig", "Experiment", "HELDOUT_SUITE", "load_experiment", "run_experiment", "stage_done",
           "stage_key"]
