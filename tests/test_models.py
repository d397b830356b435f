"""Models: loading, LoRA, the adapter-disabled reference, response-position logits, saving and reloading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from safeft import losses
from safeft.config import DatasetSpec, LoraConfig, ModelConfig
from safeft.data import Collator, tokenize_rows
from safeft.errors import ModelLoadError
from safeft.models import frozen_copy, is_peft, load_model, reference_mode, save_model


def _batch(tokenizer):
    rows = [{"prompt": "Say hi.", "response": "Hi there, friend."}, {"prompt": "Count to three, please.", "response": "1, 2, 3."}]
    return Collator(tokenizer.pad_token_id)(tokenize_rows(rows, tokenizer, DatasetSpec(path="x"), 64))


def test_load_lora_and_full(tiny_model_dir):
    lora, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    assert is_peft(lora) and tok.chat_template
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    full, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=False)))
    assert not is_peft(full) and all(p.requires_grad for p in full.parameters())
    bf16, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16", lora=LoraConfig(enabled=False)))
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_unreadable_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="model.name_or_path: .*is not a directory"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "empty")))


def test_pickle_only_weights_are_refused(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="model.allow_pickle"):
        load_model(ModelConfig(name_or_path=str(d)))


def test_position_logits_equal_the_models_own_logits(tiny_model_dir, tokenizer):
    model, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=False)))
    batch = _batch(tokenizer)
    pos = losses.response_positions(batch["labels"])
    with torch.no_grad():
        hidden, _ = losses.position_hidden(model, batch, pos)
        ours = losses.lm_head(model)(hidden)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][pos.mask]
    assert ours.shape == (pos.n, len(tokenizer)) and torch.allclose(ours, full, atol=1e-5)


def test_reference_mode_disables_the_adapter_and_restores_training(tiny_model_dir, tokenizer):
    model, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    base = frozen_copy(model.get_base_model())  # LoRA B starts at zero: the base equals the start
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    model.train()
    batch = _batch(tokenizer)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with reference_mode(model) as ref:
        out = ref(**kw).logits
        assert not torch.is_grad_enabled() and not ref.training
    assert model.training and torch.is_grad_enabled()
    assert torch.allclose(out, base(**kw).logits, atol=1e-5)
    assert not torch.allclose(out, model(**kw).logits, atol=1e-3)
    assert all(not p.requires_grad for p in base.parameters())


def test_saved_lora_reloads_with_plain_transformers_and_peft(tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel

    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    out = save_model(model, tok, tmp_path / "model", merge=True)
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    batch = _batch(tokenizer)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.eval()
    with torch.no_grad():
        expect = model(**kw).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        via_safeft, _ = load_model(ModelConfig(name_or_path=str(out)), for_training=False)
        assert torch.allclose(reloaded(**kw).logits, expect, atol=1e-5)
        assert torch.allclose(merged(**kw).logits, expect, atol=1e-4)
        assert torch.allclose(via_safeft.eval()(**kw).logits, expect, atol=1e-5)
    assert list((out / "merged").glob("*.safetensors"))


def test_saved_full_model_reloads(tiny_model_dir, tokenizer, tmp_path):
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=False)))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.1)
    out = save_model(model, tok, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert not list(tmp_path.glob(".m-*"))  # the temp dir was renamed, not left behind
