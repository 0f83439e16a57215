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


def test_a_tied_head_is_not_adapted_an_untied_one_is(tiny_model_dir, tmp_path, capsys):
    import torch
    from conftest import tiny_config
    from internlm2_checkpoint import make_internlm2

    from tuneforge.models.load import load_model
    from tuneforge.models.lora import apply_lora

    targets = ["q_proj", "v_proj", "lm_head"]
    for path, adapted in ((tiny_model_dir, False), (make_internlm2(tmp_path / "il2"), True)):
        model = load_model(path, torch.device("cpu"), torch.float32)
        peft_model = apply_lora(model, tiny_config(path, path / "config.json", lora_target_modules=targets))
        names = {n for n, _ in peft_model.named_modules()}
        assert any(n.endswith("lm_head.lora_A") for n in names) is adapted
        assert any(n.endswith("q_proj.lora_A") for n in names)
    assert "tied to the input embeddings" in capsys.readouterr().out
