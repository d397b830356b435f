"""Token-wise constrained SFT (Qi et al. 2024): the loss's value, gradient limits, β schedule, reference modes."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from safeft import losses
from safeft.config import DatasetSpec, LoraConfig
from safeft.data.formatting import Collator, tokenize_rows
from safeft.methods import get_method_class
from safeft.methods.constrained_sft import ConstrainedSFT, beta_at, constrained_token_loss
from safeft.models import add_lora, tiny_llama


def _examples(tokenizer, n=4):
    rows = [{"prompt": f"Name a colour, number {i}.", "response": f"Colour {i} is a deep blue."} for i in range(n)]
    ex = tokenize_rows(rows, tokenizer, DatasetSpec(path="x"), 48)
    for i, e in enumerate(ex):
        e["idx"] = i
    return ex


def _method(model, **params):
    cls = get_method_class("constrained-sft")
    return cls(cls.validate_params(params), types.SimpleNamespace(model=model))


def _drift(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * scale


def test_default_schedule_is_the_papers():
    params = get_method_class("constrained-sft").Params()
    assert params.betas == [0.5, 2.0, 2.0, 2.0, 2.0] and params.beta == 0.1
    offsets = torch.arange(9)
    assert beta_at(offsets, params.betas, params.beta).tolist() == pytest.approx(
        [0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1, 0.1])


def test_hand_computed_value_and_gradient_at_default_beta():
    # p_θ(y) = 0.2, p_aligned(y) = 0.5, first response token (β_1 = 0.5)
    logp = torch.tensor([math.log(0.2)], requires_grad=True)
    ref = torch.tensor([math.log(0.5)])
    loss = constrained_token_loss(logp, ref, torch.tensor([0.5]))
    # Δ = log 0.4 = -0.916291; σ(βΔ) = σ(-0.458145) = 0.387426; -(2/0.5)·log 0.387426 = 3.792923
    assert loss.item() == pytest.approx(3.792923, abs=1e-5)
    (g,) = torch.autograd.grad(loss, logp)
    # ∂ℓ/∂logp = -2·σ(-βΔ) = -2·0.612574
    assert g.item() == pytest.approx(-1.225148, abs=1e-5)
    # a token already above the aligned model (Δ = +log 2) at β = 2: ℓ = (2/2)·softplus(-2 log 2) = log(1.25)
    up = constrained_token_loss(torch.tensor([math.log(0.8)]), torch.tensor([math.log(0.4)]), torch.tensor([2.0]))
    assert up.item() == pytest.approx(math.log(1.25), abs=1e-6)


def test_logit_gradient_matches_closed_form():
    z = torch.tensor([[1.0, -0.5, 0.3, 2.0]], requires_grad=True)
    y = torch.tensor([2])
    ref = torch.tensor([math.log(0.3)])
    logp = losses.token_logprobs(z, y)
    loss = constrained_token_loss(logp, ref, torch.tensor([0.5])).sum()
    (g,) = torch.autograd.grad(loss, z)
    p = torch.softmax(z.detach(), -1)
    delta = math.log(p[0, 2].item()) - math.log(0.3)
    w = 2 * (1 / (1 + math.exp(0.5 * delta)))  # 2·σ(-βΔ)
    expect = w * (p - F.one_hot(y, 4).float())
    assert torch.allclose(g, expect, atol=1e-6)


def test_gradient_tends_to_cross_entropy_as_beta_goes_to_zero(tokenizer):
    torch.manual_seed(0)
    model = add_lora(tiny_llama(vocab_size=len(tokenizer), seed=0), LoraConfig(r=4, alpha=8))
    _drift(model)
    batch = Collator(tokenizer.pad_token_id)(_examples(tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = types.SimpleNamespace(epoch_index=0.0)

    def grads(method):
        out = method.compute_loss(model, batch, trainer)
        return torch.cat([g.flatten() for g in torch.autograd.grad(out.loss_sum, params)])

    ce = grads(get_method_class("sft")(None, types.SimpleNamespace(model=model)))
    errs = []
    for b in (1.0, 0.1, 1e-3):
        g = grads(_method(model, betas=[b], beta=b))
        errs.append(((g - ce).norm() / ce.norm()).item())
    assert errs[0] > 0.05  # at β = 1 the gradient is visibly not CE's
    assert errs[-1] < 1e-3  # at β = 1e-3 it is CE's
    assert errs[0] > errs[1] > errs[2]


def test_beta_schedule_applies_to_response_tokens_only(tokenizer):
    ex = _examples(tokenizer, 2)
    batch = Collator(tokenizer.pad_token_id)(ex)
    pos = losses.response_positions(batch["labels"])
    offsets = losses.response_offsets(pos)
    n_prompt = [sum(1 for t in e["labels"] if t == -100) for e in ex]
    n_resp = [len(e["labels"]) - k for e, k in zip(ex, n_prompt)]
    assert pos.n == sum(n_resp) and all(k > 5 for k in n_prompt)
    # offsets restart at 0 on each row's first response token; prompt tokens are never selected
    assert offsets.tolist() == list(range(n_resp[0])) + list(range(n_resp[1]))
    beta = beta_at(offsets, [0.5, 2, 2, 2, 2], 0.1)
    assert beta[:6].tolist() == pytest.approx([0.5, 2, 2, 2, 2, 0.1])
    # each selected position predicts a response token (the target at the first offset is the first response token)
    first_resp = ex[0]["labels"][n_prompt[0]]
    assert pos.targets[0].item() == first_resp


def test_loss_is_first_tokens_weighted_per_position(tokenizer):
    """The method's loss equals the per-token formula with β by response offset (live reference)."""
    model = add_lora(tiny_llama(vocab_size=len(tokenizer), seed=0), LoraConfig(r=4, alpha=8))
    _drift(model)
    batch = Collator(tokenizer.pad_token_id)(_examples(tokenizer))
    out = _method(model).compute_loss(model, batch, types.SimpleNamespace(epoch_index=0.0))
    pos = losses.response_positions(batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][pos.mask]
        with model.disable_adapter():
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][pos.mask]
    lp, rp = losses.token_logprobs(logits, pos.targets), losses.token_logprobs(ref, pos.targets)
    beta = beta_at(losses.response_offsets(pos), [0.5, 2, 2, 2, 2], 0.1)
    expect = (2 / beta * F.softplus(-beta * (lp - rp))).sum()
    assert out.loss_sum.item() == pytest.approx(expect.item(), rel=1e-4)
    assert out.metrics["log_ratio"] == pytest.approx((lp - rp).mean().item(), abs=1e-4)


def test_cached_and_live_give_the_same_loss(tokenizer):
    model = add_lora(tiny_llama(vocab_size=len(tokenizer), seed=0), LoraConfig(r=4, alpha=8))
    ex = _examples(tokenizer)
    coll = Collator(tokenizer.pad_token_id)
    live, cached = _method(model, reference="live"), _method(model, reference="cached")
    cached.reference.build_cache(model, ex, coll, 3, "cpu")  # before any update, as prepare() does
    _drift(model)
    batch = coll(ex)
    trainer = types.SimpleNamespace(epoch_index=0.0)
    a, b = live.compute_loss(model, batch, trainer), cached.compute_loss(model, batch, trainer)
    assert abs(a.metrics["log_ratio"]) > 1e-3  # the policy has drifted from the reference
    assert b.loss_sum.item() == pytest.approx(a.loss_sum.item(), rel=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    ga = torch.autograd.grad(a.loss_sum, params)
    gb = torch.autograd.grad(b.loss_sum, params)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)


def test_trains_with_cached_reference_via_api(tokenizer, tmp_path, chat_jsonl):
    from safeft.api import train

    model = add_lora(tiny_llama(vocab_size=len(tokenizer), seed=0), LoraConfig(r=4, alpha=8))
    summary = train(None, model=model, tokenizer=tokenizer, **{
        "method.name": "constrained-sft", "method.reference": "cached", "data.train.path": str(chat_jsonl),
        "data.max_length": 48, "training.max_steps": 3, "training.save_strategy": "no",
        "training.disable_tqdm": True, "output_dir": str(tmp_path / "run")})
    assert summary["global_step"] == 3 and math.isfinite(summary["train_loss"])
    assert (tmp_path / "run" / "reference_cache.safetensors").is_file()
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_registered_with_paper():
    assert get_method_class("constrained-sft") is ConstrainedSFT
    assert "Qi et al" in ConstrainedSFT.paper
