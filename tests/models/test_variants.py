"""The LoRA family through peft: each variant trains, and the adapter `convert pth_to_hf` writes
merges onto the ORIGINAL base into the model that was trained (PiSSA and OLoRA train on a base
they changed); the fast path fuses the plain-LoRA layers and leaves DoRA's to peft; LoRA+ gives
the B matrices ratio x lr; a regex picks modules as peft reads it; bad combinations are one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tuneforge.convert.merge import merge_adapter
from tuneforge.convert.pth_to_hf import convert_checkpoint
from tuneforge.errors import UserError
from tuneforge.models.load import load_model
from tuneforge.models.lora import apply_lora
from tuneforge.train.checkpoint import load_checkpoint
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import Recipe, train

IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 7]])
CPU = torch.device("cpu")


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _losses(work):
    rows = map(json.loads, (work / "train_log.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


def _speeds(work):
    rows = map(json.loads, (work / "train_log.jsonl").read_text().splitlines())
    return [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]


def _peft(base_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(adapter))


def _as_trained(cfg, ckpt):
    """The model the run trained, rebuilt: the base with the variant's own start (PiSSA/OLoRA
    change the base weights there) and the checkpoint's adapter weights."""
    model = apply_lora(load_model(cfg.pretrained_model_name_or_path, CPU, torch.float32), cfg)
    model.load_state_dict(ckpt.state_dict, strict=False)
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tuneforge.data.selfcog import write_self_cognition

    path = tmp_path_factory.mktemp("variants") / "id.jsonl"
    write_self_cognition(path, "龙", "Long")
    return path


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "pissa", "olora"])
def test_a_variant_trains_and_merges_onto_the_original_base_into_the_trained_model(
        variant, tiny_model_dir, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_model_dir, data, lora_variant=variant, max_steps=8, save_steps=8, lr=1e-2,
                      dtype="float32", prompt_template="llama3_chat")
    last = train(cfg, tmp_path / "work", RunOptions(progress=False))
    said = capsys.readouterr().out
    losses = _losses(tmp_path / "work")
    assert losses[-1] < losses[0] - 0.3, losses

    # the fast path: plain LoRA layers fused (rsLoRA, PiSSA, OLoRA are plain LoRA layers once
    # started), DoRA's left to peft with a line saying so
    line = next(s for s in said.splitlines() if "fast path:" in s)
    if variant == "dora":
        assert "fused LoRA x0" in line and "peft's own DoRA x14" in line
        assert "DoRA: 14 LoRA layers run peft's own forward" in said
    else:
        assert "fused LoRA x14" in line and "peft's own" not in line

    adapter = convert_checkpoint(last, tmp_path / "hf", fp32=True)
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True  # a standard LoRA: loading it changes no base weight
    assert written["r"] == (16 if variant in ("pissa", "olora") else 8)
    assert written["use_dora"] is (variant == "dora") and written["use_rslora"] is (variant == "rslora")
    merged = merge_adapter(str(tiny_model_dir), adapter, tmp_path / "merged")

    plain = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    with_adapter = _logits(_peft(tiny_model_dir, adapter))
    trained = _logits(_as_trained(cfg, load_checkpoint(last)))
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    moved = (trained - base).abs().max().item()
    vs_adapter, vs_trained = (plain - with_adapter).abs().max().item(), (plain - trained).abs().max().item()
    print(f"{variant}: merged vs base+adapter {vs_adapter:.2e}, vs the trained model {vs_trained:.2e}, "
          f"training moved the logits by {moved:.2f}")
    assert moved > 0.1
    torch.testing.assert_close(plain, with_adapter, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["rslora", "pissa", "olora"])
def test_the_fused_layers_compute_what_peft_computes_for_the_variants_that_are_plain_lora(variant, tiny_model_dir,
                                                                                       data):
    from tuneforge.fast.lora import fuse_lora

    cfg = tiny_config(tiny_model_dir, data, lora_variant=variant, lora_alpha=4)
    losses, grads = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = apply_lora(load_model(tiny_model_dir, CPU, torch.float32), cfg)
        for n, p in model.named_parameters():  # B away from zero, so the scaling shows
            if "lora_B" in n:
                p.data += 0.05 * torch.randn_like(p)
        if fused:
            assert fuse_lora(model) == 14
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6)


def test_lora_plus_gives_the_b_matrices_ratio_times_lr(tiny_model_dir, data, tmp_path):
    cfg = tiny_config(tiny_model_dir, data, lora_plus_ratio=16.0, lr=1e-3, lora_variant="dora")
    recipe = Recipe(cfg, tmp_path / "work", RunOptions(progress=False))
    recipe.setup()
    ids = {id(p): n for n, p in recipe.model.named_parameters()}
    groups = [(g["lr"], {ids[id(p)] for p in g["params"]}) for g in recipe.optimizer.param_groups]
    (slow_lr, slow), (fast_lr, fast) = groups
    assert slow_lr == pytest.approx(1e-3) and fast_lr == pytest.approx(16e-3)
    assert slow and all(".lora_A." in n for n in slow)
    # peft's create_loraplus_optimizer puts the B matrices and vectors (DoRA's magnitudes) there
    assert {n.split(".")[-3] for n in fast} == {"lora_B", "lora_magnitude_vector"}
    assert len(slow) + len(fast) == len(recipe.named)
    last = recipe.train()
    losses = _losses(tmp_path / "work")
    assert losses[-1] < losses[0]
    assert last is not None


def test_a_lora_plus_pissa_run_resumed_ends_where_the_straight_run_ends(tiny_model_dir, data, tmp_path):
    """Bit for bit: the two groups' state and learning rates come back from the checkpoint, and
    PiSSA starts the base the same way again (its start is kept for converting)."""
    cfg = tiny_config(tiny_model_dir, data, lora_plus_ratio=8.0, lora_variant="pissa", max_steps=4, save_steps=2,
                      dtype="float32")
    straight = load_checkpoint(train(cfg, tmp_path / "a", RunOptions(progress=False)))
    train(cfg, tmp_path / "b", RunOptions(progress=False))
    (tmp_path / "b" / "iter_4.pth").unlink()
    resumed = load_checkpoint(train(cfg, tmp_path / "b", RunOptions(resume=str(tmp_path / "b" / "iter_2.pth"),
                                                                    progress=False)))
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    assert [g["lr"] for g in resumed.optimizer["param_groups"]] == \
        [g["lr"] for g in straight.optimizer["param_groups"]]
    for name, weight in straight.state_dict.items():
        assert torch.equal(resumed.state_dict[name], weight), name
    assert straight.initial_adapter.keys() == resumed.initial_adapter.keys()
    assert all(torch.equal(resumed.initial_adapter[k], v) for k, v in straight.initial_adapter.items())


def test_a_regex_target_picks_the_modules_whose_whole_name_matches(tiny_model_dir, data):
    cfg = tiny_config(tiny_model_dir, data, lora_target_modules=r".*\.layers\.0\.self_attn\.(q|v)_proj")
    model = apply_lora(load_model(tiny_model_dir, CPU, torch.float32), cfg)
    adapted = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                     for n, _ in model.named_modules() if n.endswith(".lora_A"))
    assert adapted == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_a_regex_on_a_tied_head_leaves_the_head_alone(tiny_model_dir, data, capsys):
    cfg = tiny_config(tiny_model_dir, data, lora_target_modules=r"lm_head|.*\.o_proj")
    model = apply_lora(load_model(tiny_model_dir, CPU, torch.float32), cfg)
    adapted = {n for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == 2 and not any("lm_head" in n for n in adapted)
    assert "tied to the input embeddings" in capsys.readouterr().out


def test_a_target_that_matches_nothing_says_how_targets_are_read(tiny_model_dir, data):
    cfg = tiny_config(tiny_model_dir, data, lora_target_modules="q_proj")  # a regex: whole names only
    with pytest.raises(UserError, match=r"lora_target_modules 'q_proj': Target modules q_proj not found.*"
                                        r"a string is a regex that must match a module's whole name"):
        apply_lora(load_model(tiny_model_dir, CPU, torch.float32), cfg)


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "qlora", "lora_variant": "pissa"}, "lora_variant='pissa' needs the base weights unquantized"),
    ({"lora_variant": "loftq"}, "lora_variant='loftq' .* it needs method='qlora'"),
    ({"method": "full", "lora_variant": "dora"}, "lora_variant='dora' applies to method='lora' or 'qlora'"),
    ({"method": "full", "lora_plus_ratio": 16}, "lora_plus_ratio applies to method='lora' or 'qlora'"),
    ({"lora_plus_ratio": 0}, "lora_plus_ratio"),
    ({"lora_variant": "vera"}, "lora_variant"),
    ({"objective": "dpo", "lora_variant": "pissa"}, "objective='dpo' compares with the model with its adapters off"),
    ({"lora_target_modules": "(q_proj"}, r"lora_target_modules '\(q_proj' is not a valid regex"),
])
def test_bad_combinations_are_one_clear_line(tiny_model_dir, data, settings, message):
    with pytest.raises(UserError, match=message) as err:
        tiny_config(tiny_model_dir, data, **settings)
    assert "\n" not in str(err.value).strip()


def test_loftq_on_a_cpu_is_one_clear_line(tiny_model_dir, data, tmp_path):
    cfg = tiny_config(tiny_model_dir, data, method="qlora", lora_variant="loftq")
    with pytest.raises(UserError, match="lora_variant='loftq' needs a CUDA GPU"):
        Recipe(cfg, tmp_path / "work", RunOptions(progress=False)).setup()


@pytest.mark.slow  # the bundled model trained 4 steps, converted and merged: ~30 s each on 2 cores
@pytest.mark.parametrize("variant", ["dora", "rslora", "pissa"])
def test_the_bundled_model_trains_and_merges_with_a_variant(variant, bundled_path, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(bundled_path, data, lora_variant=variant, max_steps=4, save_steps=4, lr=1e-3,
                      max_length=64, batch_size=1, accumulative_counts=2, dtype="float32")
    last = train(cfg, tmp_path / "work", RunOptions(progress=False))
    losses = _losses(tmp_path / "work")
    assert losses[-1] < losses[0], losses
    adapter = convert_checkpoint(last, tmp_path / "hf", fp32=True)
    merged = merge_adapter(str(bundled_path), adapter, tmp_path / "merged", dtype="float32")
    plain = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    with_adapter = _logits(_peft(bundled_path, adapter))
    trained = _logits(_as_trained(cfg, load_checkpoint(last)))
    moved = (with_adapter - _logits(AutoModelForCausalLM.from_pretrained(bundled_path, dtype=torch.float32)))
    capsys.readouterr()
    with capsys.disabled():
        print(f"\nbundled {variant}: merged vs base+adapter {(plain - with_adapter).abs().max().item():.2e}, "
              f"vs the trained model {(plain - trained).abs().max().item():.2e} (logits up to "
              f"{with_adapter.abs().max().item():.1f}; training moved them by {moved.abs().max().item():.2f}); "
              f"losses {losses}; tokens/s {_speeds(tmp_path / 'work')}")
    assert moved.abs().max().item() > 0.01
    torch.testing.assert_close(plain, with_adapter, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, trained, rtol=1e-4, atol=1e-4)


def test_dora_on_4_bit_weights_starts_as_the_base_after_an_evaluation(tiny_model_dir, data):
    """DoRA's weight norm reads the dequantized 4-bit weight; an evaluation forward (eval mode,
    no grad) must not leave it in a layout that reads wrong (bitsandbytes' AVX512-BF16 repacking,
    on CPUs that have it)."""
    cfg = tiny_config(tiny_model_dir, data, method="qlora", lora_variant="dora")
    model = apply_lora(load_model(tiny_model_dir, CPU, torch.float32, load_in_4bit=True), cfg).eval()
    _logits(model)  # what the evaluation hook does first
    with model.disable_adapter():
        base = _logits(model)
    torch.testing.assert_close(_logits(model), base, rtol=1e-4, atol=1e-4)  # B = 0: DoRA is the identity
