"""Compiled decoder layers train the same model as eager ones, and fall back to eager on failure.

On a GPU the layers compile with Inductor; here, on a CPU, the same tracing (Dynamo, AOTAutograd
with our fused LoRA, norm and MLP functions inside) runs through the "aot_eager" backend.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tuneforge.fast import recompute
from tuneforge.fast.compiled import compile_layers
from tuneforge.fast.path import enable
from tuneforge.train.loss import loss_sum


def _lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; a non-zero B makes the test see the LoRA term
            torch.nn.init.normal_(p, std=0.1)
    enable(model, varlen=False)
    return model


def _step(model, batch):
    model.zero_grad()
    loss = loss_sum(model, batch, enable(model, varlen=False))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch(seed: int, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (1, length), generator=g)
    return {"input_ids": ids, "position_ids": torch.arange(length)[None], "labels": ids.clone()}


def _assert_trains_alike(eager, compiled, cases) -> None:
    """A step on each (seed, length) batch: the compiled model, without falling back to eager,
    gives the eager loss and gradients."""
    for seed, length in cases:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            want, got = _step(eager, _batch(seed, length)), _step(compiled, _batch(seed, length))
        assert not [w for w in seen if "running them eagerly" in str(w.message)], [str(w.message) for w in seen]
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for name, g in want[1].items():
            torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recomputed", [False, True])
def test_compiled_layers_give_the_eager_loss_and_gradients(recomputed):
    eager = _lora_llama()
    if recomputed:  # recomputation stops a layer's second forward early, by raising
        eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = copy.deepcopy(eager)
    assert compile_layers(recompute.decoder_layers(compiled), backend="aot_eager") == 2
    _assert_trains_alike(eager, compiled, ((0, 12), (1, 12), (2, 20)))  # a new length: recompiled, still equal


def test_calls_without_gradients_run_eagerly():
    """Evaluation generates with new shapes at every token: it must not compile for each."""
    model = _lora_llama()
    calls = []

    def counting(gm, inputs):
        calls.append(1)
        return gm.forward

    compile_layers(recompute.decoder_layers(model), backend=counting)
    with torch.no_grad():
        model(input_ids=_batch(0)["input_ids"])
    model.eval()
    model(input_ids=_batch(0)["input_ids"])
    assert calls == []
    model.train()
    _step(model, _batch(0))
    assert calls  # training compiles


def test_a_compiler_failure_warns_once_and_trains_eagerly():
    eager = _lora_llama()
    compiled = copy.deepcopy(eager)

    def broken(gm, inputs):
        raise RuntimeError("no compiler here")

    compile_layers(recompute.decoder_layers(compiled), backend=broken)
    with pytest.warns(UserWarning, match="running them eagerly") as seen:
        got = [_step(compiled, _batch(seed)) for seed in (0, 1)]  # two layers, two steps: one warning
    assert len([w for w in seen if "running them eagerly" in str(w.message)]) == 1
    for seed, (loss, grads) in zip((0, 1), got, strict=True):
        want = _step(eager, _batch(seed))
        torch.testing.assert_close(loss, want[0])
        for name, g in want[1].items():
            torch.testing.assert_close(grads[name], g)


def _qlora_llama(path):
    """A 4-bit (NF4, double-quantised, as the qlora presets) LoRA Llama: 128 wide, since
    bitsandbytes quantises in blocks of 64."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
        LlamaForCausalLM(cfg).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    enable(model, varlen=False)
    model.train()
    return model


@pytest.mark.parametrize("recomputed", [False, True])
def test_4bit_layers_compile_into_one_graph_and_train_as_eager(tmp_path, recomputed):
    """QLoRA's decoder layers trace whole (bitsandbytes' dequantisation is a torch.library op): no
    graph break, one graph for every layer after the first (whose input needs no gradient), and
    the eager loss and gradients."""
    pytest.importorskip("bitsandbytes")
    torch._dynamo.reset()  # the earlier tests' graphs of the same layer code count against its cache limit
    eager, compiled = _qlora_llama(tmp_path), _qlora_llama(tmp_path)
    assert type(compiled.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs, saved = [], []  # each graph's code; the shapes its forward saves for backward

    def saves(gm, inputs):  # the forward graph's outputs beyond the layer's: what backward keeps
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        shapes = [tuple(a.meta["val"].shape) for a in outputs if isinstance(getattr(a, "meta", {}).get("val"), torch.Tensor)]
        saved.extend(s for s in shapes if all(isinstance(d, int) for d in s))  # a weight's shape is static
        return make_boxed_func(gm.forward)

    def counting(gm, inputs):  # Inductor's partitioner, without Inductor
        graphs.append("".join(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule)))
        return aot_module_simplified(gm, inputs, fw_compiler=saves, bw_compiler=lambda g, i: make_boxed_func(g.forward),
                                     partition_fn=min_cut_rematerialization_partition)

    if recomputed:
        for model in (eager, compiled):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_layers(recompute.decoder_layers(compiled), backend=counting)
    _assert_trains_alike(eager, compiled, ((0, 12), (1, 20)))
    # each graph holds a whole layer: its 7 projections dequantised in forward, and again in backward
    # where the input needs a gradient (all 7 from the second layer on; not q/k/v in the first)
    counts = {code.count("torch.ops.bitsandbytes.dequantize_4bit.default") for code in graphs}
    assert 14 in counts and counts <= {11, 14}, counts
    # and no dense weight is kept from forward to backward (the point of 4-bit weights)
    weights = {tuple(m.weight.quant_state.shape) for m in compiled.modules() if type(m).__name__ == "Linear4bit"}
    assert saved and not weights & set(saved), weights & set(saved)
    assert len(graphs) <= 4  # 2 first-layer / other-layer graphs; a new length may add one dynamic each
