from __future__ import annotations

import torch

from tuneforge.models import load


def test_a_full_fine_tune_keeps_fp32_master_weights_and_computes_in_bf16(bf16_gpu_dtypes):
    assert load.training_dtypes("auto", bf16_gpu_dtypes, "full") == (torch.float32, torch.bfloat16)


def test_adapters_deepspeed_and_an_explicit_dtype_keep_16_bit_weights(bf16_gpu_dtypes):
    assert load.training_dtypes("auto", bf16_gpu_dtypes, "lora") == (torch.bfloat16, None)
    assert load.training_dtypes("auto", bf16_gpu_dtypes, "qlora") == (torch.bfloat16, None)
    # DeepSpeed keeps its own fp32 master copy of 16-bit weights
    assert load.training_dtypes("auto", bf16_gpu_dtypes, "full", master_weights_elsewhere=True) == (torch.bfloat16, None)
    assert load.training_dtypes("bfloat16", bf16_gpu_dtypes, "full") == (torch.bfloat16, None)
