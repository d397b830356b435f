"""Utility metrics: perplexity against the model's own loss, PubMedQA option log-likelihoods
against a direct computation, answer parsing, GSM8K exact match."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from safeft.errors import ConfigError
from safeft.eval import utility as U


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_perplexity_is_token_weighted_exp_loss(tiny, tokenizer):
    texts = ["The cat sat on the mat.", "A much longer sentence about proteins, cells and the immune system."]
    res = U.perplexity(tiny, tokenizer, texts, batch_size=2)
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = tiny(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert res["value"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert res["n"] == 2 and res["lo"] <= res["value"] <= res["hi"]


def test_pubmedqa_loglik_matches_direct_scoring(tiny, tokenizer, shared_data):
    rows = U._sample(U._pubmedqa_rows(shared_data), 2, 0)
    acc, details = U.pubmedqa_loglik(tiny, tokenizer, rows, batch_size=4)
    prefix = U._assistant_prefix(tokenizer, rows[0]["prompt"])
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    for opt in U.PUBMEDQA_OPTIONS:
        full = tokenizer(prefix + opt.capitalize(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            lp = torch.log_softmax(tiny(input_ids=ids).logits[0, :-1].float(), -1)
        direct = sum(lp[t - 1, full[t]].item() for t in range(len(p_ids), len(full)))
        assert details[0]["loglik"][opt] == pytest.approx(direct, abs=1e-3)
    assert acc["n"] == 2 and acc["value"] == sum(d["pred"] == d["label"] for d in details) / 2


def test_pubmedqa_one_prefill_serves_both_metrics(tiny, tokenizer, shared_data):
    # the log-likelihoods read off the generation's first step equal the separate scoring pass,
    # and the generations equal a plain greedy generate
    rows = U._sample(U._pubmedqa_rows(shared_data), 5, 1)
    _, separate = U.pubmedqa_loglik(tiny, tokenizer, rows, batch_size=2)
    loglik, shared, gen, gen_details = U.pubmedqa(tiny, tokenizer, rows, batch_size=3, max_new_tokens=6)
    for a, b in zip(separate, shared):
        assert a["pred"] == b["pred"]
        for opt in U.PUBMEDQA_OPTIONS:
            assert b["loglik"][opt] == pytest.approx(a["loglik"][opt], abs=1e-3)
    plain = U.generate(tiny, tokenizer, [r["prompt"] for r in rows], max_new_tokens=6, batch_size=3)
    assert [d["response"] for d in gen_details] == plain
    assert loglik["n"] == gen["n"] == 5
    assert gen["value"] == sum(d["pred"] == d["label"] for d in gen_details) / 5


def test_answer_parsing():
    assert U.parse_pubmedqa("Yes. Because...") == "yes"
    assert U.parse_pubmedqa("It is unclear, maybe.") == "maybe"
    assert U.parse_pubmedqa("Unknown") is None
    assert U.parse_number("She pays 3 + 4 = 7 dollars.\n#### 1,250") == "1250"
    assert U.parse_number("So the total is 42.") == "42"
    assert U.parse_number("no digits") is None
    assert U.same_number("18.0", "18") and not U.same_number(None, "18") and not U.same_number("17", "18")


def test_gsm8k_exact_match_and_details(tiny, tokenizer, shared_data, tmp_path, monkeypatch):
    rows = U._sample(U._gsm8k_rows(shared_data), 4, 0)
    answers = [f"Working... #### {r['answer']}" for r in rows[:3]] + ["I do not know."]
    monkeypatch.setattr(U, "generate", lambda *a, **k: answers)
    res = U.run_utility(tiny, tokenizer, ["gsm8k"], data_dir=shared_data, n=4, out_dir=tmp_path)
    assert res["gsm8k_em"]["value"] == 0.75 and res["gsm8k_em"]["n"] == 4
    assert len((tmp_path / "utility" / "gsm8k.jsonl").read_text().splitlines()) == 4


def test_unknown_task_mentions_lm_eval():
    assert not U.lm_eval_available()
    with pytest.raises(ConfigError, match="lm-evaluation-harness is not installed"):
        U.run_utility(None, None, ["mmlu"])
