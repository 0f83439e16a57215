"""The fast path trains the same model as the plain one, and keeps packed samples apart."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tuneforge.data.batching import collate, cu_seqlens, varlen_kwargs
from tuneforge.fast import attention, recompute
from tuneforge.fast.path import FastPath, enable
from tuneforge.train.loss import loss_sum
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import train


def _losses(work_dir) -> list[float]:
    lines = (work_dir / "train_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _curve(model_dir, data, work, method: str, fast: bool) -> list[float]:
    """The losses of 50 steps of one row each, dtype 'auto' (as the presets train)."""
    cfg = tiny_config(model_dir, data, method=method, max_steps=50, save_steps=100, batch_size=1,
                      accumulative_counts=1, lr=1e-2 if method != "full" else 2e-3, fast_path=fast, dtype="auto")
    train(cfg, work, RunOptions(progress=False))
    return _losses(work)


def _same_in_fp32(plain: list[float], fast: list[float]) -> None:
    assert len(plain) == len(fast) == 50
    assert plain[-1] < plain[0] - 0.5  # the comparison is over a run that learns
    # same maths, other order of operations: equal to fp32 rounding, compounded over 50 steps
    worst = max(abs(a - b) / a for a, b in zip(plain, fast, strict=True))
    assert worst < 1e-3, (worst, plain, fast)


def _smooth(c: list[float]) -> list[float]:
    return [sum(c[i:i + 5]) / 5 for i in range(len(c) - 4)]


def _apart(a: list[float], b: list[float]) -> float:
    """The largest relative gap between two loss curves, each averaged over 5 steps."""
    return max(abs(x - y) / y for x, y in zip(_smooth(a), _smooth(b), strict=True))


@pytest.fixture
def fp32_cpu(monkeypatch):
    """The CPU as one without native bf16 matmuls, whatever this one has: 'auto' trains in fp32."""
    from tuneforge.models import load

    monkeypatch.setattr(load, "cpu_has_fast_bf16", lambda: False)
    assert load.training_dtypes("auto", torch.device("cpu"), "lora") == (torch.float32, None)


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_fifty_steps_of_the_fast_path_match_the_plain_path(tiny_model_dir, identity_data, tmp_path, fp32_cpu,
                                                            method):
    plain, fast = (_curve(tiny_model_dir, identity_data, tmp_path / str(f), method, f) for f in (False, True))
    _same_in_fp32(plain, fast)


def test_fifty_lora_steps_match_the_plain_path_in_fp32_and_under_the_auto_bf16_autocast(
        tiny_model_dir, identity_data, tmp_path, monkeypatch, capsys):
    """dtype 'auto' on a CPU: fp32 where the CPU has no native bf16 matmuls, else fp32 weights under
    bf16 autocast (forced here, so that every CPU runs both). In fp32 the fast path equals the plain
    one to rounding. Under bf16 the bounds come from bf16 itself:

    - step 1 (the same weights, the same row): the two paths round the same matmul inputs to bf16;
      the loss, a mean over the row's tokens of per-token losses that each may differ by one bf16
      rounding (relative u = 2**-8), differs by at most u whatever the number of tokens;
    - the 50-step curve: rounding differences then compound through the updates. The plain path's
      own bf16 curve moves from its fp32 one by D (measured here, on this CPU); a fast path as
      accurate in bf16 is also within about D of the fp32 curve, so within 2 D of the plain bf16
      curve (the triangle inequality): the bound is 2 D, not a number tuned to one machine.
    """
    from tuneforge.models import load

    cpu = torch.device("cpu")
    runs = {}
    for bf16 in (False, True):
        monkeypatch.setattr(load, "cpu_has_fast_bf16", lambda bf16=bf16: bf16)
        assert load.training_dtypes("auto", cpu, "lora") == (torch.float32, torch.bfloat16 if bf16 else None)
        capsys.readouterr()
        for fast in (False, True):
            runs[bf16, fast] = _curve(tiny_model_dir, identity_data, tmp_path / f"{bf16}-{fast}", "lora", fast)
        said = capsys.readouterr()
        assert (said.out + said.err).count("(torch.float32, bf16 autocast)") == (2 if bf16 else 0)
    _same_in_fp32(runs[False, False], runs[False, True])

    plain16, fast16, plain32 = runs[True, False], runs[True, True], runs[False, False]
    u = 2.0 ** -8
    assert abs(fast16[0] - plain16[0]) <= u * plain16[0], (fast16[0], plain16[0])
    d = _apart(plain16, plain32)
    assert d > 1e-5, d  # bf16 did round: more than the fp32 paths' 6-digit agreement
    assert _apart(fast16, plain16) <= 2 * d, (_apart(fast16, plain16), d, fast16, plain16)
    assert fast16[-1] < fast16[0] - 0.5  # and the bf16 run learns


def _packed_batch(tokenizer):
    from tuneforge.data.pack import Row

    lengths = [5, 9, 3]
    ids = torch.randint(5, 200, (sum(lengths),)).tolist()
    pos = [i for n in lengths for i in range(n)]
    return collate([Row(ids, ids, pos)], tokenizer.pad_token_id)


def test_varlen_attention_keeps_packed_samples_apart(tiny_model_dir, tokenizer):
    from tuneforge.models.load import load_model

    torch.manual_seed(0)
    batch = _packed_batch(tokenizer)
    dense = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    want = loss_sum(dense, batch)  # transformers' own block-diagonal mask
    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32,
                       attn_implementation=attention.register())
    fast = enable(model, varlen=True)
    got = loss_sum(model, {**batch, **varlen_kwargs(batch["position_ids"])}, fast)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and without the boundaries the samples would see each other: the test can tell
    leaky = loss_sum(model, {**batch, "position_ids": torch.arange(17)[None]}, fast)
    assert not torch.allclose(leaky, want, rtol=1e-3)


def test_cu_seqlens_from_restarting_positions():
    cu, longest = cu_seqlens(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]))
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4


def test_recompute_plan_follows_the_budget():
    mib = 1 << 20
    args = dict(n_layers=10, saved_per_token_layer=1000, hidden_size=100, tokens=1000, fixed_bytes=100 * mib)
    assert recompute.plan(**args, budget_bytes=200 * mib).recomputed == 0
    # all but the last layer recomputed: its tensors (1 MB) and the recomputed inputs (9 x 0.2 MB)
    # at the head's backward; the last layer's are freed before a recomputed one reruns, so
    # recomputing it too would not lower the peak
    most = recompute.plan(**args, budget_bytes=100 * mib + 2_800_000)
    assert most.recomputed == 9 and not most.offload and most.need_gib * (1 << 30) == 100 * mib + 2_800_000
    assert recompute.plan(**args, budget_bytes=100 * mib + 2_799_999).offload
    offloaded = recompute.plan(**args, budget_bytes=101 * mib)
    assert offloaded.recomputed == 10 and offloaded.offload
    middle = recompute.plan(**args, budget_bytes=100 * mib + 6 * 1000 * 1000)
    assert 0 < middle.recomputed < 10 and middle.need_gib * (1 << 30) <= 100 * mib + 6e6


def test_saved_bytes_are_measured_per_layer(tiny_model_dir):
    from tuneforge.models.load import load_model

    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = recompute.decoder_layers(model)
    assert len(layers) == 2
    ids = torch.randint(0, 100, (1, 64))

    def run() -> None:
        model.model(input_ids=ids, use_cache=False)

    plain = recompute.saved_bytes_per_token(model, layers, run, 64)
    enable(model, varlen=False)  # the fused norm and MLP keep less
    fused = recompute.saved_bytes_per_token(model, layers, run, 64)
    hidden = model.config.hidden_size
    assert 2 * hidden * 4 < fused < plain, (fused, plain)
    assert all(layer.gradient_checkpointing for layer in layers)  # the probe put the flags back


def test_bytes_per_token_leave_out_autocasts_weight_copies():
    """A full fine-tune keeps fp32 weights and computes in bf16: autocast saves a bf16 copy of
    each weight, once per layer whatever the length. Per token, that copy must not count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    fp32 = LlamaForCausalLM(cfg)
    bf16 = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 100, (1, 128))

    def probe(model, autocast):
        def run(n: int) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.model(input_ids=ids[:, :n], use_cache=False)
        return run

    layers32, layers16 = recompute.decoder_layers(fp32), recompute.decoder_layers(bf16)
    cast = recompute.bytes_per_token(fp32, layers32, probe(fp32, True), 128)
    native = recompute.bytes_per_token(bf16, layers16, probe(bf16, False), 128)
    # the same activations, some of them (the residual stream) in fp32
    assert native <= cast <= 1.3 * native, (cast, native)
    # a one-length probe also counts the layer's bf16 weight copies, divided by its 128 tokens
    one = recompute.saved_bytes_per_token(fp32, layers32, lambda: probe(fp32, True)(128), 128)
    weights = sum(p.numel() for p in layers32[0].parameters() if p.dim() == 2) * 2
    assert abs((one - cast) - weights / 128) < 0.1 * weights / 128, (one, cast, weights)


def test_fast_path_describes_itself():
    assert "varlen attention" in FastPath(fused=True, varlen=True).describe()
    assert "SDPA attention" in FastPath(fused=True).describe()
    assert FastPath(varlen=True).describe().startswith("plain path")  # nothing was patched


@pytest.mark.parametrize("offload", [False, True])
def test_recomputed_layers_give_the_same_gradients(tiny_model_dir, offload):
    from tuneforge.models.load import load_model

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 32))
    grads = []
    for recomputed in (0, 2):
        model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        recompute.apply(recompute.decoder_layers(model), recomputed, offload=offload)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_a_sharded_engine_holds_two_gathered_layers_in_the_compute_dtype():
    from tuneforge.fast.path import gathered_bytes

    layer = torch.nn.Linear(10, 10)  # 110 fp32 parameters
    assert gathered_bytes(layer, torch.bfloat16) == 2 * 110 * 2
    assert gathered_bytes(layer, None) == 2 * 110 * 4


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_chunked_head_trains_a_lora_on_the_head_like_peft(tiny_model_dir, tokenizer, monkeypatch, dropout):
    """XTuner's InternLM2 configs adapt the head; the chunked cross-entropy then adds the LoRA's
    update to every chunk of logits, with the gradients peft's own layer would give. (With
    dropout the two paths draw different masks, so they are compared in eval mode, and dropout
    is shown to act in training mode.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr("tuneforge.fast.cross_entropy.CHUNK_ELEMENTS", 7 * len(tokenizer))  # several chunks
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                      target_modules=["q_proj", "lm_head"]))
    fast = enable(model, varlen=False)
    assert fast.linear_ce  # the adapted head no longer turns the chunked head off
    batch = _packed_batch(tokenizer)
    head = model.base_model.model.lm_head
    head_a, head_b = head.lora_A["default"].weight, head.lora_B["default"].weight
    model.train(dropout == 0.0)

    def run(fn):
        loss = fn()
        return (loss.detach(), *torch.autograd.grad(loss, [head_a, head_b]))

    plain = run(lambda: loss_sum(model, batch, None))
    chunked = run(lambda: loss_sum(model, batch, fast))
    for want, got in zip(plain, chunked, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert chunked[2].abs().sum() > 0
    if dropout:
        model.train()
        assert not torch.allclose(run(lambda: loss_sum(model, batch, fast))[0], chunked[0])


def test_inputs_are_offloaded_where_that_saves_more_recomputation_than_it_costs():
    """With CPU memory to hold them, the recomputed layers' inputs go there when the layers it
    saves recomputing outweigh the copies (OFFLOAD_COST of a layer each); without it (host_bytes
    0), never before every layer is recomputed."""
    assert recompute.OFFLOAD_COST == 1 / 8  # the figures below assume it
    mib = 1 << 20
    args = dict(n_layers=10, saved_per_token_layer=1000, hidden_size=100, tokens=1000, fixed_bytes=100 * mib)
    # 3 MB above the fixed part: on the GPU 9 layers recomputed (their inputs, 1.8 MB, and the last
    # layer's tensors); offloaded, 7 (the 3 kept layers' tensors, 3 MB): 7 + 7/8 < 9
    budget = 100 * mib + 3_000_000
    assert recompute.plan(**args, budget_bytes=budget).recomputed == 9
    offloaded = recompute.plan(**args, budget_bytes=budget, host_bytes=10 * mib)
    assert offloaded.recomputed == 7 and offloaded.offload
    assert offloaded.need_gib * (1 << 30) == 100 * mib + 3_000_000
    # too little CPU memory for 7 inputs (1.4 MB): as without
    assert not recompute.plan(**args, budget_bytes=budget, host_bytes=1_000_000).offload
    # 2.8 MB: 9 on the GPU, or 8 offloaded at the same cost (8 + 1): the inputs stay on the GPU
    tie = recompute.plan(**args, budget_bytes=100 * mib + 2_800_000, host_bytes=10 * mib)
    assert tie.recomputed == 9 and not tie.offload
    # where everything fits, nothing is recomputed or offloaded
    assert recompute.plan(**args, budget_bytes=200 * mib, host_bytes=10 * mib).recomputed == 0


def test_a_forward_without_backward_leaves_no_offloaded_graph_alive(tiny_model_dir):
    """The chain the offloaded layers share holds weak references: a forward no backward follows
    leaves nothing alive."""
    import gc
    import weakref

    from tuneforge.models.load import load_model

    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    layers = recompute.decoder_layers(model)
    recompute.apply(layers, len(layers), offload=True)
    chain = layers[0]._gradient_checkpointing_func.__closure__[0].cell_contents
    loss = model(input_ids=torch.randint(0, 100, (1, 16))).logits.sum()
    assert len(chain.saved) == len(layers)
    node = weakref.ref(next(iter(chain.saved.values()))())
    del loss
    gc.collect()
    assert node() is None


def test_host_buffers_are_exact_sized_kept_and_grown_only_when_a_longer_input_comes(monkeypatch):
    """The offloaded inputs' CPU memory: one buffer per layer of exactly the bytes its input
    needs (torch's pinned allocator would round 3 GiB up to 4), the same buffer step after step,
    a new one only for a longer input (the old one released first). Pinning itself needs a GPU
    (tests/gpu); here the registration is stood in for."""
    released = []
    host = recompute.HostBuffers()
    monkeypatch.setattr(host, "_pinned", lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(host, "_release", lambda buf: released.append(buf.numel()))
    x = torch.randn(1, 300, 64, dtype=torch.bfloat16)
    a = host.get(0, x)
    assert a.shape == x.shape and a.dtype == x.dtype and host.buffers[0].numel() == 300 * 64 * 2
    assert host.get(0, x).data_ptr() == a.data_ptr()  # kept
    shorter = host.get(0, x[:, :100])
    assert shorter.shape == (1, 100, 64) and shorter.data_ptr() == a.data_ptr() and not released
    longer = host.get(0, torch.randn(1, 500, 64, dtype=torch.bfloat16))
    assert released == [300 * 64 * 2] and host.buffers[0].numel() == 500 * 64 * 2
    assert longer.shape == (1, 500, 64)
    assert host.get(1, x).data_ptr() != host.buffers[0].data_ptr()  # one per layer
