from __future__ import annotations

import pytest

from tuneforge.config import load_config, parse_cfg_options
from tuneforge.config.catalog import copy_preset, list_presets, preset_path
from tuneforge.errors import UserError


def write_cfg(tmp_path, text: str):
    path = tmp_path / "cfg.py"
    path.write_text(text, encoding="utf-8")
    return path


BASE = "pretrained_model_name_or_path = 'm'\ndata_files = 'd.jsonl'\n"


def test_plain_settings_become_typed_config(tmp_path):
    cfg = load_config(write_cfg(tmp_path, BASE + "lr = 1e-4\nlora_r = 8\nSYSTEM = 'be brief'\n"))
    assert cfg.lr == 1e-4 and cfg.lora_r == 8 and cfg.SYSTEM == "be brief"
    assert [s.path for s in cfg.data_sources] == ["d.jsonl"]


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(UserError, match=r"unknown setting 'lora_rank'; did you mean 'lora_r'\?"):
        load_config(write_cfg(tmp_path, BASE + "lora_rank = 8\n"))
    with pytest.raises(UserError, match="did you mean 'accumulative_counts'"):
        load_config(write_cfg(tmp_path, BASE + "accumulative_count = 8\n"))


def test_wrong_type_names_file_and_setting(tmp_path):
    path = write_cfg(tmp_path, BASE + "lr = 'fast'\n")
    with pytest.raises(UserError, match=r"cfg\.py: setting 'lr'.*'fast'"):
        load_config(path)


def test_missing_required_setting(tmp_path):
    with pytest.raises(UserError, match="'pretrained_model_name_or_path' is missing"):
        load_config(write_cfg(tmp_path, "data_files = 'x'\n"))


def test_xtuner_alias_maps_onto_data_files(tmp_path):
    cfg = load_config(write_cfg(tmp_path, "pretrained_model_name_or_path = 'm'\n"
                                          "alpaca_en_path = '/data/a.jsonl'\n"))
    assert cfg.data_files == "/data/a.jsonl"


def test_cfg_options_override_and_parse_literals(tmp_path):
    opts = parse_cfg_options(["lr=3e-5", "evaluation_inputs=['a', 'b']", "SYSTEM=hello world",
                              "pack_to_max_length=False"])
    cfg = load_config(write_cfg(tmp_path, BASE), opts)
    assert cfg.lr == 3e-5 and cfg.evaluation_inputs == ["a", "b"]
    assert cfg.SYSTEM == "hello world" and cfg.pack_to_max_length is False
    with pytest.raises(UserError, match="not key=value"):
        parse_cfg_options(["lr"])


def test_syntax_error_and_import_of_missing_module(tmp_path):
    with pytest.raises(UserError, match=r"cfg\.py:3: invalid Python"):
        load_config(write_cfg(tmp_path, BASE + "lr = (\n"))
    with pytest.raises(UserError, match="imports 'not_installed_pkg'"):
        load_config(write_cfg(tmp_path, "import not_installed_pkg\n" + BASE))
    # an xtuner import marks an XTuner config: parsed, not run (tests/config/test_xtuner.py)
    assert load_config(write_cfg(tmp_path, "from xtuner.dataset import x\n" + BASE)).lr


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.py")


def test_every_preset_validates():
    names = list_presets()
    assert {"internlm2_5_chat_7b_qlora_alpaca_e3", "internlm2_5_chat_7b_lora_alpaca_e3",
            "internlm2_5_chat_7b_full_alpaca_e3", "qwen2_5_7b_instruct_qlora_alpaca_e3",
            "llama3_8b_instruct_qlora_alpaca_e3", "smollm2_135m_instruct_lora_assistant"} <= set(names)
    for name in names:
        load_config(preset_path(name))


def test_internlm_preset_has_xtuner_settings():
    cfg = load_config(preset_path("internlm2_5_chat_7b_qlora_alpaca_e3"))
    assert (cfg.max_length, cfg.pack_to_max_length, cfg.batch_size, cfg.max_epochs) == (2048, True, 1, 3)
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.max_norm, cfg.warmup_ratio) == (
        2e-4, (0.9, 0.999), 0, 1, 0.03)
    assert (cfg.save_steps, cfg.save_total_limit, cfg.evaluation_freq) == (500, 2, 500)
    assert cfg.method == "qlora" and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 16, 0.1)
    assert "lm_head" in cfg.lora_target_modules  # XTuner adapts InternLM2's head too (test_presets.py)
    assert cfg.evaluation_inputs == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    assert load_config(preset_path("internlm2_5_chat_7b_lora_alpaca_e3")).method == "lora"
    assert load_config(preset_path("internlm2_5_chat_7b_full_alpaca_e3")).method == "full"


def test_list_filter_and_copy(tmp_path):
    assert list_presets("qwen") == ["qwen2_5_7b_instruct_qlora_alpaca_e3"]
    dest = copy_preset("internlm2_5_chat_7b_qlora_alpaca_e3", tmp_path)
    assert dest == tmp_path / "internlm2_5_chat_7b_qlora_alpaca_e3_copy.py"
    assert load_config(dest).method == "qlora"
    with pytest.raises(UserError, match="did you mean 'internlm2_5_chat_7b_qlora_alpaca_e3'"):
        preset_path("internlm2_5_chat_7b_qlora_alpaca")


def test_report_to_takes_tracker_names_and_refuses_others_naming_the_allowed_ones(tmp_path):
    assert load_config(write_cfg(tmp_path, BASE)).report_to is None  # decided when training starts
    assert load_config(write_cfg(tmp_path, BASE + "report_to = 'wandb'\n")).report_to == ["wandb"]
    assert load_config(write_cfg(tmp_path, BASE + "report_to = 'none'\n")).report_to == []
    both = load_config(write_cfg(tmp_path, BASE), {"report_to": ["mlflow", "swanlab", "mlflow"]})
    assert both.report_to == ["mlflow", "swanlab"]
    with pytest.raises(UserError, match=r"cfg\.py: setting 'report_to': unknown tracker 'tensorbord'; report_to "
                                         r"takes any of tensorboard, wandb, swanlab, mlflow \(or 'none'\)"):
        load_config(write_cfg(tmp_path, BASE + "report_to = ['tensorbord']\n"))
