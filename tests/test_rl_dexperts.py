"""DExperts decoding: z + α(z⁺ − z⁻) on hand-built tiny experts, cached steps == full recompute."""

from __future__ import annotations

import pytest
import torch

from safeft.errors import ConfigError
from safeft.eval.decoding import build_logits_processor
from safeft.methods.dexperts import DExpertsProcessor, parse_spec
from safeft.models import tiny_llama


def _full_last_logits(model, ids, pad):
    mask = (ids.ne(pad).long().cumsum(-1) > 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()


def test_dexperts_formula_and_cache():
    pad = 0
    expert, anti = tiny_llama(seed=1).eval(), tiny_llama(seed=2).eval()
    proc = DExpertsProcessor(expert, anti, alpha=2.0, pad_token_id=pad)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # row 0 left-padded
    scores = torch.randn(2, 320)
    with torch.no_grad():
        want = scores + 2.0 * (_full_last_logits(expert, ids, pad) - _full_last_logits(anti, ids, pad))
        assert torch.allclose(proc(ids, scores), want, atol=1e-4)
        # the next step reuses the experts' KV caches and must match a full recompute
        ids2 = torch.cat([ids, torch.tensor([[9], [11]])], 1)
        want2 = scores + 2.0 * (_full_last_logits(expert, ids2, pad) - _full_last_logits(anti, ids2, pad))
        assert torch.allclose(proc(ids2, scores), want2, atol=1e-4)
        # a new generate call (not a one-token extension) starts over
        ids3 = torch.tensor([[8, 9, 10]])
        want3 = scores[:1] + 2.0 * (_full_last_logits(expert, ids3, pad) - _full_last_logits(anti, ids3, pad))
        assert torch.allclose(proc(ids3, scores[:1]), want3, atol=1e-4)


def test_alpha_zero_is_the_base_model():
    proc = DExpertsProcessor(tiny_llama(seed=1), tiny_llama(seed=2), alpha=0.0, pad_token_id=0)
    scores = torch.randn(1, 320)
    assert torch.equal(proc(torch.tensor([[4, 5]]), scores), scores)


def test_spec_parsing_and_registry(tmp_path, tiny_model_dir, tokenizer):
    assert parse_spec("expert=/a,anti=/b") == {"expert": "/a", "anti": "/b", "alpha": 2.0}
    assert parse_spec("expert=/a, anti=/b, alpha=0.5")["alpha"] == 0.5
    for bad in ("expert=/a", "expert=/a,anti=/b,alpha=x", "expert=/a,anti=/b,beta=1"):
        with pytest.raises(ConfigError):
            parse_spec(bad)
    proc = build_logits_processor(tiny_llama(vocab_size=len(tokenizer)), tokenizer,
                                  f"dexperts:expert={tiny_model_dir},anti={tiny_model_dir},alpha=1")
    assert isinstance(proc, DExpertsProcessor)
    scores = torch.randn(1, len(tokenizer))
    assert torch.allclose(proc(torch.tensor([[5, 6, 7]]), scores), scores, atol=1e-5)  # same model twice
