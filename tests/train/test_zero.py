"""DeepSpeed JSON: presets resolve, "auto" comes from the config, contradictions are one clear error.
(That ZeRO-2/3 train what one process trains is in test_parallel.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.train import zero


def _cfg(**kw) -> Config:
    return Config(pretrained_model_name_or_path="m", data_files="d.jsonl", batch_size=2,
                  accumulative_counts=8, max_norm=0.5, **kw)


@pytest.mark.parametrize("name", zero.presets())
def test_every_preset_fills_from_the_config(name):
    ds, source = zero.resolve(name)
    filled = zero.fill_auto(ds, source, _cfg(), world=4, dtype=torch.bfloat16)
    assert filled["train_micro_batch_size_per_gpu"] == 2
    assert filled["gradient_accumulation_steps"] == 8
    assert filled["train_batch_size"] == 2 * 8 * 4
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(filled)
    assert ds["gradient_accumulation_steps"] == "auto"  # the preset itself is left alone
    assert zero.stage(filled) == int(name[len("deepspeed_zero")])


def test_fp32_turns_both_half_precisions_off():
    ds, source = zero.resolve("deepspeed_zero2")
    filled = zero.fill_auto(ds, source, _cfg(), world=1, dtype=torch.float32)
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False


def test_a_user_json_that_contradicts_the_config_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    ds, source = zero.resolve(str(path))
    with pytest.raises(UserError, match=r"gradient_accumulation_steps = 4, but the config gives 8.*auto"):
        zero.fill_auto(ds, source, _cfg(), world=1, dtype=torch.bfloat16)
    ds["gradient_accumulation_steps"] = 8  # agreeing is fine
    assert zero.fill_auto(ds, source, _cfg(), world=1, dtype=torch.bfloat16)["train_batch_size"] == 16


def test_optimizer_sections_and_precision_mismatch_are_refused(tmp_path):
    with pytest.raises(UserError, match="remove the 'optimizer' section"):
        zero.fill_auto({"optimizer": {"type": "AdamW"}}, "ds.json", _cfg(), 1, torch.bfloat16)
    with pytest.raises(UserError, match=r"fp16.enabled = True, but the model trains in torch.bfloat16"):
        zero.fill_auto({"fp16": {"enabled": True}}, "ds.json", _cfg(), 1, torch.bfloat16)


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(UserError, match=r"ds.json:3: invalid DeepSpeed JSON"):
        zero.resolve(str(path))
