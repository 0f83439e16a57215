"""LoRA adapters between InternLM2's layouts: an XTuner-style adapter on wqkv applies to the
natively loaded model exactly, and tuneforge's adapter written for the remote-code model makes
the same weight update."""

from __future__ import annotations

import json

import pytest
import torch
from internlm2_checkpoint import make_internlm2, read_state

from tuneforge.models import internlm2
from tuneforge.models.adapters import (
    PREFIX,
    attach_adapter,
    read_adapter,
    to_llama_layout,
    to_original_layout,
    write_adapter,
)
from tuneforge.models.load import load_model

R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_internlm2(tmp_path_factory.mktemp("il2-base"))


def _native(path):
    return load_model(path, torch.device("cpu"), torch.float32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _original_adapter(config, seed=0):
    """An adapter as XTuner writes one for the remote-code model: LoRA on wqkv, wo, w1, w2, w3."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv, groups, d = internlm2._groups(config)
    shapes = {"attention.wqkv": (hidden, kv * (groups + 2) * d), "attention.wo": (hidden, hidden),
              "feed_forward.w1": (hidden, inter), "feed_forward.w3": (hidden, inter),
              "feed_forward.w2": (inter, hidden)}
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (n_in, n_out) in shapes.items():
            stem = f"{PREFIX}model.layers.{layer}.{module}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(R, n_in, generator=g) * 0.1
            tensors[f"{stem}.lora_B.weight"] = torch.randn(n_out, R, generator=g) * 0.1
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA,
                   "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                   "target_modules": ["wqkv", "wo", "w1", "w2", "w3"], "base_model_name_or_path": None}
    return tensors, peft_config


def _merged_by_hand(state, tensors, config, scale_of):
    """STATE (original names) plus every LoRA's B @ A * scale, in the original layout."""
    out = dict(state)
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key[len(PREFIX):].replace(".lora_A.weight", "")
        b = tensors[key.replace("lora_A", "lora_B")]
        out[module + ".weight"] = out[module + ".weight"] + (b @ a) * scale_of(module)
    return out


def test_an_original_layout_adapter_applies_exactly_to_the_native_model(base, tmp_path):
    config = json.loads((base / "config.json").read_text())
    tensors, peft_config = _original_adapter(config)
    write_adapter(tmp_path / "xtuner_adapter", tensors, peft_config)

    # what the remote-code model with this adapter merged computes, loaded natively
    merged = _merged_by_hand(read_state(base), tensors, config, lambda m: ALPHA / R)
    want_dir = make_internlm2(tmp_path / "want", tokenizer_from=base)
    from safetensors.torch import save_file
    save_file(merged, str(want_dir / "model.safetensors"))

    ids = torch.randint(3, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    got = _logits(attach_adapter(_native(base), tmp_path / "xtuner_adapter", base), ids)
    torch.testing.assert_close(got, _logits(_native(want_dir), ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _logits(_native(base), ids), atol=1e-3)  # the adapter does something


def test_tuneforges_adapter_in_the_original_layout_makes_the_same_update(base, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = json.loads((base / "config.json").read_text())
    torch.manual_seed(0)
    model = get_peft_model(_native(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                      init_lora_weights=False))
    model.save_pretrained(tmp_path / "llama_adapter")
    merged = internlm2.to_internlm2(model.merge_and_unload().state_dict(), config)

    tensors, peft_config = read_adapter(tmp_path / "llama_adapter")
    fused, fused_config = to_original_layout(tensors, peft_config, config)
    assert "wqkv" in fused_config["target_modules"] and "q_proj" not in fused_config["target_modules"]
    assert fused_config["rank_pattern"] == {"wqkv": 3 * R}

    def scale(module):
        if module.endswith("wqkv"):
            return fused_config["alpha_pattern"]["wqkv"] / fused_config["rank_pattern"]["wqkv"]
        return ALPHA / R

    by_hand = _merged_by_hand(read_state(base), fused, config, scale)
    for name, tensor in by_hand.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-5, msg=name)

    # and back: the fused adapter applied to the native model gives the Llama adapter's logits
    write_adapter(tmp_path / "fused", fused, fused_config)
    ids = torch.randint(3, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(2))
    back = attach_adapter(_native(base), tmp_path / "fused", base)
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_llama_to_original_and_back_restores_the_adapter(base, tmp_path):
    config = json.loads((base / "config.json").read_text())
    tensors, peft_config = _original_adapter(config, seed=3)
    llama, llama_config = to_llama_layout(tensors, peft_config, config)
    assert sorted(llama_config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                      "q_proj", "up_proj", "v_proj"]
    again, _ = to_original_layout(llama, llama_config, config)
    # wqkv comes back with rank 3r (three copies of A); its update B @ A is the same
    for key in tensors:
        if ".lora_A." in key and ".wqkv." in key:
            b_key = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(again[b_key] @ again[key], tensors[b_key] @ tensors[key])
        elif ".wqkv." not in key:
            assert torch.equal(again[key], tensors[key])
