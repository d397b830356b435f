"""Batched generation: same outputs as one prompt at a time, order restored, seeded sampling,
logits processors passed through, training RNG untouched."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor

from safeft.eval.generate import generate, left_pad, length_buckets

PROMPTS = ["Hi", "Tell me a very long story about a dragon and a knight in a castle", "What is 2+2?",
           "Name three colours of the rainbow please", "Ok"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_length_buckets_and_left_pad():
    assert length_buckets([3, 7, 1, 7, 5], 2) == [[1, 3], [4, 0], [2]]
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_one_at_a_time(tiny, tokenizer):
    batched = generate(tiny, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate(tiny, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(s, str) for s in batched) and len(batched) == len(PROMPTS)
    raw = generate(tiny, tokenizer, PROMPTS[:2], chat=False, max_new_tokens=4)
    assert raw != batched[:2]  # raw continuation sees no chat template


def test_sampling_is_seeded_and_grouped_per_prompt(tiny, tokenizer):
    kw = dict(max_new_tokens=4, do_sample=True, num_return_sequences=3, batch_size=2)
    a = generate(tiny, tokenizer, PROMPTS[2:4], seed=7, **kw)
    assert len(a) == 6
    assert a == generate(tiny, tokenizer, PROMPTS[2:4], seed=7, **kw)
    assert a != generate(tiny, tokenizer, PROMPTS[2:4], seed=8, **kw)
    assert len(set(a[0:3])) > 1  # three different samples of prompt 0


def test_rng_outside_is_untouched(tiny, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(tiny, tokenizer, PROMPTS[:2], max_new_tokens=3, do_sample=True, seed=5)
    assert torch.equal(torch.rand(3), expected)


class ForceToken(LogitsProcessor):
    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


def test_logits_processor_pass_through_and_decoding_registry(tiny, tokenizer):
    from safeft.errors import ConfigError
    from safeft.eval.decoding import DECODINGS, build_logits_processor, register_decoding

    tok_id = tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    out = generate(tiny, tokenizer, PROMPTS[:2], max_new_tokens=3, logits_processor=ForceToken(tok_id))
    assert out == [tokenizer.decode([tok_id] * 3)] * 2
    register_decoding("force-test", lambda model, tok, spec: ForceToken(int(spec)))
    try:
        proc = build_logits_processor(tiny, tokenizer, f"force-test:{tok_id}")
        assert generate(tiny, tokenizer, ["x"], max_new_tokens=2, logits_processor=proc) == [tokenizer.decode([tok_id] * 2)]
    finally:
        DECODINGS.pop("force-test")
    assert build_logits_processor(tiny, tokenizer, None) is None
    with pytest.raises(ConfigError, match="unknown decoding 'nope'"):
        build_logits_processor(tiny, tokenizer, "nope:x")


def test_training_mode_restored(tiny, tokenizer):
    tiny.train()
    generate(tiny, tokenizer, ["a"], max_new_tokens=1)
    assert tiny.training
    tiny.eval()
