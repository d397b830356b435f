"""Safety-data mixing (Bianchi, Suzgun, Attanasio, Röttger, Jurafsky, Hashimoto, Zou,
"Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that Follow
Instructions", ICLR 2024).

The baseline a practitioner tries first: add safety demonstrations (a harmful request answered
with a refusal) to the fine-tuning set and train with plain SFT. Bianchi et al. add 100 to 2,000
safety examples to 20,000 Alpaca instructions and find that a few hundred (about 3% of the
training set) already make the model refuse most harmful requests, while many more make it
over-refuse safe ones. So the default ``fraction`` is 0.03.

``fraction`` counts safety examples *added* relative to the domain set:
``n_safety = round(fraction · n_domain)`` (500 added to 20,000 is 2.5% in the paper's terms).
They are drawn without replacement from ``source`` by a seeded shuffle (``seed``; the run's
``training.seed`` when unset), appended to the tokenized domain set, and shuffled with it by the
trainer's sampler. The loss is plain SFT's; the cost is data, not compute.

``source``:
- ``recipe`` (default): Do-Not-Answer *train*-split prompts with template refusals
  (:func:`safeft.data.safety.refusal_pairs`, read from ``data.data_dir`` or the hub), the same
  refusal set the recipe aligns with; the *eval* split never enters training.
- a path: a user's file of prompt/response pairs or chat messages (any format
  :mod:`safeft.data.loaders` reads; fields as in ``data.train``).

The added examples are listed (their stable ``idx`` and prompts) in ``mix_report.json``.
"""

from __future__ import annotations

import json
import random

import datasets
from pydantic import BaseModel, ConfigDict, Field

from ..config import DatasetSpec
from ..data import load_rows, tokenize_rows
from ..engine.run import atomic_write_text
from ..errors import DataError
from . import register
from .sft import SFT

DEFAULT_FRACTION = 0.03


class MixSafetyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(DEFAULT_FRACTION, gt=0, le=1,
                            description="safety examples added, as a share of the domain set's size")
    source: str = Field("recipe", description="'recipe' (Do-Not-Answer train split + refusals) or a file path")
    seed: int | None = Field(None, description="sampling seed (default: training.seed)")


def safety_rows(source: str, data_dir: str | None) -> list[dict]:
    """The candidate safety examples as prompt/response (or messages) rows."""
    if source == "recipe":
        from ..data.safety import refusal_pairs

        return refusal_pairs(data_dir, split="train")
    return load_rows(DatasetSpec(path=source), None)


def pick(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` rows without replacement, in a seeded random order."""
    if n > len(rows):
        raise DataError(f"needs {n} safety examples but the source has only {len(rows)}; "
                        "lower method.fraction or use a larger source", field="method.fraction")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n]]


@register
class MixSafety(SFT):
    name = "mix-safety"
    summary = "plain SFT on the domain data with a few percent of refusal examples mixed in"
    paper = "Bianchi et al., Safety-Tuned LLaMAs (ICLR 2024)"
    Params = MixSafetyParams

    def mix(self) -> dict:
        """Append the safety examples to ``run.train_dataset``; returns the report."""
        run, p = self.run, self.params
        cfg = run.cfg
        domain = run.train_dataset
        n = max(1, round(p.fraction * len(domain)))
        seed = cfg.training.seed if p.seed is None else p.seed
        chosen = pick(safety_rows(p.source, cfg.data.data_dir), n, seed)
        spec = DatasetSpec(path=p.source, system_prompt=cfg.data.train.system_prompt if cfg.data.train else None)
        examples = tokenize_rows(chosen, run.tokenizer, spec, cfg.data.max_length)
        start = max(domain["idx"]) + 1
        for i, ex in enumerate(examples):
            ex["idx"] = start + i
        kept = [ex for ex in examples if any(t != -100 for t in ex["labels"][1:])]
        extra = datasets.Dataset.from_list(kept).cast(domain.features)
        run.train_dataset = datasets.concatenate_datasets([domain, extra])
        return {"fraction": p.fraction, "source": p.source, "seed": seed, "domain_examples": len(domain),
                "safety_examples": len(kept), "safety_idx": [ex["idx"] for ex in kept],
                "safety_prompts": [r.get("prompt", "") for r in chosen]}

    def train(self):
        from ..engine.trainer import fit

        report = self.mix()
        atomic_write_text(self.run.output_dir / "mix_report.json", json.dumps(report, indent=2))
        summary = fit(self.run, self)
        summary["mix"] = {k: v for k, v in report.items() if k not in ("safety_idx", "safety_prompts")}
        atomic_write_text(self.run.output_dir / "train_summary.json", json.dumps(summary, indent=2))
        return summary
