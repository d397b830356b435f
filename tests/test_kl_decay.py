"""KL-decay (Vorontsov et al.): the KL term, its schedule, the reference modes, and the effect."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from safeft import losses
from safeft.config import DatasetSpec, LoraConfig
from safeft.data.formatting import Collator, tokenize_rows
from safeft.engine.reference import Reference
from safeft.methods import get_method_class
from safeft.methods.kl_decay import KLDecay, decay_weight
from safeft.models import add_lora, tiny_llama


def _batch(tokenizer, n=4, max_length=48, offset=0):
    rows = [{"prompt": f"Name a fruit number {i + offset}.", "response": f"Fruit {i + offset} is a ripe apple."}
            for i in range(n)]
    ex = tokenize_rows(rows, tokenizer, DatasetSpec(path="x"), max_length)
    for i, e in enumerate(ex):
        e["idx"] = i
    return Collator(tokenizer.pad_token_id)(ex)


def _lora_model(tokenizer, seed=0, perturb=0.0):
    model = add_lora(tiny_llama(vocab_size=len(tokenizer), seed=seed), LoraConfig(r=4, alpha=8))
    if perturb:
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * perturb
    return model


def _method(model, **params):
    run = types.SimpleNamespace(model=model)
    cls = get_method_class("kl-decay")
    return cls(cls.validate_params(params), run)


def _trainer(epoch=0.0):
    return types.SimpleNamespace(epoch_index=epoch)


def test_decay_weight_integer_and_per_step():
    # integer epoch: constant within an epoch, multiplied by γ at each epoch boundary
    assert decay_weight(2.0, 0.5, 0.0) == 2.0
    assert decay_weight(2.0, 0.5, 0.999) == 2.0
    assert decay_weight(2.0, 0.5, 1.0) == 1.0
    assert decay_weight(2.0, 0.5, 2.5) == 0.5
    assert decay_weight(1.0, 0.8, 3.0) == pytest.approx(0.512)
    # fractional epoch decays every step
    assert decay_weight(2.0, 0.5, 0.5, per_step=True) == pytest.approx(2.0 * 0.5**0.5)
    assert decay_weight(1.0, 0.8, 1.25, per_step=True) == pytest.approx(0.8**1.25)
    assert decay_weight(1.0, 1.0, 7.0) == 1.0


def test_kl_weight_follows_trainer_epoch(tokenizer):
    model = _lora_model(tokenizer)
    method = _method(model, gamma=0.5, lam=3.0)
    batch = _batch(tokenizer)
    assert method.compute_loss(model, batch, _trainer(0.4)).metrics["kl_weight"] == 3.0
    assert method.compute_loss(model, batch, _trainer(2.0)).metrics["kl_weight"] == 0.75


@pytest.mark.parametrize("reference", ["live", "cached"])
def test_kl_is_zero_at_step_zero(tokenizer, reference):
    model = _lora_model(tokenizer)
    batch = _batch(tokenizer)
    method = _method(model, reference=reference)
    if reference == "cached":
        method.reference.build_cache(model, [dict(e) for e in _rows(tokenizer)], Collator(tokenizer.pad_token_id), 4, "cpu")
    out = method.compute_loss(model, batch, _trainer())
    if reference == "live":
        assert out.metrics["kl"] == 0.0  # the same weights, the same arithmetic: exactly zero
    else:
        assert abs(out.metrics["kl"]) < 1e-6  # separate float paths (cache vs policy), same model
    assert out.loss_sum.item() == pytest.approx(out.metrics["ce"] * out.n_tokens, rel=1e-5)


def _rows(tokenizer):
    b = _batch(tokenizer)
    return [{"input_ids": b["input_ids"][i][b["attention_mask"][i].bool()].tolist(),
             "labels": b["labels"][i][b["attention_mask"][i].bool()].tolist(), "idx": i} for i in range(4)]


def test_adapter_disabled_reference_equals_frozen_copy(tokenizer):
    base = tiny_llama(vocab_size=len(tokenizer), seed=0)
    frozen = copy.deepcopy(base).eval()
    model = add_lora(base, LoraConfig(r=4, alpha=8))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)  # the adapter now changes the outputs a lot
    batch = _batch(tokenizer)
    pos = losses.response_positions(batch["labels"])
    ref = Reference(model, "live").live_logits(model, batch, pos)
    with torch.no_grad():
        expect = frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][pos.mask]
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][pos.mask]
    assert torch.allclose(ref.log_softmax(-1), expect.log_softmax(-1), atol=1e-5)
    assert (adapted - expect).abs().max() > 1e-2  # and the adapter was really on for training


def test_chunked_loss_gradient_matches_unchunked(tokenizer):
    """The memory-flat loss gives the same loss and gradients as one big log-softmax."""
    for lora in (True, False):
        torch.manual_seed(0)
        base = tiny_llama(vocab_size=len(tokenizer), seed=0)
        model = add_lora(base, LoraConfig(r=4, alpha=8)) if lora else base
        batch = _batch(tokenizer)
        params = [p for p in model.parameters() if p.requires_grad]

        hidden, pos = losses.position_hidden(model, batch)
        total, stats = losses.chunked_loss(
            model, hidden, lambda lg, s, e: (F.cross_entropy(lg, pos.targets[s:e], reduction="sum"), {}), chunk=5)
        g_chunk = torch.autograd.grad(total, params)

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = F.cross_entropy(logits[:, :-1][pos.mask], pos.targets, reduction="sum")
        g_ref = torch.autograd.grad(ref, params)
        assert total.item() == pytest.approx(ref.item(), rel=1e-5)
        for a, b in zip(g_chunk, g_ref):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cached_topk_kl_close_to_exact_kl(smollm2_dir):
    """The cached reference's top-k KL against the exact full-vocabulary KL, on the real model.

    Tolerance (stated in docs/kl-decay.md): with k=32 on SmolLM2, the batch-mean top-k KL is
    within 15% of the exact one and every token within 0.05 nats; the error shrinks as k grows.
    """
    from safeft.config import ModelConfig
    from safeft.models import load_model

    model, tok = load_model(ModelConfig(name_or_path=str(smollm2_dir), lora=LoraConfig(r=8, alpha=16)))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.02  # a drifted policy
    rows = [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
            {"prompt": "Give me a tip for sleeping well.", "response": "Keep a regular bedtime and avoid screens."}]
    ex = tokenize_rows(rows, tok, DatasetSpec(path="x"), 64)
    batch = Collator(tok.pad_token_id)(ex)
    pos = losses.response_positions(batch["labels"])
    with torch.no_grad():
        hidden, _ = losses.position_hidden(model, batch, pos)
        logits = losses.lm_head(model)(hidden).float()
        ref_logp = Reference(model, "live").live_logits(model, batch, pos).log_softmax(-1)
    exact = losses.kl_full(logits.log_softmax(-1), ref_logp)
    assert exact.mean() > 1e-3  # the policy really drifted
    errors = {}
    for k in (32, 128):
        top, idx = ref_logp.topk(k, -1)
        approx = losses.kl_topk(logits, idx, top)
        errors[k] = (approx - exact).abs()
        if k == 32:
            assert abs(approx.mean() - exact.mean()) <= 0.15 * exact.mean()
            assert errors[k].max() <= 0.05
    assert errors[128].mean() < errors[32].mean()


def test_cached_and_live_agree_after_drift(tokenizer):
    """With a drifted policy, cached top-k KL (k = vocab) equals the live exact KL."""
    model = _lora_model(tokenizer)
    method_live = _method(model, reference="live")
    method_cached = _method(model, reference="cached", top_k=len(tokenizer))
    coll = Collator(tokenizer.pad_token_id)
    method_cached.reference.build_cache(model, _rows(tokenizer), coll, 4, "cpu")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    batch = _batch(tokenizer)
    live = method_live.compute_loss(model, batch, _trainer())
    cached = method_cached.compute_loss(model, batch, _trainer())
    assert live.metrics["kl"] > 1e-3
    assert cached.metrics["kl"] == pytest.approx(live.metrics["kl"], rel=1e-3)
    assert cached.loss_sum.item() == pytest.approx(live.loss_sum.item(), rel=1e-4)


def _heldout_kl(model, tokenizer) -> float:
    batch = _batch(tokenizer, n=6, offset=100)
    pos = losses.response_positions(batch["labels"])
    ref = Reference(model, "live")
    with torch.no_grad():
        h, _ = losses.position_hidden(model, batch, pos)
        lp = losses.lm_head(model)(h).float().log_softmax(-1)
        rp = ref.live_logits(model, batch, pos).log_softmax(-1)
    return losses.kl_full(lp, rp).mean().item()


def test_kl_decay_stays_closer_to_reference_than_sft(tokenizer, tmp_path, chat_jsonl):
    """Same model, data, steps and seed: kl-decay ends nearer the aligned model on held-out prompts."""
    from safeft.api import train

    kls = {}
    for method in ("sft", "kl-decay"):
        model = tiny_llama(vocab_size=len(tokenizer), seed=0)
        overrides = {
            "method.name": method, "data.train.path": str(chat_jsonl), "data.max_length": 48,
            "training.max_steps": 8, "training.learning_rate": 1e-2, "training.per_device_train_batch_size": 4,
            "training.save_strategy": "no", "training.disable_tqdm": True, "training.logging_steps": 100,
            "output_dir": str(tmp_path / method),
        }
        if method == "kl-decay":
            overrides["method.lam"] = 20.0  # a random tiny model: CE gradients dwarf λ=1
        model = add_lora(model, LoraConfig(r=4, alpha=8))
        train(None, model=model, tokenizer=tokenizer, **overrides)
        kls[method] = _heldout_kl(model, tokenizer)
    # measured: sft 0.0186, kl-decay (λ=20) 0.0042 nats/token
    assert kls["sft"] > 0.01  # sft moved away from the starting model
    assert kls["kl-decay"] < 0.5 * kls["sft"], kls


def test_registered_with_paper():
    cls = get_method_class("kl-decay")
    assert cls is KLDecay and "Vorontsov" in cls.paper
