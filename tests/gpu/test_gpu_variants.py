"""LoftQ, which peft computes on a GPU only: on the 4-bit model, each adapter starts as the best
rank-r fit of what 4-bit rounding took from the full-precision weight, and the run's adapter
converts to a plain LoRA of twice the rank for the original base."""

from __future__ import annotations

import json

import torch

from gpu.gpu_support import packed_rows, set_up


def test_loftq_starts_each_adapter_at_the_best_fit_of_the_quantization_error(gpu_model_dir, tmp_path):
    import bitsandbytes.functional as bnbf
    from peft.tuners.lora import Linear4bit
    from safetensors.torch import load_file

    from tuneforge.convert.pth_to_hf import convert_checkpoint

    rows = packed_rows(3, 256, alphabet=64)
    # alpha / r = 0.5: a start that ignored the LoRA scaling would be half the fit (peft issue #1982)
    recipe = set_up(gpu_model_dir, tmp_path / "w", rows, method="qlora", lora_variant="loftq", lora_r=16,
                    lora_alpha=8, save_last=True)
    full = load_file(str(gpu_model_dir / "model.safetensors"))
    checked = 0
    for name, module in recipe.model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        w = full[name.removeprefix("base_model.model.") + ".weight"].cuda().float()
        q = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        s = module.scaling["default"]
        start = s * module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
        error = torch.linalg.svdvals(w - q)
        best = error[16:].square().sum().sqrt()  # what the best rank-16 fit leaves (Eckart-Young)
        left = torch.linalg.matrix_norm(w - q - start)
        assert left <= best * 1.001 + 1e-4, (name, left.item(), best.item())
        assert left < torch.linalg.matrix_norm(w - q)  # closer to the full-precision weight than plain QLoRA
        checked += 1
    assert checked == 8 * 7
    last = recipe.train()
    adapter = convert_checkpoint(last, tmp_path / "hf", fp32=True)
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["r"] == 32 and written["lora_alpha"] == 16 and written["init_lora_weights"] is True
