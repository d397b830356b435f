"""Filtering baseline (the "Filtering" row of Meng et al., EMNLP 2024 Findings, Table 1):
drop the training examples a judge scores toxic, then plain SFT on the rest.

Each example's *trained text* (its response tokens; for plain-text data, the whole text) is
scored by a judge of the evaluation framework (``judge``, default the offline ``toxicity``
classifier; ``implicit-hate`` for hate without bad words); examples scoring at or above
``threshold`` are removed. The kept/dropped counts and the dropped indices are written to
``filter_report.json`` in the output directory.
"""

from __future__ import annotations

import json

from pydantic import ConfigDict, Field

from .. import nado
from ..engine.run import atomic_write_text
from ..errors import DataError
from . import register
from .sft import SFT


class FilterParams(nado.JudgeChoice):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(0.5, ge=0, le=1, description="drop examples whose judge score is ≥ this")


def trained_texts(dataset, tokenizer) -> list[str]:
    """The text each example is trained on (its labelled tokens), decoded."""
    return [tokenizer.decode([t for t in ex["labels"] if t != -100], skip_special_tokens=True) for ex in dataset]


@register
class Filter(SFT):
    name = "filter"
    summary = "drop training examples a judge (default toxicity) flags, then plain SFT"
    paper = "Meng et al., Attribute Controlled Fine-tuning for LLMs (EMNLP 2024 Findings), filtering baseline"
    Params = FilterParams

    def train(self):
        from ..engine.trainer import fit

        ds = self.run.train_dataset
        p = self.params
        scores = nado.judge_scorer(p.judge, p.judge_opts)(trained_texts(ds, self.run.tokenizer))
        keep = [i for i, s in enumerate(scores) if s < self.params.threshold]
        dropped = [int(ds[i]["idx"]) for i, s in enumerate(scores) if s >= self.params.threshold]
        if not keep:
            raise DataError(f"the {p.judge} judge flags all {len(ds)} training examples at threshold "
                            f"{self.params.threshold}; nothing is left to train on", field="method.threshold")
        self.run.train_dataset = ds.select(keep)
        report = {"judge": p.judge, "threshold": self.params.threshold, "examples": len(ds), "kept": len(keep),
                  "dropped": len(dropped), "dropped_idx": dropped}
        atomic_write_text(self.run.output_dir / "filter_report.json", json.dumps(report, indent=2))
        summary = fit(self.run, self)
        summary["filter"] = {k: v for k, v in report.items() if k != "dropped_idx"}
        atomic_write_text(self.run.output_dir / "train_summary.json", json.dumps(summary, indent=2))
        return summary
