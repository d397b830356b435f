"""The NADO constraint model R: projection, regularizer, BCE training, save/load, decoding."""

from __future__ import annotations

import pytest
import torch

from safeft import nado
from safeft.errors import ConfigError


def _logits(n=5, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2


def _explicit_kl(logits, log_r_full):
    """KL(q‖p_θ) with q = softmax(log p + log R) detached, over the full vocabulary."""
    logp = torch.log_softmax(logits, -1)
    q = torch.softmax(logp.detach() + log_r_full, -1)
    return (q * (q.log() - logp)).sum(-1)


@pytest.mark.parametrize("k", [0, 8])
def test_projection_is_a_distribution_and_equals_p_for_constant_r(k):
    logits = _logits()
    idx = nado.candidates(logits, k)
    lp = torch.log_softmax(logits, -1)
    lp_s = lp if idx is None else lp.gather(-1, idx)
    q, m = nado.project(lp_s, torch.randn_like(lp_s))
    torch.testing.assert_close(q.sum(-1) + m, torch.ones(5))
    assert (q >= 0).all()
    q_const, _ = nado.project(lp_s, torch.full_like(lp_s, -0.7))
    torch.testing.assert_close(q_const, lp_s.exp())
    kl = nado.pr_kl(logits, torch.full_like(lp_s, -0.7), idx)
    torch.testing.assert_close(kl, torch.zeros(5), atol=1e-6, rtol=0)


def test_pr_kl_matches_explicit_kl_value_and_gradient_full_vocab():
    logits = _logits().requires_grad_(True)
    log_r = torch.nn.functional.logsigmoid(torch.randn(5, 40))
    kl = nado.pr_kl(logits, log_r)
    kl.sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    ref = _explicit_kl(logits, log_r)
    ref.sum().backward()
    torch.testing.assert_close(kl.detach(), ref.detach())
    torch.testing.assert_close(g, logits.grad)
    assert kl.min() > 0


def test_pr_kl_top_k_treats_the_tail_as_neutral():
    """Top-k version == full KL with R on the candidates and R_tail chosen so the tail keeps its mass."""
    logits = _logits().requires_grad_(True)
    idx = nado.candidates(logits, 8)
    log_r = torch.nn.functional.logsigmoid(torch.randn(5, 8))
    kl = nado.pr_kl(logits, log_r, idx)
    kl.sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    with torch.no_grad():  # the equivalent full-vocabulary R: the tail's R equals Σ_S p·R / Σ_S p
        p = torch.softmax(logits, -1)
        p_s = p.gather(-1, idx)
        r_tail = (p_s * log_r.exp()).sum(-1) / p_s.sum(-1)
        full = r_tail[:, None].log().expand(5, 40).clone()
        full.scatter_(-1, idx, log_r)
    ref = _explicit_kl(logits, full)
    ref.sum().backward()
    torch.testing.assert_close(kl.detach(), ref.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g, logits.grad, atol=1e-6, rtol=1e-4)
    outside = torch.ones_like(g, dtype=torch.bool).scatter_(-1, idx, False)
    assert g[outside].abs().max() < 1e-7  # tail tokens: p − q = 0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from safeft.models import load_model

    model, tok = load_model(str(tiny_model_dir), for_training=False)
    return model, tok


def _sampled_set(model, tok, n=24):
    prompts = [tok(f"Sample number {i} says", add_special_tokens=False)["input_ids"] for i in range(n)]
    comps = nado.sample_completions(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                    max_new_tokens=6, seed=1)
    # a learnable oracle: "satisfied" iff the first sampled token is even
    labels = [float(c[0] % 2 == 0) for c in comps]
    return prompts, comps, labels


def test_r_bce_decreases_on_a_sampled_set(tiny):
    model, tok = tiny
    prompts, comps, labels = _sampled_set(model, tok)
    assert all(1 <= len(c) <= 6 for c in comps) and 0 < sum(labels) < len(labels)
    feats = nado.collect_features(model, prompts, comps, labels, pad_id=tok.pad_token_id)
    assert feats.hidden.shape == (sum(len(c) for c in comps), model.config.hidden_size)
    cm = nado.ConstraintModel.for_model(model, inner=32)
    emb = nado.output_embeddings(model)
    before = nado.bce(cm, feats, emb)
    assert before == pytest.approx(0.6931, abs=1e-3)  # untrained R is the constant ½
    history = nado.train_constraint(cm, feats, emb, epochs=30, lr=1e-2, batch_size=64)
    after = nado.bce(cm, feats, emb)
    assert history[-1] < history[0]
    assert after < 0.5 * before


def test_save_load_roundtrip_and_shape_check(tiny, tmp_path):
    model, _ = tiny
    cm = nado.ConstraintModel.for_model(model, inner=16, seed=3)
    with torch.no_grad():
        cm.head.w2.weight.normal_()
        cm.head.token_bias.normal_()
    cm.save(tmp_path / "r")
    back = nado.ConstraintModel.load(tmp_path / "r")
    h = torch.randn(3, model.config.hidden_size)
    emb = nado.output_embeddings(model)
    torch.testing.assert_close(back.log_r(h, emb), cm.log_r(h, emb))
    idx = torch.randint(0, emb.shape[0], (3, 5))
    torch.testing.assert_close(back.log_r(h, emb, idx), cm.log_r(h, emb).gather(-1, idx))
    with pytest.raises(ConfigError, match="holds no constraint model"):
        nado.ConstraintModel.load(tmp_path / "missing")
    wrong = nado.ConstraintModel(nado.ConstraintHead(8, 10, 4))
    with pytest.raises(ConfigError, match="vocab 10 x hidden 8"):
        wrong.check_compatible(model)


def test_nado_decoding_reweights_by_r(tiny, tmp_path):
    from transformers import LogitsProcessorList

    model, tok = tiny
    ids = torch.tensor([tok("The weather today is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        greedy = model.generate(ids, do_sample=False, max_new_tokens=1, pad_token_id=tok.pad_token_id)[0, -1].item()
    cm = nado.ConstraintModel.for_model(model, inner=8)
    cm.save(tmp_path / "const")
    proc = nado.nado_decoding(model, tok, f"{tmp_path / 'const'},top_k=5")
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=1, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([proc]))
    assert out[0, -1].item() == greedy  # constant R: same choice as the model alone
    with torch.no_grad():
        cm.head.token_bias[greedy] = -30.0  # R says: this token leads to violations
    cm.save(tmp_path / "veto")
    proc.close()
    proc = nado.nado_decoding(model, tok, f"{tmp_path / 'veto'},top_k=5,alpha=1")
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([proc]))
    proc.close()
    assert out[0, ids.shape[1]].item() != greedy
    scores = torch.randn(1, model.config.vocab_size)
    proc = nado.NadoLogitsProcessor(model, cm, top_k=7)
    proc._last = torch.randn(1, model.config.hidden_size)
    kept = torch.isfinite(proc(None, scores)).sum().item()
    proc.close()
    assert kept == 7
    with pytest.raises(ConfigError, match="unknown nado decoding option"):
        nado.parse_decoding_spec("dir,beam=3")
