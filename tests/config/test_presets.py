"""The presets named after XTuner configs hold XTuner 0.2.0's settings (docs/xtuner_presets.md).

XTUNER below is copied from XTuner 0.2.0's own files, the reference config of each preset (named
in the preset's header and in the doc). A preset that drifts from them fails here. The differences
the doc gives as deliberate are pinned as well, so changing one means changing the doc.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.config.catalog import list_presets, preset_path
from tuneforge.models.lora import lora_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "xtuner_presets.md"
# tuneforge's own demo presets, no XTuner counterpart
DEMO = {"smollm2_135m_instruct_lora_assistant", "smollm2_135m_instruct_lora_assistant_dpo"}

# PART 1 of every reference config, and its model/lora dicts, where they agree.
_EVERY = dict(data_files="tatsu-lab/alpaca", max_length=2048, pack_to_max_length=True,
              use_varlen_attn=False, batch_size=1, max_epochs=3, optim_type="AdamW",
              betas=(0.9, 0.999), weight_decay=0, max_norm=1, warmup_ratio=0.03, save_total_limit=2,
              evaluation_inputs=["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"],
              evaluation_max_new_tokens=600)  # EvaluateChatHook's max_new_tokens default
_LORA = dict(lora_r=64, lora_alpha=16, lora_dropout=0.1)
_QLORA = dict(method="qlora", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, **_LORA)

XTUNER_ITERS = 500  # save_steps and evaluation_freq of every reference config, in iterations

XTUNER: dict[str, dict] = {
    "internlm2_5_chat_7b_qlora_alpaca_e3": dict(
        ref="xtuner/configs/internlm/internlm2_5_chat_7b/internlm2_5_chat_7b_qlora_alpaca_e3.py",
        arch="internlm2", pretrained_model_name_or_path="internlm/internlm2_5-7b-chat",
        prompt_template="internlm2_chat", accumulative_counts=1, lr=2e-4, **_QLORA),
    # no XTuner config of this name: the QLoRA one without its quantization_config
    "internlm2_5_chat_7b_lora_alpaca_e3": dict(
        ref="xtuner/configs/internlm/internlm2_5_chat_7b/internlm2_5_chat_7b_qlora_alpaca_e3.py",
        arch="internlm2", pretrained_model_name_or_path="internlm/internlm2_5-7b-chat",
        prompt_template="internlm2_chat", accumulative_counts=1, lr=2e-4, method="lora", **_LORA),
    # no XTuner config of this name: InternLM2.5's full alpaca config (20B), with the 7B model
    "internlm2_5_chat_7b_full_alpaca_e3": dict(
        ref="xtuner/configs/internlm/internlm2_5_chat_20b/internlm2_5_chat_20b_alpaca_e3.py",
        arch=None, pretrained_model_name_or_path="internlm/internlm2_5-7b-chat",
        prompt_template="internlm2_chat", accumulative_counts=1, lr=2e-5, method="full"),
    "llama3_8b_instruct_qlora_alpaca_e3": dict(
        ref="xtuner/configs/llama/llama3_8b_instruct/llama3_8b_instruct_qlora_alpaca_e3.py",
        arch="llama", pretrained_model_name_or_path="meta-llama/Meta-Llama-3-8B-Instruct",
        prompt_template="llama3_chat", accumulative_counts=16, lr=2e-4, **_QLORA),
    # no Qwen2.5 config in XTuner 0.2.0: its Qwen1.5 one, with the newer model
    "qwen2_5_7b_instruct_qlora_alpaca_e3": dict(
        ref="xtuner/configs/qwen/qwen1_5/qwen1_5_7b_chat/qwen1_5_7b_chat_qlora_alpaca_e3.py",
        arch="qwen2", pretrained_model_name_or_path="Qwen/Qwen2.5-7B-Instruct",
        prompt_template="qwen_chat", accumulative_counts=16, lr=2e-4, **_QLORA),
}

# Differences the doc gives as deliberate, with the value tuneforge holds instead.
DELIBERATE = dict(SYSTEM="", replay_general=True, dtype="auto", seed=0, identity_guard=True)

# InternLM2's linear layers, as its modelling code names them (one decoder layer shown), and the
# Llama names tuneforge loads them under.
INTERNLM2_LINEARS = ["model.layers.0.attention.wqkv", "model.layers.0.attention.wo",
                     "model.layers.0.feed_forward.w1", "model.layers.0.feed_forward.w2",
                     "model.layers.0.feed_forward.w3", "output"]
INTERNLM2_TO_LLAMA = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w1": ("gate_proj",),
                      "w3": ("up_proj",), "w2": ("down_proj",), "output": ("lm_head",)}


def xtuner_targets(linear_names: list[str]) -> set[str]:
    """xtuner/model/utils.py find_all_linear_names, which SupervisedFinetune uses when the LoraConfig
    names no target_modules (none of the reference configs does): the last name part of every
    nn.Linear, less 'lm_head' and 'output_layer'."""
    names = {n.split(".")[-1] for n in linear_names}
    return names - {"lm_head", "output_layer"}


def tiny(arch: str) -> torch.nn.Module:
    """A 2-layer random model of ARCH, head untied as in the 7-8B checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    return LlamaForCausalLM(LlamaConfig(**shape))  # InternLM2 loads as Llama in tuneforge


def adapted(model: torch.nn.Module, cfg) -> set[str]:
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(model, lora_config(cfg))
    return {n.split(".")[-1] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def test_every_shipped_preset_loads_and_each_xtuner_one_is_compared():
    names = list_presets()
    for name in names:
        load_config(preset_path(name))
    assert set(names) - DEMO == set(XTUNER), "a preset named after an XTuner config needs a row here"


@pytest.mark.parametrize("name", sorted(XTUNER))
def test_preset_holds_xtuners_settings(name):
    cfg = load_config(preset_path(name))
    want = {**_EVERY, **{k: v for k, v in XTUNER[name].items() if k not in ("ref", "arch")}}
    drift = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
    assert not drift, f"{name}: (preset, XTuner) differ for {drift}"
    # XTuner counts save_steps and evaluation_freq in iterations (micro-batches), tuneforge in
    # optimizer steps: the nearest whole number of steps to XTuner's 500 iterations.
    steps = round(XTUNER_ITERS / cfg.accumulative_counts)
    assert (cfg.save_steps, cfg.evaluation_freq) == (steps, steps)


@pytest.mark.parametrize("name", sorted(XTUNER))
def test_deliberate_differences_are_the_documented_ones(name):
    cfg = load_config(preset_path(name))
    drift = {k: (getattr(cfg, k), v) for k, v in DELIBERATE.items() if getattr(cfg, k) != v}
    assert not drift, f"{name}: (preset, documented) differ for {drift}; update docs/xtuner_presets.md"
    # XTuner sets trust_remote_code=True everywhere; tuneforge keeps it for InternLM2 only (no
    # effect: InternLM2 loads natively), and Llama / Qwen have no remote code to trust.
    assert cfg.trust_remote_code is name.startswith("internlm2")


@pytest.mark.parametrize("name", sorted(n for n, x in XTUNER.items() if x["arch"]))
def test_lora_adapts_the_layers_xtuner_adapts(name):
    cfg = load_config(preset_path(name))
    arch = XTUNER[name]["arch"]
    model = tiny(arch)
    if arch == "internlm2":
        want = {llama for n in xtuner_targets(INTERNLM2_LINEARS) for llama in INTERNLM2_TO_LLAMA[n]}
        assert "lm_head" in want  # InternLM2's head is 'output', which XTuner does not leave out
    else:
        want = xtuner_targets([n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)])
        assert "lm_head" not in want
    assert adapted(model, cfg) == want


@pytest.mark.parametrize("name", sorted(XTUNER))
def test_header_and_doc_name_the_reference_config(name):
    ref = XTUNER[name]["ref"]
    header = preset_path(name).read_text(encoding="utf-8").split("#####")[0]
    assert ref in header and "docs/xtuner_presets.md" in header
    section = DOC.read_text(encoding="utf-8").split(f"\n## {name}\n")[1].split("\n## ")[0]
    assert f"XTuner file: `{ref}`" in section
