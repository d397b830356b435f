"""Rewards, PPO batching, the RA-RLHF filter inside the loop, and rlhf/ra-rlhf runs on tiny
models; one integration run on the real SmolLM2 with RealToxicityPrompts and the offline reward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import safeft
from safeft.errors import ConfigError
from safeft.models import add_lora, tiny_llama
from safeft.config import LoraConfig
from safeft.rl.ppo import PPOParams, PPOTrainer, generate_episodes, response_forward
from safeft.rl.rewards import get_reward, register_reward


@register_reward("test-constant")
def _constant(value: float = 1.0):
    return lambda prompts, responses: torch.full((len(responses),), float(value))


def test_offline_toxicity_reward_logit_and_prob():
    from profanity_check import predict_prob

    texts = ["you are a stupid idiot", "the weather is nice today"]
    p = torch.tensor(predict_prob(texts), dtype=torch.float32)
    r = get_reward("toxicity")(["", ""], texts)
    pc = p.clamp(1e-4, 1 - 1e-4)  # the logit is clipped at ±log(9999) = ±9.21
    assert torch.allclose(r, -torch.log(pc / (1 - pc)), atol=1e-4)
    assert r[0].item() == pytest.approx(-9.2102, abs=1e-3)
    assert r[0] < 0 < r[1]
    assert torch.allclose(get_reward("toxicity", scale="prob")(["", ""], texts), -p)
    with pytest.raises(ConfigError):
        get_reward("toxicity", scale="bogus")


def test_hf_classifier_reward_label_sign_and_batching(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2,
                      id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1},
                      pad_token_id=tokenizer.pad_token_id)
    clf = LlamaForSequenceClassification(cfg)
    clf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = ["hello there", "a much longer sentence about nothing in particular", "x"]
    enc = [clf(**tokenizer(t, return_tensors="pt")).logits[0].detach() for t in texts]
    r = get_reward(f"hf:{tmp_path}", label="toxic", sign=-1.0, batch_size=2)(["", "", ""], texts)
    assert torch.allclose(r, torch.stack([-e[1] for e in enc]), atol=1e-4)
    assert not r.requires_grad
    rp = get_reward(f"hf:{tmp_path}", label=0, output="prob")(["", "", ""], texts)
    assert torch.allclose(rp, torch.stack([e.softmax(-1)[0] for e in enc]), atol=1e-5)
    with pytest.raises(ConfigError, match="label"):
        get_reward(f"hf:{tmp_path}", label="nope")


def test_callable_reward_and_bad_specs(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def length(prompts, responses, scale=1.0):\n"
                                            "    return [scale * len(r) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = get_reward("my_rewards:length", scale=0.5)(["a", "b"], ["abcd", ""])
    assert r.tolist() == [2.0, 0.0]
    with pytest.raises(ConfigError, match="cannot import"):
        get_reward("my_rewards:missing")
    with pytest.raises(ConfigError, match="unknown reward"):
        get_reward("no-such-reward")


def _tiny_lora(tokenizer, seed=0):
    model = tiny_llama(vocab_size=len(tokenizer), hidden=64, layers=2, seed=seed)
    return add_lora(model, LoraConfig(r=4, alpha=8))


def test_response_forward_matches_unpadded_forward(tokenizer):
    model = _tiny_lora(tokenizer)
    torch.manual_seed(0)
    ep = generate_episodes(model, tokenizer, ["Hi", "A much longer prompt with many words"], max_new_tokens=5)
    logp, _ = response_forward(model, *ep.take(torch.arange(2)))
    for i in range(2):
        q = ep.query_ids[i][ep.query_mask[i].bool()]
        n = int(ep.response_mask[i].sum())
        r = ep.response_ids[i][:n]
        logits = model(input_ids=torch.cat([q, r])[None]).logits[0, len(q) - 1 : len(q) + n - 1].float()
        single = torch.log_softmax(logits, -1).gather(-1, r[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, :n], single, atol=1e-4)


def test_update_uses_only_the_tail(tokenizer):
    model = _tiny_lora(tokenizer)
    prompts = [f"item {i}" for i in range(6)]
    reward = lambda ps, rs: torch.tensor([float(p.split()[1]) for p in ps])  # noqa: E731
    params = PPOParams(batch_size=6, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4)
    tr = PPOTrainer(model, tokenizer, reward, params, learning_rate=1e-3, tail_by="score")
    st = tr.step(prompts, keep=2)
    assert st["kept"] == 2
    assert st["reward_kept_mean"] == pytest.approx(0.5)  # items 0 and 1, the lowest scores
    assert st["reward_mean"] == pytest.approx(2.5)
    assert tr.kl_ctl.value < 0.2  # first iteration: KL = 0 < target 6, so β goes down


def _run(tmp_path, tiny_model_dir, name, method, steps, **extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about topic {i}." for i in range(8)) + "\n")
    out = tmp_path / name
    opts = {"model.name_or_path": str(tiny_model_dir), "method.name": method, "data.train.path": str(prompts),
            "method.batch_size": 4, "method.mini_batch_size": 2, "method.ppo_epochs": 1,
            "method.max_new_tokens": 5, "method.reward": "test-constant", "training.max_steps": steps,
            "training.learning_rate": 1e-3, "output_dir": str(out), "model.lora.r": 4}
    opts.update(extra)
    summary = safeft.train(None, **opts)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, load_file(str(out / "model" / "adapter_model.safetensors"))


def test_ra_rlhf_equals_rlhf_when_the_tail_is_the_whole_batch(tmp_path, tiny_model_dir):
    _, rows_a, w_a = _run(tmp_path, tiny_model_dir, "rlhf", "rlhf", 2)
    _, rows_b, w_b = _run(tmp_path, tiny_model_dir, "ra", "ra-rlhf", 2, **{"method.n_warmup": 2, "method.alpha": 0.25})
    assert [r["kept"] for r in rows_b] == [4, 4]
    assert w_a.keys() == w_b.keys()
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in w_a.items() if "lora_B" in k)  # it trained
    assert [r["kl_coef"] for r in rows_a] == [r["kl_coef"] for r in rows_b]
    assert (tmp_path / "rlhf" / "model" / "value_head.safetensors").is_file()


def test_ra_rlhf_follows_the_schedule(tmp_path, tiny_model_dir):
    # M=3, n=1, alpha=0.5, rho=0.67 -> alpha at ceil(2.01)=3: kept 4, ceil(0.75*4)=3, 2
    summary, rows, _ = _run(tmp_path, tiny_model_dir, "ra", "ra-rlhf", 3,
                            **{"method.n_warmup": 1, "method.alpha": 0.5, "method.rho": 0.67})
    assert [r["kept"] for r in rows] == [4, 3, 2]
    assert summary["method"] == "ra-rlhf" and summary["global_step"] == 3


def test_bad_options_are_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="alpha"):
        _run(tmp_path, tiny_model_dir, "bad", "ra-rlhf", 1, **{"method.alpha": 1.5})
    with pytest.raises(ConfigError, match="unknown reward"):
        _run(tmp_path, tiny_model_dir, "bad2", "rlhf", 1, **{"method.reward": "nope"})


@pytest.mark.integration
def test_rlhf_smollm2_realtoxicityprompts(tmp_path, smollm2_dir, shared_data):
    out = tmp_path / "rlhf"
    summary = safeft.train(None, **{
        "model.name_or_path": str(smollm2_dir), "method.name": "rlhf",
        "data.train.path": str(shared_data / "realtoxicityprompts" / "rtp_insult.txt"),
        "method.batch_size": 2, "method.mini_batch_size": 2, "method.ppo_epochs": 1,
        "method.max_new_tokens": 6, "training.max_steps": 2, "training.learning_rate": 1e-4,
        "output_dir": str(out),
    })
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and summary["global_step"] == 2
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert rows[1]["kl_coef"] < 0.2  # KL far below the target of 6: β decreased
    assert all(-10 < r["reward_mean"] < 10 and r["response_len"] >= 1 for r in rows)
    assert (out / "model" / "adapter_model.safetensors").is_file()
