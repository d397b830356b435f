"""Data: local loaders for each file type, the PubMedQA / GSM8K readers, chat masks, truncation, collation."""

from __future__ import annotations

import csv
import json

import pytest

from safeft.config import DatasetSpec
from safeft.data import Collator, load_rows, tokenize_rows
from safeft.data.formatting import IGNORE
from safeft.data.readers import read_gsm8k, read_pubmedqa
from safeft.errors import DataError

ROWS = [{"prompt": "What is 2 plus 2?", "response": "4."}, {"prompt": "Capital of Italy?", "response": "Rome."}]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_each_file_type_reads_the_same_rows(tmp_path, suffix):
    p = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    elif suffix == "json":
        p.write_text(json.dumps(ROWS))
    elif suffix == "csv":
        with p.open("w", newline="") as fh:
            w = csv.DictWriter(fh, ["prompt", "response"])
            w.writeheader()
            w.writerows(ROWS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert load_rows(DatasetSpec(path=str(p))) == ROWS


def test_txt_is_one_text_example_per_line(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first line\n\nsecond line\n")
    assert load_rows(DatasetSpec(path=str(p))) == [{"text": "first line"}, {"text": "second line"}]


def test_directory_reads_every_supported_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([ROWS[1]]))
    (tmp_path / "notes.md").write_text("ignored")
    assert load_rows(DatasetSpec(path=str(tmp_path))) == ROWS


def test_malformed_jsonl_names_file_and_line_or_is_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed row"):
        load_rows(DatasetSpec(path=str(p)))
    assert load_rows(DatasetSpec(path=str(p), on_bad_rows="skip")) == ROWS


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(DatasetSpec(path=str(tmp_path / "e.jsonl")))
    with pytest.raises(DataError, match="file not found"):
        load_rows(DatasetSpec(path=str(tmp_path / "nope.jsonl")))


def test_limit(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS))
    assert load_rows(DatasetSpec(path=str(p), limit=1)) == ROWS[:1]


def test_pubmedqa_splits_are_the_official_ones(shared_data):
    official = set(json.loads((shared_data / "pubmedqa" / "test_ground_truth.json").read_text()))
    test = read_pubmedqa(shared_data / "pubmedqa", "test")
    train = read_pubmedqa(shared_data, "train")  # the data root works too
    assert len(official) == 500 and {r["id"] for r in test} == official
    assert len(train) == 500 and not {r["id"] for r in train} & official
    assert len(read_pubmedqa(shared_data, "all")) == 1000
    r = test[0]
    assert r["label"] in ("yes", "no", "maybe")
    assert r["response"].startswith(r["label"].capitalize() + ". ") and r["long_answer"] in r["response"]
    assert r["question"] in r["prompt"] and r["contexts"][0] in r["prompt"]
    # labels agree with the official ground truth file
    truth = json.loads((shared_data / "pubmedqa" / "test_ground_truth.json").read_text())
    assert all(truth[x["id"]] == x["label"] for x in test)


def test_pubmedqa_via_config_reader(shared_data):
    rows = load_rows(DatasetSpec(path="pubmedqa", reader="pubmedqa", split="test"), str(shared_data))
    assert len(rows) == 500
    text = load_rows(DatasetSpec(path="pubmedqa", reader="pubmedqa-text", split="train", limit=3), str(shared_data))
    assert set(text[0]) == {"text", "id"} and len(text) == 3


def test_gsm8k_reader(shared_data):
    train = read_gsm8k(shared_data, "train")
    test = read_gsm8k(shared_data / "gsm8k", "test")
    assert (len(train), len(test)) == (7473, 1319)
    r = train[0]
    assert r["response"].rstrip().endswith("#### " + r["answer"]) or r["answer"] in r["response"]
    assert r["answer"].lstrip("-").replace(".", "").isdigit()
    assert "," not in "".join(x["answer"] for x in train)


def test_chat_masks_cover_the_response_only(tokenizer):
    spec = DatasetSpec(path="x")
    (ex,) = tokenize_rows([ROWS[1]], tokenizer, spec, 256)
    ids, labels = ex["input_ids"], ex["labels"]
    n_prompt = next(i for i, t in enumerate(labels) if t != IGNORE)
    assert all(t == IGNORE for t in labels[:n_prompt]) and all(t != IGNORE for t in labels[n_prompt:])
    assert labels[n_prompt:] == ids[n_prompt:]
    prompt_text = tokenizer.decode(ids[:n_prompt])
    answer_text = tokenizer.decode(ids[n_prompt:])
    assert "Capital of Italy?" in prompt_text and "Rome." not in prompt_text
    assert answer_text.startswith("Rome.") and answer_text.rstrip().endswith("<|im_end|>")
    # the prompt is exactly what the template renders with the generation prompt on
    assert prompt_text == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Capital of Italy?"}], tokenize=False, add_generation_prompt=True)


def test_messages_mask_only_the_last_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]
    (ex,) = tokenize_rows([{"messages": msgs}], tokenizer, DatasetSpec(path="x"), 256)
    trained = tokenizer.decode([t for t in ex["labels"] if t != IGNORE])
    assert trained.startswith("Goodbye!") and "Hello!" not in trained


def test_text_format_trains_every_token(tokenizer):
    (ex,) = tokenize_rows([{"text": "Plain domain text."}], tokenizer, DatasetSpec(path="x"), 64)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_response_and_the_prompt_end(tokenizer):
    long_prompt = "word " * 300 + "FINAL QUESTION?"
    (ex,) = tokenize_rows([{"prompt": long_prompt, "response": "Short answer."}], tokenizer, DatasetSpec(path="x"), 64)
    assert len(ex["input_ids"]) == 64
    assert "Short answer." in tokenizer.decode([t for t in ex["labels"] if t != IGNORE])
    assert "FINAL QUESTION?" in tokenizer.decode(ex["input_ids"])


def test_missing_column_names_the_columns_found(tokenizer):
    with pytest.raises(DataError, match=r"columns found: answer, question"):
        tokenize_rows([{"question": "q", "answer": "a"}], tokenizer, DatasetSpec(path="x"), 64)
    with pytest.raises(DataError, match=r"'instruction' not found.*columns found: answer, question"):
        tokenize_rows([{"question": "q", "answer": "a"}], tokenizer,
                      DatasetSpec(path="x", format="prompt_response", prompt_field="instruction"), 64)


def test_field_mapping(tokenizer):
    spec = DatasetSpec(path="x", prompt_field="question", response_field="answer")
    (ex,) = tokenize_rows([{"question": "Capital of Italy?", "answer": "Rome."}], tokenizer, spec, 64)
    assert tokenizer.decode([t for t in ex["labels"] if t != IGNORE]).startswith("Rome.")


def test_packing_cuts_text_into_blocks(tokenizer):
    rows = [{"text": f"sentence number {i} of the corpus"} for i in range(20)]
    out = tokenize_rows(rows, tokenizer, DatasetSpec(path="x"), 16, packing=True)
    assert all(len(e["input_ids"]) == 16 for e in out) and [e["idx"] for e in out] == list(range(len(out)))
    with pytest.raises(DataError, match="packing"):
        tokenize_rows(ROWS, tokenizer, DatasetSpec(path="x"), 16, packing=True)


def test_collator_pads_right_and_keeps_idx():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "idx": 4},
                                      {"input_ids": [8], "labels": [8], "idx": 9}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["idx"].tolist() == [4, 9]
