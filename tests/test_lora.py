"""LoRA (lora.py): starts as the base model, merges exactly, saves/loads as an
adapter, switches off for the DPO reference; dpo.py trains with it."""
import json
import math

import torch

import dpo
import lora
import model as model_lib
from tests.test_sft_dpo import args, log, toy_prefs  # noqa: F401  (fixture)
from tests.tiny import random_model, tiny_ckpt

IDS = torch.tensor([[5, 9, 40, 7, 3, 11], [8, 8, 2, 60, 1, 4]])


def trained_lora(seed=0):
    m = lora.add_lora(random_model(seed), rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for mod in lora.lora_modules(m):
            mod.lora_B.weight.normal_(0, 0.05)  # as if trained: B is no longer zero
    return m


def test_lora_starts_at_base_and_only_adapters_train():
    base = random_model(0)
    ref = base(IDS)
    m = lora.add_lora(base, rank=4, alpha=8)
    assert torch.equal(m(IDS), ref)  # B = 0
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora.lora_modules(m)) == 7 * 2  # every projection of both layers


def test_merge_equals_adapter_and_disabled_equals_base():
    base_out = random_model(0)(IDS)
    m = trained_lora()
    with_adapter = m(IDS)
    assert not torch.allclose(with_adapter, base_out, atol=1e-4)
    with lora.lora_disabled(m):
        assert torch.allclose(m(IDS), base_out, atol=1e-6)
    merged = lora.merge_lora(m)
    assert not lora.lora_modules(merged)
    assert torch.allclose(merged(IDS), with_adapter, atol=1e-5)
    assert set(merged.state_dict()) == set(random_model(0).state_dict())


def test_adapter_save_load_roundtrip_peft_layout(tmp_path):
    m = trained_lora()
    lora.save_adapter(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors.torch import load_file
    names = list(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    loaded = lora.load_adapter(random_model(0), tmp_path / "ad")
    assert torch.allclose(loaded(IDS), m(IDS), atol=1e-6)


def test_dpo_with_lora_reference_is_base_model(toy_prefs, tmp_path):  # noqa: F811
    ckpt = str(tiny_ckpt(tmp_path / "m"))
    dpo.main(args(ckpt, toy_prefs, tmp_path / "run", "--max-steps", 6, "--lr", 1e-2, "--lora-rank", 4,
                  "--ref", "model", "--save-adapter"))
    rows = log(tmp_path / "run")
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5 and rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    out = tmp_path / "run"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    reloaded = lora.load_adapter(model_lib.load_model(ckpt), out)
    assert lora.lora_modules(reloaded)
