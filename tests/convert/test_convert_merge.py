from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tuneforge.convert.merge import merge_adapter
from tuneforge.convert.pth_to_hf import convert_checkpoint
from tuneforge.data.templates import TEMPLATE_FILE
from tuneforge.errors import UserError
from tuneforge.train.checkpoint import load_checkpoint
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import train


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from tuneforge.data.selfcog import write_self_cognition

    root = tmp_path_factory.mktemp("lora-run")
    write_self_cognition(root / "id.jsonl", "龙", "Long")
    cfg = tiny_config(tiny_model_dir, root / "id.jsonl", max_steps=4, lr=5e-2,
                      prompt_template="llama3_chat")
    return train(cfg, root / "work", RunOptions(progress=False))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pth_to_hf_writes_a_peft_adapter_that_reproduces_the_trained_model(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = convert_checkpoint(lora_run, tmp_path / "hf", fp32=True)
    assert {"adapter_config.json", "adapter_model.safetensors", TEMPLATE_FILE} <= {p.name for p in out.iterdir()}
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["peft_type"] == "LORA"
    assert json.loads((out / TEMPLATE_FILE).read_text())["name"] == "llama3_chat"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    before = logits(base, ids)
    tuned = PeftModel.from_pretrained(base, str(out))
    after = logits(tuned, ids)
    assert not torch.allclose(before, after, atol=1e-4)  # the adapter does something

    # the same numbers as the checkpoint applied by hand
    ckpt = load_checkpoint(lora_run)
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(out))
    state = {k: v for k, v in again.state_dict().items() if "lora_" in k}
    assert set(state) == set(ckpt.state_dict)
    for k, v in ckpt.state_dict.items():
        torch.testing.assert_close(state[k], v)


def test_merge_gives_a_plain_transformers_model_with_template_and_shards(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = convert_checkpoint(lora_run, tmp_path / "hf", fp32=True)
    merged = merge_adapter(str(tiny_model_dir), adapter, tmp_path / "merged", max_shard_size="1MB")
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").is_file()

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(adapter))
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    torch.testing.assert_close(logits(plain, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)

    tok = AutoTokenizer.from_pretrained(merged)
    assert "<|start_header_id|>" in tok.chat_template  # the training template, not the base's ChatML
    assert (merged / TEMPLATE_FILE).is_file()


def test_merge_refuses_a_directory_that_is_not_an_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="not a PEFT adapter"):
        merge_adapter(str(tiny_model_dir), tmp_path, tmp_path / "out")


def test_full_checkpoint_converts_to_a_hf_model(tiny_model_dir, identity_data, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_model_dir, identity_data, method="full", max_steps=2, lr=1e-2)
    last = train(cfg, tmp_path / "w", RunOptions(progress=False))
    out = convert_checkpoint(last, tmp_path / "hf", fp32=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ckpt = load_checkpoint(last)
    for k, v in ckpt.state_dict.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_base_recorded_in_the_checkpoint_wins_over_a_stale_config(lora_run, tiny_model_dir, tmp_path):
    out = convert_checkpoint(lora_run, tmp_path / "hf", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    moved = convert_checkpoint(lora_run, tmp_path / "hf2", base_model="somewhere/else")
    assert json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)


def safetensors_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    found = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            found |= {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return found


@pytest.fixture(scope="module")
def bf16_base(tiny_model_dir, tmp_path_factory):
    """The tiny model saved in bf16, as most hub models are."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).is_file():
            shutil.copy2(tiny_model_dir / name, out / name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


def test_merge_writes_the_base_dtype_merged_in_fp32(lora_run, bf16_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = convert_checkpoint(lora_run, tmp_path / "hf", fp32=True)
    merged = merge_adapter(str(bf16_base), adapter, tmp_path / "merged")
    assert safetensors_dtypes(merged) == {"BF16"}
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert json.loads((merged / "tuneforge_merge.json").read_text())["dtype"] == "bfloat16"

    # the same numbers as merging in fp32 and rounding once to bf16 at the end
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32),
                                    str(adapter)).merge_and_unload().to(torch.bfloat16).state_dict()
    written = load_file(str(merged / "model.safetensors"))
    for name, tensor in written.items():
        assert torch.equal(tensor, ref[name]), name
    assert AutoModelForCausalLM.from_pretrained(merged).dtype == torch.bfloat16


def test_merge_dtype_option_changes_the_written_dtype(lora_run, bf16_base, tiny_model_dir, tmp_path):
    from tuneforge.cli import build_parser

    args = build_parser().parse_args(["convert", "merge", "b", "a", "o", "--dtype", "float32"])
    assert args.dtype == "float32"
    assert build_parser().parse_args(["convert", "merge", "b", "a", "o"]).dtype == "auto"

    adapter = convert_checkpoint(lora_run, tmp_path / "hf", fp32=True)
    wide = merge_adapter(str(bf16_base), adapter, tmp_path / "fp32", dtype="float32")
    assert safetensors_dtypes(wide) == {"F32"}
    assert json.loads((wide / "config.json").read_text())["dtype"] == "float32"
    assert safetensors_dtypes(merge_adapter(str(tiny_model_dir), adapter, tmp_path / "same")) == {"F32"}
    half = merge_adapter(str(tiny_model_dir), adapter, tmp_path / "fp16", dtype="float16")
    assert safetensors_dtypes(half) == {"F16"}
    with pytest.raises(UserError, match="--dtype"):
        merge_adapter(str(tiny_model_dir), adapter, tmp_path / "bad", dtype="int8")


def test_merged_tokenizer_config_is_portable(lora_run, tiny_model_dir, tmp_path):
    adapter = convert_checkpoint(lora_run, tmp_path / "hf", fp32=True)
    for folder in (adapter, merge_adapter(str(tiny_model_dir), adapter, tmp_path / "merged")):
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        assert settings["tokenizer_class"] == "PreTrainedTokenizerFast"  # the base says TokenizersBackend
        assert settings["model_max_length"] == 512  # the tiny model's max_position_embeddings
        assert "<|start_header_id|>" in settings["chat_template"]
        assert "is_local" not in settings and not isinstance(settings.get("extra_special_tokens"), list)
