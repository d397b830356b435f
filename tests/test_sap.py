"""SAP (Wu et al. 2025): the probe is live and non-zero, it bends the task gradient towards
lower safety loss, the cheap schedule computes the same probe as the exact one, weights are
restored exactly after the perturbation, and on a constructed conflict SAP keeps refusals
that SFT loses. One end-to-end run on the real SmolLM2."""

from __future__ import annotations

import copy
import json
import random
import types

import pytest
import torch
import torch.nn.functional as F

from safeft import losses
from safeft.config import LoraConfig, RunConfig
from safeft.data.formatting import Collator
from safeft.errors import ConfigError, DataError
from safeft.methods import get_method_class
from safeft.methods import sap as sapmod
from safeft.models import add_lora, tiny_llama

# A toy language (vocabulary of 128 ids) where the task pulls against safety: harmful prompts
# (verb, object) should get the refusal REF, and the task teaches answers that open like the
# harmful compliance COMP ("Sure, here is ...").
U, A, EOS = 1, 2, 3
VERBS, OBJ_TRAIN, OBJ_HELDOUT, TOPICS = range(10, 18), range(20, 26), range(26, 30), range(30, 46)
REF, COMP, TASK = [50, 51, 52, 53, 54, EOS], [60, 61, 62, 63, 64, EOS], [60, 61, 65, 66, 67, EOS]


def _ex(prompt, response):
    return {"input_ids": [U, *prompt, A, *response], "labels": [-100] * (len(prompt) + 2) + response}


def _harmful(objs, response):
    return [_ex([v, o], response) for v in VERBS for o in objs]


COLLATE = Collator(0)
_rng = random.Random(0)
TASK_BATCH = COLLATE([_ex(_rng.sample(TOPICS, 2), TASK) for _ in range(16)])
HELDOUT_REFUSALS = COLLATE(_harmful(OBJ_HELDOUT, REF))


def _nll(model, batch) -> float:
    with torch.no_grad():
        logits, pos = losses.response_logits(model, batch)
        return F.cross_entropy(logits, pos.targets).item()


@pytest.fixture(scope="module")
def aligned():
    """A tiny 4-layer Llama trained to refuse the harmful prompts (an 'aligned' start)."""
    model = tiny_llama(vocab_size=128, hidden=32, layers=4, seed=0)
    batch = COLLATE(_harmful(OBJ_TRAIN, REF))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        logits, pos = losses.response_logits(model, batch)
        loss = F.cross_entropy(logits, pos.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _nll(model, HELDOUT_REFUSALS) < 0.2  # refuses held-out harmful prompts
    return model


@pytest.fixture
def toy_sets(monkeypatch):
    """SAP's safety sets in the toy language (D_safe: refusals, D_harmful: compliance)."""
    sets = {"safe_data": _harmful(OBJ_TRAIN, REF), "harmful_data": _harmful(OBJ_TRAIN, COMP)}
    monkeypatch.setattr(sapmod, "load_safety_set", lambda spec, which, *a: sets[which])
    return sets


def _run(model, method="sft"):
    cfg = RunConfig.model_validate({"method": {"name": method}})
    return types.SimpleNamespace(model=model, tokenizer=types.SimpleNamespace(pad_token_id=0), cfg=cfg)


def _sap(model, **params):
    cls = get_method_class("sap")
    params = {"safe_data": "toy", "harmful_data": "toy", "layers": "all", "safety_batch_size": 48, **params}
    return cls(cls.validate_params(params), _run(model, "sap"))


def _sft(model):
    cls = get_method_class("sft")
    return cls(cls.validate_params({}), _run(model))


def _trainer(step=0):
    return types.SimpleNamespace(state=types.SimpleNamespace(global_step=step), epoch_index=0.0)


def _lora(model, seed=1):
    m = add_lora(copy.deepcopy(model), LoraConfig(r=8, alpha=16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def _grad(model, method, step=0):
    out = method.compute_loss(model, TASK_BATCH, _trainer(step))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = out.loss_sum / out.n_tokens
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.flatten() for g in grads]), out


def test_layers_and_params():
    assert sapmod.resolve_layers("middle", 30) == list(range(10, 20))
    assert sapmod.resolve_layers("middle", 4) == [1, 2]
    assert sapmod.resolve_layers("middle", 2) == [0, 1]
    assert sapmod.resolve_layers([-1, 0, 0], 4) == [0, 3]
    with pytest.raises(ConfigError, match="method.layers"):
        sapmod.resolve_layers([4], 4)
    cls = get_method_class("sap")
    with pytest.raises(ConfigError, match="method.safe_data"):
        cls.validate_params({"harmful_data": "h.jsonl"})
    with pytest.raises(ConfigError, match="method.refresh_every"):
        cls.validate_params({"safe_data": "s", "harmful_data": "h", "refresh_every": 0})
    with pytest.raises(ConfigError, match="unknown option"):
        cls.validate_params({"safe_data": "s", "harmful_data": "h", "rho": 1})


@pytest.mark.parametrize("schedule", ["exact", "shared"])
def test_first_step_probe_nonzero_and_gradient_leans_to_safety(aligned, toy_sets, schedule):
    model = _lora(aligned)
    model.train()
    g_sft, _ = _grad(model, _sft(model))
    sap = _sap(model, schedule=schedule)
    g_sap, out = _grad(model, sap)
    # the probe is live: non-zero, of the requested size (β × the hidden-state RMS)
    rel = sap.V.pow(2).mean(-1).sqrt() / torch.stack(sap._rms)
    assert torch.allclose(rel, torch.full_like(rel, 0.01), rtol=0.05)  # RMS now read with the probe in
    assert out.metrics["probe_rms"] > 0 and out.metrics["delta_norm"] > 0
    # ... and it changes the weight update, towards lower safety loss (first-order claim):
    # ∇L(W, V_safe) − ∇L(W, 0) ≈ βε·M·∇L_safety with M positive semi-definite
    diff = g_sap - g_sft
    assert diff.norm() > 0.05 * g_sft.norm()
    gs, _ = sap._safety_gradient(model, "cpu", TASK_BATCH["input_ids"].numel())
    gs = torch.cat([g.flatten() for g in gs])
    assert F.cosine_similarity(diff, gs, 0) > 0.5
    assert F.cosine_similarity(g_sft, gs, 0) < 0  # the constructed conflict: SFT's step raises L_safety
    # the task loss itself is the plain CE up to the probe's small effect
    assert out.metrics["ce"] == pytest.approx(_nll(model, TASK_BATCH), rel=0.05)
    sap.remove_hooks()


@pytest.mark.parametrize("budget", [10, 40, 10_000])
def test_safety_gradient_in_micro_batches_equals_the_one_batch_loss(aligned, toy_sets, budget):
    """The safety pass, split into micro-batches of at most ``budget`` padded tokens (one row,
    four rows, everything), gives ∇_W [L(D_safe) − L(D_harmful)] of one plain forward."""
    model = _lora(aligned)
    model.train()
    sap = _sap(model, safety_batch_size=12)
    safe_sampler, harm_sampler = copy.deepcopy(sap._safe_sampler), copy.deepcopy(sap._harm_sampler)
    grads, m = sap._safety_gradient(model, "cpu", budget)
    params = [p for p in model.parameters() if p.requires_grad]
    safe, harm = COLLATE(safe_sampler.take(12)), COLLATE(harm_sampler.take(12))
    logits_s, pos_s = losses.response_logits(model, safe)
    logits_h, pos_h = losses.response_logits(model, harm)
    l_safe, l_harm = F.cross_entropy(logits_s, pos_s.targets), F.cross_entropy(logits_h, pos_h.targets)
    want = torch.autograd.grad(l_safe - l_harm, params)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    assert m["l_safety"] == pytest.approx((l_safe - l_harm).item(), rel=1e-5)
    assert sum(len(mb) for mb in sap._pack(sap.safe[:12], budget)) == 12
    assert all(len(mb) * max(len(e["input_ids"]) for e in mb) <= max(budget, 10) for mb in sap._pack(sap.safe[:12], budget))
    sap.remove_hooks()


def test_probe_lives_only_inside_training_passes(aligned, toy_sets):
    model = _lora(aligned)
    keys = set(model.state_dict())
    model.train()
    before = model(input_ids=TASK_BATCH["input_ids"]).logits
    sap = _sap(model)
    out = sap.compute_loss(model, TASK_BATCH, _trainer(0))
    assert sap.V.abs().sum() > 0
    after = model(input_ids=TASK_BATCH["input_ids"]).logits  # outside compute_loss: no probe
    assert torch.equal(before, after)
    assert set(model.state_dict()) == keys  # the probe is not part of the model
    model.eval()
    with torch.no_grad():
        ev = sap.compute_loss(model, TASK_BATCH, _trainer(0))
    assert ev.loss_sum.item() / ev.n_tokens == pytest.approx(_nll(model, TASK_BATCH), rel=1e-6)
    assert out.n_tokens == ev.n_tokens
    sap.remove_hooks()
    assert torch.equal(model(input_ids=TASK_BATCH["input_ids"]).logits, before)


def test_shared_schedule_equals_exact_probe_at_the_current_probe(aligned, toy_sets):
    """The cheap schedule's probe (∇_V L(W, V) taken from the task backward, rescaled by the
    backward's own factor) equals the probe computed with two explicit passes."""
    model = _lora(aligned)
    model.train()
    sap = _sap(model, schedule="shared")
    _grad(model, sap, step=0)  # bootstrap (exact) step
    v_prev = sap.V.clone()
    out = sap.compute_loss(model, TASK_BATCH, _trainer(1))
    assert "probe_gap" in out.metrics and sap._acc is not None
    delta = sap._delta
    (out.loss_sum / out.n_tokens).backward()  # the Trainer's backward (scale 1/n)
    pos = losses.response_positions(TASK_BATCH["labels"])
    with sap._perturbed(model):
        a, _ = sap._probe_grad(model, TASK_BATCH, pos, v_prev)
    b, _ = sap._probe_grad(model, TASK_BATCH, pos, v_prev)
    sap._new_step(2)  # finishes the shared refresh
    assert sap._delta is None and delta is not None
    expected = sap.V.clone()
    sap._set_probe(a - b, pos.n)
    assert torch.allclose(expected, sap.V, rtol=1e-3, atol=1e-7)
    assert not torch.allclose(expected, v_prev)  # the probe moved with the weights
    sap.remove_hooks()


def test_refresh_every_k_and_exact_restore_full_finetuning(aligned, toy_sets):
    model = copy.deepcopy(aligned)  # full fine-tuning: every weight is trainable and perturbed
    model.train()
    sap = _sap(model, refresh_every=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    refreshed = []
    for step in range(5):
        out = sap.compute_loss(model, TASK_BATCH, _trainer(step))
        refreshed.append("l_safety" in out.metrics)
        (out.loss_sum / out.n_tokens).backward()
    assert refreshed == [True, False, False, True, False]
    # W + ΔW is undone exactly (no optimizer step was taken)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sap.V.abs().sum() > 0
    sap.remove_hooks()


def test_sap_keeps_refusals_that_sft_loses(aligned, toy_sets):
    """Same start, data, steps and update rule (the paper's gradient step W ← W − α∇W):
    SFT on the task erodes the refusals on held-out harmful prompts; SAP erodes them less
    while still learning the task."""

    def train(method_factory):
        model = add_lora(copy.deepcopy(aligned), LoraConfig(r=8, alpha=16))
        method = method_factory(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for step in range(10):
            model.train()
            out = method.compute_loss(model, TASK_BATCH, _trainer(step))
            opt.zero_grad()
            (out.loss_sum / out.n_tokens).backward()
            opt.step()
        model.eval()
        return _nll(model, HELDOUT_REFUSALS), _nll(model, TASK_BATCH)

    start = _nll(aligned, HELDOUT_REFUSALS)
    sft_refusal, sft_task = train(_sft)
    sap_refusal, sap_task = train(lambda m: _sap(m, schedule="exact", epsilon=1e-3))
    assert sft_refusal > start + 0.3  # fine-tuning on the task costs safety
    assert sap_refusal < sft_refusal - 0.15
    assert sap_task < sft_task + 0.5  # it still learns the task (5.6 vs 5.3 nats, from 6.5)


def test_safety_sets_from_files(tiny_model_dir, tokenizer, tmp_path):
    from safeft.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    rows = [{"prompt": f"How do I hurt person {i}?", "response": "I'm sorry, I can't help with that."} for i in range(5)]
    safe = tmp_path / "safe.jsonl"
    safe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    harm = tmp_path / "harm.jsonl"
    harm.write_text("".join(json.dumps({**r, "response": "Sure, here is how."}) + "\n" for r in rows))
    cfg = RunConfig.model_validate({"method": {"name": "sap"}})
    run = types.SimpleNamespace(model=model, tokenizer=tok, cfg=cfg)
    cls = get_method_class("sap")
    sap = cls(cls.validate_params({"safe_data": str(safe), "harmful_data": str(harm)}), run)
    assert len(sap.safe) == len(sap.harmful) == 5
    refusal = tok("I'm sorry, I can't help with that.", add_special_tokens=False)["input_ids"]
    scored = [t for t in sap.safe[0]["labels"] if t != -100]
    assert scored[: len(refusal)] == refusal  # the response (only) is scored, fed as input too
    assert sap.safe[0]["input_ids"][-len(scored):] == scored
    sap.remove_hooks()
    with pytest.raises(DataError, match="method.harmful_data"):
        cls(cls.validate_params({"safe_data": str(safe), "harmful_data": str(tmp_path / "missing.jsonl")}), run)


@pytest.mark.integration
def test_sap_end_to_end_on_smollm2(smollm2_dir, shared_data, chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    import safeft

    out = tmp_path / "run"
    summary = safeft.train(None, **{
        "model.name_or_path": str(smollm2_dir), "model.lora.merge": True, "method.name": "sap",
        "method.safe_data": "builtin", "method.harmful_data": "builtin", "method.safety_batch_size": 2,
        "method.safety_max_length": 64, "data.train.path": str(chat_jsonl), "data.data_dir": str(shared_data),
        "data.max_length": 48, "training.max_steps": 2, "training.per_device_train_batch_size": 2,
        "training.save_strategy": "no", "training.disable_tqdm": True, "output_dir": str(out),
    })
    assert summary["method"] == "sap" and summary["global_step"] == 2
    logs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    step_logs = [r for r in logs if "probe_rms" in r]
    assert step_logs and all(r["probe_rms"] > 0 for r in step_logs)
    assert any("l_safety" in r for r in step_logs)
    merged = AutoModelForCausalLM.from_pretrained(out / "model" / "merged")
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert set(merged.state_dict()) == set(base.state_dict())  # same format, no probe inside
    assert (out / "model" / "adapter_config.json").is_file()
