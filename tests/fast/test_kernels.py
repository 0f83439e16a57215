"""Each fused function computes what the plain modules compute: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge.data.encode import IGNORE
from tuneforge.fast.cross_entropy import (
    LinearCrossEntropyFunction,
    linear_cross_entropy,
    linear_token_logps,
)
from tuneforge.fast.lora import fuse_lora
from tuneforge.fast.mlp import SwiGLUFunction
from tuneforge.fast.norm import fuse_rmsnorm


def _lora_model(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.SiLU(), torch.nn.Linear(24, 8, bias=False))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; a non-zero B makes the test see the LoRA term
            torch.nn.init.normal_(p)
    return model


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_matches_peft_values_and_gradients():
    model = _lora_model()
    x = torch.randn(2, 5, 16)
    want = _grads(model, x)
    assert fuse_lora(model) == 2
    got = _grads(model, x)
    # fp32 rounding scales with the terms summed, not with each result: an adapter gradient of
    # ~1,200 has elements near 1 that differ by 1e-4 with another summation order (AVX512 kernels),
    # 1e-7 of the tensor's scale; a wrong term is off by the scale itself
    for g, w in [(got[0], want[0]), (got[1], want[1])] + [(got[2][n], want[2][n]) for n in want[2]]:
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_fused_lora_under_bf16_autocast_keeps_fp32_adapter_gradients():
    """The adapters are fp32 and the matmuls bf16: the cast copies saved for backward and the
    scaling folded into the GEMMs must give the exact (fp32) gradients to bf16 precision, in the
    adapters' own dtype."""
    model = _lora_model()
    x = torch.randn(2, 5, 16)
    exact = _grads(model, x)
    fuse_lora(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(model, x)

    def off(a, b):
        return float((a.float() - b).norm() / b.norm())

    for name, g in exact[2].items():
        assert got[2][name].dtype == torch.float32
        assert off(got[2][name], g) < 2e-2, name
    assert off(got[1], exact[1]) < 2e-2


def test_fused_lora_dropout_gradient_uses_the_same_mask():
    model = _lora_model(dropout=0.5)
    fuse_lora(model)
    layer = model.base_model.model[0]
    x = torch.randn(3, 16, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    y.sum().backward()
    torch.manual_seed(1)
    keep = torch.rand_like(x) >= 0.5
    x2 = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = layer.base_layer(x2) + (x2 * keep / 0.5) @ a.t() @ b.t() * layer.scaling["default"]
    torch.testing.assert_close(y, ref)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_fused_lora_falls_back_when_adapters_are_disabled():
    model = _lora_model()
    x = torch.randn(4, 16)
    with model.disable_adapter():
        plain = model(x)
    fuse_lora(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), plain)


@pytest.mark.parametrize("head_trains", [False, True])
def test_linear_cross_entropy_matches_full_logits(head_trains, monkeypatch):
    monkeypatch.setattr("tuneforge.fast.cross_entropy.CHUNK_ELEMENTS", 50 * 7)  # several chunks
    torch.manual_seed(0)
    h = torch.randn(23, 12, requires_grad=True)
    w = torch.randn(50, 12, requires_grad=head_trains)
    t = torch.randint(0, 50, (23,))
    t[::4] = IGNORE
    want = F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE, reduction="sum")
    gh, *gw = torch.autograd.grad(want * 0.5, [h] + ([w] if head_trains else []))
    h2 = h.detach().clone().requires_grad_(True)
    got = linear_cross_entropy(h2, w, t)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-4)
    g2 = torch.autograd.grad(got * 0.5, [h2] + ([w] if head_trains else []))
    torch.testing.assert_close(g2[0], gh, rtol=1e-4, atol=1e-5)
    if head_trains:
        torch.testing.assert_close(g2[1], gw[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["frozen", "trains", "lora"])
def test_linear_token_logps_match_full_logits_with_a_weight_per_token(head, monkeypatch):
    """The preference losses' per-token log-probabilities by chunks: values, and gradients under
    an upstream gradient that differs per token (each answer's own), as log_softmax of the whole
    logits gives them; for the head's weight and for a LoRA on the head too."""
    monkeypatch.setattr("tuneforge.fast.cross_entropy.CHUNK_ELEMENTS", 50 * 7)  # several chunks
    torch.manual_seed(0)
    h = torch.randn(23, 12, requires_grad=True)
    w = torch.randn(50, 12, requires_grad=head == "trains")
    a, b = torch.randn(4, 12, requires_grad=True), torch.randn(50, 4, requires_grad=True)
    t = torch.randint(0, 50, (23,))
    upstream = torch.randn(23)
    params = [h] + ([w] if head == "trains" else []) + ([a, b] if head == "lora" else [])

    def logits_of(x):
        return x @ w.t() + (0.5 * (x @ a.t()) @ b.t() if head == "lora" else 0)
    want = torch.log_softmax(logits_of(h), dim=-1).gather(1, t[:, None]).squeeze(1)
    grads = torch.autograd.grad((want * upstream).sum(), params)
    h2 = h.detach().clone().requires_grad_(True)
    got = linear_token_logps(h2, w, t, (h2 @ a.t(), b, 0.5) if head == "lora" else None)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad((got * upstream).sum(), [h2] + params[1:])
    for g, expected in zip(got_grads, grads, strict=True):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)


def test_linear_cross_entropy_all_ignored_is_zero():
    h = torch.randn(4, 8, requires_grad=True)
    loss = LinearCrossEntropyFunction.apply(h, torch.randn(10, 8), torch.full((4,), IGNORE), torch.float32)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_matches_llama(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 32, dtype=dtype)
    want = _grads(norm, x)
    assert fuse_rmsnorm(norm) == 1
    got = _grads(norm, x)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in [(got[0], want[0]), (got[1], want[1]), (got[2]["weight"], want[2]["weight"])]:
        torch.testing.assert_close(a, b, **tol)


def test_swiglu_gradient():
    g = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (g, u))


def test_dense_4bit_weights_dequantise_once_and_give_the_same_numbers(monkeypatch):
    """The evaluation hook on a CPU generates hundreds of tokens with a 4-bit model: inside
    dense_4bit_weights each weight is dequantised once, with unchanged results."""
    import bitsandbytes as bnb  # a hard dependency (QLoRA), on every machine
    import bitsandbytes.functional as bnbf

    from tuneforge.fast.lora import base_weight, dense_4bit_weights

    layer = bnb.nn.Linear4bit(16, 8, bias=False, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(8, 16)})
    layer = layer.to("cpu")
    w = layer.weight
    assert getattr(w, "quant_state", None) is not None  # quantised on the CPU, as QLoRA there needs
    calls = []
    real = bnbf.dequantize_4bit
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = [base_weight(w, torch.float32) for _ in range(3)]
    assert len(calls) == 3
    calls.clear()
    with dense_4bit_weights():
        cached = [base_weight(w, torch.float32) for _ in range(3)]
    assert len(calls) == 1
    assert all(torch.equal(c, plain[0]) for c in cached)
    calls.clear()
    base_weight(w, torch.float32)  # outside the block: no cache kept
    assert len(calls) == 1


@pytest.mark.parametrize("four_bit", [False, True])
def test_generating_inside_dense_4bit_weights_uses_one_merged_matmul_with_the_same_outputs(tiny_model_dir, four_bit):
    """In the evaluation hook a LoRA layer runs as the merged model would (W + s B A, made once
    per evaluation): the logits are those of the unmerged fused layers, and an update to the
    adapter between two evaluations is seen by the second."""
    from conftest import tiny_config

    from tuneforge.fast.lora import dense_4bit_weights
    from tuneforge.models.load import load_model
    from tuneforge.models.lora import apply_lora

    torch.manual_seed(0)
    cfg = tiny_config(tiny_model_dir, "d.jsonl", method="qlora" if four_bit else "lora", lora_dropout=0.0)
    model = apply_lora(load_model(tiny_model_dir, torch.device("cpu"), torch.float32, load_in_4bit=four_bit), cfg)
    assert fuse_lora(model) > 0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter, not peft's zero init
    model.eval()
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with dense_4bit_weights():
            merged = model(input_ids=ids).logits
            again = model(input_ids=ids).logits  # from the cache
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, merged)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(2)
        with dense_4bit_weights():
            moved = model(input_ids=ids).logits
        torch.testing.assert_close(moved, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(moved, merged, atol=1e-3)
