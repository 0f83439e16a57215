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


def test_pth_to_hf_given_the_work_dir_converts_its_last_checkpoint(lora_run, tiny_model_dir, tmp_path):
    """docs/commands.md: CKPT may be the work dir, meaning its last checkpoint (the command, run
    in-process)."""
    from safetensors.torch import load_file

    from tuneforge.cli import main
    from tuneforge.convert.pth_to_hf import peft_key

    work = lora_run.parent
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_3.pth", "iter_4.pth"]
    config = tmp_path / "cfg.py"
    config.write_text(f"pretrained_model_name_or_path = {str(tiny_model_dir)!r}\ndata_files = 'd.jsonl'\n")
    assert main(["convert", "pth_to_hf", str(config), str(work), str(tmp_path / "hf"), "--fp32"]) == 0
    written = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    last, earlier = (load_checkpoint(work / name).state_dict for name in ("iter_4.pth", "iter_3.pth"))
    assert written.keys() == {peft_key(k) for k in last}
    assert all(torch.equal(written[peft_key(k)], v) for k, v in last.items())
    assert not all(torch.equal(written[peft_key(k)], v) for k, v in earlier.items())  # the two differ


@pytest.fixture(scope="module")
def eos_base(bundled_path, tmp_path_factory):
    """The bundled model as a base whose end of text (<|endoftext|>) is not its chat template's end
    of turn (<|im_end|>), as with many base models: its own generation config runs past a turn."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("eos-base")
    for f in bundled_path.iterdir():
        if f.name not in ("config.json", "generation_config.json") and not f.name.startswith("tokenizer"):
            (out / f.name).symlink_to(f)
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((bundled_path / name).read_text())
        (out / name).write_text(json.dumps({**settings, "eos_token_id": 0}))
    tok = AutoTokenizer.from_pretrained(bundled_path)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(out)
    return out


def _adapter_for(base, out, template: bool):
    """A PEFT adapter of BASE (peft's zero init: the merge equals the base), with tuneforge's
    template file as pth_to_hf writes it, or without (a foreign adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.data.templates import get_template, save_template

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    if template:
        save_template(out, get_template("auto", AutoTokenizer.from_pretrained(base)))
    return out


def _greedy_answer(folder, question: str) -> list[int]:
    """What plain transformers generates from FOLDER, with the folder's own generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow  # the bundled model, merged twice (~1 min on 2 cores)
@pytest.mark.parametrize("template", [True, False])
def test_the_merged_generation_config_stops_at_the_end_of_turn(eos_base, tmp_path, template):
    """docs/serving.md: the merged folder's generation config stops at the template's end-of-turn
    token, so plain transformers' generate() ends the answer there; also for an adapter without
    tuneforge's template file (the base's own chat template is the one it chats with)."""
    from transformers import AutoTokenizer

    end_of_turn = AutoTokenizer.from_pretrained(eos_base).convert_tokens_to_ids("<|im_end|>")
    question = "What is 2+2? Answer with one number."
    base_answer = _greedy_answer(eos_base, question)
    assert end_of_turn in base_answer[:-1]  # the base's config runs past the turn: the check can fail

    merged = merge_adapter(str(eos_base), _adapter_for(eos_base, tmp_path / "adapter", template),
                           tmp_path / "merged")
    eos = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert end_of_turn in (eos if isinstance(eos, list) else [eos]), eos
    answer = _greedy_answer(merged, question)
    stop = base_answer.index(end_of_turn)
    assert answer == base_answer[:stop + 1], (answer, base_answer)  # the same answer, ended at the turn
