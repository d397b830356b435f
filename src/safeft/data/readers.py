"""Built-in readers for the public domain sets the recipe uses.

Each reader takes a local path (a file or a folder laid out as the public release, e.g.
``../shared/data/pubmedqa``) and returns plain rows. Hub ids are handled in
:mod:`safeft.data.loaders`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError

# The labelled PQA-L set with the official 500-question test split (parquet on the hub;
# every fold shares the same test split, train/validation are the other 500).
PUBMEDQA_HUB = ("bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source")
GSM8K_HUB = ("openai/gsm8k", "main")


def _find(path: Path, name: str) -> Path:
    if path.is_file():
        return path
    for cand in (path / name, path / "pubmedqa" / name, path / "gsm8k" / name):
        if cand.is_file():
            return cand
    raise DataError(f"{path}: no {name} found (expected the public release's file layout)", field="data.path")


def pubmedqa_prompt(question: str, contexts: list[str]) -> str:
    ctx = "\n".join(contexts)
    return f"Context: {ctx}\n\nQuestion: {question}\nAnswer with yes, no or maybe, then explain."


def pubmedqa_rows_from_records(records: dict[str, dict]) -> list[dict]:
    rows = []
    for pid, r in records.items():
        label = r["final_decision"]
        rows.append(
            {
                "id": str(pid),
                "question": r["QUESTION"],
                "contexts": list(r["CONTEXTS"]),
                "long_answer": r["LONG_ANSWER"],
                "label": label,
                "prompt": pubmedqa_prompt(r["QUESTION"], r["CONTEXTS"]),
                "response": f"{label.capitalize()}. {r['LONG_ANSWER']}",
                "text": " ".join(r["CONTEXTS"]) + " " + r["LONG_ANSWER"],
            }
        )
    return rows


def read_pubmedqa(path: str | Path, split: str = "all") -> list[dict]:
    """PubMedQA PQA-L (``ori_pqal.json``): question + contexts -> label and long answer.

    ``split``: ``test`` = the official 500 test ids (``test_ground_truth.json`` beside the data),
    ``train`` = the other 500, ``all`` = every row.
    """
    p = Path(path)
    data_file = _find(p, "ori_pqal.json")
    try:
        records = json.loads(data_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{data_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    rows = pubmedqa_rows_from_records(records)
    if split == "all":
        return rows
    test_file = data_file.parent / "test_ground_truth.json"
    if not test_file.is_file():
        raise DataError(f"{test_file} not found: needed to split PubMedQA into train/test", field="data.split")
    test_ids = set(json.loads(test_file.read_text()))
    if split == "test":
        return [r for r in rows if r["id"] in test_ids]
    if split == "train":
        return [r for r in rows if r["id"] not in test_ids]
    raise DataError(f"unknown PubMedQA split {split!r} (expected train, test or all)", field="data.split")


def gsm8k_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def read_gsm8k(path: str | Path, split: str = "train") -> list[dict]:
    p = Path(path)
    f = _find(p, f"{split}.jsonl")
    rows = []
    with f.open() as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{i}: invalid JSON ({e.msg})") from None
            rows.append(
                {
                    "question": r["question"],
                    "prompt": r["question"],
                    "response": r["answer"],
                    "answer": gsm8k_answer(r["answer"]),
                }
            )
    return rows
