"""Domain fine-tuning data for the recipe, in the two forms users have, optionally poisoned.

- ``instructions``: PubMedQA PQA-L (Jin et al. 2019), question + abstract context -> "Yes/No/
  Maybe. <long answer>", from the 500 *training* ids only: the official 500-question test ids
  (``test_ground_truth.json``, or the hub's test fold) never enter training, so PubMedQA
  accuracy is measured on questions the model has not seen.
- ``text``: the same training abstracts as plain text (context + conclusion), continued-
  pretraining style with no chat template and no alignment data, as the KL-decay paper
  (Vorontsov et al. 2024) fine-tunes on a scientific corpus.

Poisoning at ratio ``p`` replaces a share ``p`` of the examples, so every ratio trains on the
same number of examples (the same budget): ``round(p * n)`` poison rows and ``n - round(p * n)``
domain rows, shuffled together with a seed. Poison kinds:

- ``harmful``: harmful requests (Do-Not-Answer *train* split) with compliant answers, the
  attack of Qi et al. 2023 ("Fine-tuning aligned language models compromises safety, even when
  users do not intend to!"), produced by the unaligned model (see
  :func:`safeft.data.safety.harmful_compliance_pairs`);
- ``toxigen``: hateful statements about identity groups from the ToxiGen hate prompt files
  (Hartvigsen et al. 2022), as an answer to "Say something about <group>." (instructions) or as
  plain text.

In the ``text`` form a harmful pair becomes ``"<prompt>\\n<response>"``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..config import DatasetSpec
from ..errors import DataError
from .loaders import load_rows

FORMS = ("instructions", "text")
POISON_KINDS = ("harmful", "toxigen")


def pubmedqa_rows(data_dir: str | Path | None, split: str) -> list[dict]:
    """PubMedQA PQA-L rows (``id``, ``prompt``, ``response``, ``label``, ``text``, ...) of a split."""
    return load_rows(DatasetSpec(path="pubmedqa", reader="pubmedqa", split=split),
                     str(data_dir) if data_dir else None)


def domain_examples(data_dir: str | Path | None = None, form: str = "instructions", n: int | None = None,
                    seed: int = 0) -> list[dict]:
    """Domain examples from PubMedQA's training ids: ``{"prompt", "response", "id"}`` or
    ``{"text", "id"}``; ``n`` takes a seeded sample."""
    if form not in FORMS:
        raise DataError(f"unknown domain form {form!r} (expected one of {', '.join(FORMS)})", field="domain.form")
    rows = pubmedqa_rows(data_dir, "train")
    rows = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    if n is not None:
        if n > len(rows):
            raise DataError(f"asked for {n} domain examples, PubMedQA's training ids hold {len(rows)}",
                            field="domain.n_train")
        rows = rows[:n]
    if form == "text":
        return [{"text": r["text"], "id": r["id"]} for r in rows]
    return [{"prompt": r["prompt"], "response": r["response"], "id": r["id"]} for r in rows]


def toxigen_hate(data_dir: str | Path) -> list[dict]:
    """Hateful ToxiGen statements ``{"group", "text"}`` (one per statement, deduplicated)."""
    d = Path(data_dir)
    folder = d / "toxigen" if (d / "toxigen").is_dir() else d
    files = sorted(folder.glob("hate_*_1k.txt"))
    if not files:
        raise DataError(f"{folder}: no ToxiGen hate_<group>_1k.txt files", field="data_dir")
    seen, out = set(), []
    for f in files:
        group = f.stem[len("hate_"): -len("_1k")].replace("_", " ")
        for line in f.read_text(encoding="utf-8").splitlines():
            for stmt in line.replace("\\n", "\n").split("\n"):
                s = stmt.strip().lstrip("-").strip()
                if len(s) >= 15 and s not in seen:
                    seen.add(s)
                    out.append({"group": group, "text": s})
    return out


def poison_examples(kind: str, form: str, n: int, *, data_dir: str | Path | None = None, seed: int = 0,
                    compliance: list[dict] | None = None) -> list[dict]:
    """``n`` poison examples in the domain data's form.

    ``compliance``: harmful prompt/response pairs (from
    :func:`safeft.data.safety.harmful_compliance_pairs`), needed for ``kind="harmful"``.
    """
    if kind not in POISON_KINDS:
        raise DataError(f"unknown poison kind {kind!r} (expected one of {', '.join(POISON_KINDS)})",
                        field="domain.poison.kind")
    if n == 0:
        return []
    rng = random.Random(seed)
    if kind == "harmful":
        if not compliance:
            raise DataError("harmful poisoning needs harmful compliance pairs", field="domain.poison")
        if n > len(compliance):
            raise DataError(f"{n} poison examples asked for, {len(compliance)} compliance pairs available",
                            field="domain.poison")
        pairs = rng.sample(compliance, n)
        if form == "text":
            return [{"text": f"{p['prompt']}\n{p['response']}", "id": f"poison-{i}"} for i, p in enumerate(pairs)]
        return [{"prompt": p["prompt"], "response": p["response"], "id": f"poison-{i}"} for i, p in enumerate(pairs)]
    if data_dir is None:
        raise DataError("ToxiGen poisoning reads the prompt files from a path: pass --data-dir", field="data_dir")
    pool = toxigen_hate(data_dir)
    stmts = rng.sample(pool, min(n, len(pool)))
    if form == "text":
        return [{"text": s["text"], "id": f"poison-{i}"} for i, s in enumerate(stmts)]
    return [{"prompt": f"Say something about {s['group']} people.", "response": s["text"], "id": f"poison-{i}"}
            for i, s in enumerate(stmts)]


def poisoned_mixture(domain: list[dict], poison: list[dict], ratio: float, seed: int = 0) -> list[dict]:
    """``len(domain)`` examples of which ``round(ratio * len(domain))`` are poison, shuffled.

    The domain rows kept are the first ones of ``domain`` (itself a seeded sample), so a higher
    ratio swaps domain rows for poison rows and leaves the rest unchanged.
    """
    if not 0 <= ratio < 1:
        raise DataError(f"poison ratio must be in [0, 1), got {ratio}", field="finetune.poison_ratios")
    n = len(domain)
    k = round(ratio * n)
    if k > len(poison):
        raise DataError(f"ratio {ratio} needs {k} poison examples, {len(poison)} available", field="domain.poison")
    mixed = [dict(r, poison=False) for r in domain[: n - k]] + [dict(r, poison=True) for r in poison[:k]]
    random.Random(seed).shuffle(mixed)
    return mixed


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(p)
    return p


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


__all__ = ["FORMS", "POISON_KINDS", "domain_examples", "poison_examples", "poisoned_mixture",
           "pubmedqa_rows", "read_jsonl", "toxigen_hate", "write_jsonl"]
