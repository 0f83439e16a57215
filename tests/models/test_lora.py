"""LoRA targets: XTuner's InternLM2 module names reach the Llama modules tuneforge loads."""

from __future__ import annotations

from tuneforge.models.lora import target_modules


def test_internlm2_module_names_become_llamas():
    assert target_modules(["wqkv", "wo", "w1", "w2", "w3", "output"]) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj", "lm_head"]
    assert target_modules("wqkv") == ["q_proj", "k_proj", "v_proj"]


def test_other_names_pass_through():
    assert target_modules("all-linear") == "all-linear"
    assert target_modules(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
