"""data_files naming a dataset: read through the `datasets` library from a private HF cache with no
network, and trained like a file (the same formats, token cache and errors, rows named NAME[split]:ROW)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_config, write_jsonl
from hub_cache import alpaca, hub_snapshot, offline_env
from waits import tuneforge

from tuneforge.config.schema import DataSource
from tuneforge.data.dataset import build_pair_rows, build_rows, resolve_source
from tuneforge.data.inspect import check_dataset
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError
from tuneforge.models.resolve import resolve_model
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import Recipe

NAME = "tuneforge-test/alpaca-tiny"


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A private, empty HF cache, offline, so the user's cache is never read or written. Set in the
    environment, and in datasets' and huggingface_hub's flags, which they read from it at import."""
    import datasets.config as ds_config
    import huggingface_hub.constants as hub

    import tuneforge.data.cache as cache

    home = tmp_path / "hf"
    for var in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (("HF_HOME", str(home)), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(ds_config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(ds_config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
    monkeypatch.setattr(ds_config, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted")
    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(ds_config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(cache, "data_cache_dir", lambda: tmp_path / "tokens")
    monkeypatch.chdir(tmp_path)  # relative names are looked up here first
    return home


def rows_for(cfg, tokenizer):
    return build_rows(cfg, tokenizer, get_template(cfg.prompt_template, tokenizer))


def texts(rows, tokenizer) -> str:
    return "".join(tokenizer.decode(rows[i].input_ids) for i in range(len(rows)))


def train_log(work: Path) -> list[dict]:
    return [r for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_hub_name_in_the_cache_trains_offline_and_its_tokens_are_cached(hf_home, tiny_model_dir, tokenizer,
                                                                          tmp_path):
    hub_snapshot(hf_home / "hub", NAME, {"train": [alpaca(24)]})
    cfg = tiny_config(tiny_model_dir, NAME, max_steps=3, batch_size=1, accumulative_counts=1)
    recipe = Recipe(cfg, tmp_path / "w", RunOptions(progress=False))
    recipe.setup()
    assert recipe.stats.files == [f"{NAME}[train]"] and recipe.stats.samples == 24
    assert "from 1 dataset(s)" in recipe.stats.summary()
    assert "answer number 23." in texts(recipe.rows, tokenizer)
    recipe.train()
    assert [r["step"] for r in train_log(tmp_path / "w")] == [1, 2, 3]
    # the same token cache as files: a second build reads the encoded rows back
    assert rows_for(cfg, tokenizer)[1].cached_files == 1


def test_split_and_subset_read_that_part_of_the_dataset(hf_home, tiny_model_dir, tokenizer):
    card = ("---\nconfigs:\n"
            "- config_name: en\n  data_files:\n  - split: train\n    path: en/train-*.parquet\n"
            "  - split: test\n    path: en/test-*.parquet\n"
            "- config_name: zh\n  data_files:\n  - split: train\n    path: zh/train-*.parquet\n"
            "  - split: test\n    path: zh/test-*.parquet\n---\n")
    for subset in ("en", "zh"):
        hub_snapshot(hf_home / "hub", NAME, {s: [alpaca(3, tag=f"{subset}-{s} ")] for s in ("train", "test")},
                     readme=card, prefix=subset)
    cfg = tiny_config(tiny_model_dir, NAME, pack_to_max_length=False,
                      data_files=[DataSource(path=f"hf://{NAME}", subset="zh", split="test")])
    rows, stats = rows_for(cfg, tokenizer)
    assert stats.files == [f"{NAME}[test]"] and stats.samples == 3
    text = texts(rows, tokenizer)
    assert "zh-test question 2" in text and "en-" not in text and "zh-train" not in text
    with pytest.raises(UserError) as err:  # datasets' own message, as one line
        rows_for(cfg.model_copy(update={"data_files": [DataSource(path=NAME, subset="zh", split="validation")]}),
                 tokenizer)
    assert str(err.value).startswith(f"{NAME}[validation]: ") and "\n" not in str(err.value)
    assert "test" in str(err.value) and "train" in str(err.value)  # the splits there are


def test_a_bad_record_is_named_by_dataset_split_and_row(hf_home, tiny_model_dir, tokenizer):
    records = alpaca(30)
    records[17]["output"] = ""
    snapshot = hub_snapshot(hf_home / "hub", NAME, {"train": [records]})
    cfg = tiny_config(tiny_model_dir, NAME)
    with pytest.raises(UserError) as err:
        rows_for(cfg, tokenizer)
    assert str(err.value).startswith(f"{NAME}[train]:17: output: empty answer")
    import datasets  # ROW is the row as datasets indexes it

    assert datasets.load_dataset(str(snapshot), split="train")[17]["output"] == ""
    rows, stats = rows_for(cfg.model_copy(update={"skip_bad_lines": True}), tokenizer)
    assert stats.samples == 29 and stats.bad_lines == 1


def test_check_dataset_reports_a_dataset_like_a_file(hf_home, tiny_model_dir, tokenizer):
    records = alpaca(12)
    records[5]["instruction"] = ""
    hub_snapshot(hf_home / "hub", NAME, {"train": [records]})
    cfg = tiny_config(tiny_model_dir, NAME)
    report, bad = check_dataset(cfg, tokenizer, get_template(cfg.prompt_template, tokenizer))
    assert bad == 1 and f"  {NAME}[train]: dataset, alpaca; samples 11, bad lines 1" in report
    assert f"{NAME}[train]:5: instruction: empty" in report and f"first sample ({NAME}[train]:0)" in report
    streamed = cfg.model_copy(update={"data_files": [DataSource(path=NAME, streaming=True, max_samples=4)]})
    report, _ = check_dataset(streamed, tokenizer, get_template(cfg.prompt_template, tokenizer))
    assert f"  {NAME}[train]: dataset, streamed, alpaca; samples 4, bad lines 0" in report


def test_preference_pairs_by_name(hf_home, tiny_model_dir, tokenizer):
    pairs = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(6)]
    hub_snapshot(hf_home / "hub", NAME, {"train": [pairs]})
    cfg = tiny_config(tiny_model_dir, NAME, objective="dpo")
    rows, stats = build_pair_rows(cfg, tokenizer, get_template(cfg.prompt_template, tokenizer))
    assert stats.samples == 6 and stats.unit == "pairs" and rows.pairs() == 6


def test_a_name_neither_local_nor_cached_is_one_line_saying_where_it_looked(hf_home, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, "tatsu-lab/alpaca")
    with pytest.raises(UserError) as err:
        resolve_source(cfg.data_sources[0], cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("dataset 'tatsu-lab/alpaca' not found")
    assert f"no local path {tmp_path / 'tatsu-lab' / 'alpaca'}, and not in the HF cache" in msg
    assert str(hf_home / "hub" / "datasets--tatsu-lab--alpaca") in msg
    assert str(hf_home / "datasets" / "tatsu-lab___alpaca") in msg
    assert "HF_HUB_OFFLINE=1" in msg or "HF_DATASETS_OFFLINE=1" in msg
    assert "hf download --repo-type dataset tatsu-lab/alpaca" in msg and "save_to_disk" in msg
    # the command it names is the installed huggingface_hub's own
    hf = shutil.which("hf") or str(Path(__import__("sys").executable).parent / "hf")
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--repo-type" in usage.stdout


def test_a_local_path_wins_over_a_name(hf_home, tiny_model_dir, tokenizer, tmp_path):
    hub_snapshot(hf_home / "hub", NAME, {"train": [alpaca(4, tag="hub ")]})
    write_jsonl(tmp_path / NAME / "local.jsonl", alpaca(2, tag="local "))
    rows, stats = rows_for(tiny_config(tiny_model_dir, NAME), tokenizer)
    assert stats.files == [str(Path(NAME) / "local.jsonl")] and "hub " not in texts(rows, tokenizer)


def test_a_folder_written_by_save_to_disk_is_read_by_its_split(hf_home, tiny_model_dir, tokenizer, tmp_path):
    import datasets

    one = tmp_path / "one"
    datasets.Dataset.from_list(alpaca(5, tag="one ")).save_to_disk(str(one))
    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca(2, tag="train ")),
                          "test": datasets.Dataset.from_list(alpaca(3, tag="test "))}).save_to_disk(str(both))
    rows, stats = rows_for(tiny_config(tiny_model_dir, one, pack_to_max_length=False), tokenizer)
    assert stats.samples == 5 and stats.files == [f"{one}[train]"]
    cfg = tiny_config(tiny_model_dir, one, pack_to_max_length=False,
                      data_files=[DataSource(path=str(both), split="test")])
    rows, stats = rows_for(cfg, tokenizer)
    assert stats.samples == 3 and "train " not in texts(rows, tokenizer)
    with pytest.raises(UserError, match=r"no split 'dev'; it has 'train', 'test'"):
        rows_for(cfg.model_copy(update={"data_files": [DataSource(path=str(both), split="dev")]}), tokenizer)


def test_streaming_trains_10_steps_without_reading_the_whole_set(hf_home, tiny_model_dir, tokenizer, tmp_path):
    """Twenty shards of which only the first two are Parquet: reading the whole set fails, so a
    streamed run that trains proves it read no further than it trained."""
    shards: list[list[dict] | bytes] = [alpaca(100), alpaca(100, start=100)] + [b"not parquet"] * 18
    hub_snapshot(hf_home / "hub", NAME, {"train": shards})
    streamed = DataSource(path=NAME, streaming=True)
    cfg = tiny_config(tiny_model_dir, NAME, data_files=[streamed], max_steps=10, batch_size=1,
                      accumulative_counts=1)
    recipe = Recipe(cfg, tmp_path / "w", RunOptions(progress=False))
    recipe.setup()
    read = recipe.stats.samples
    assert recipe.stats.streamed == [f"{read} records of {NAME}[train]"] and 10 <= read < 100
    assert recipe.stats.rows >= 10  # enough rows for the ten steps, from the first shard alone
    recipe.train()
    assert [r["step"] for r in train_log(tmp_path / "w")] == list(range(1, 11))
    with pytest.raises(UserError) as err:  # read whole, the same set fails at a broken shard
        rows_for(cfg.model_copy(update={"data_files": [NAME]}), tokenizer)
    assert str(err.value).startswith(f"{NAME}[train]: ") and "\n" not in str(err.value)


def test_streaming_needs_max_steps_or_max_samples(tiny_model_dir):
    with pytest.raises(UserError, match="streaming=True.*needs max_steps"):
        tiny_config(tiny_model_dir, NAME, max_steps=None, data_files=[DataSource(path=NAME, streaming=True)])
    cfg = tiny_config(tiny_model_dir, NAME, max_steps=None,
                      data_files=[DataSource(path=NAME, streaming=True, max_samples=50)])
    assert cfg.data_sources[0].max_samples == 50


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed")
def test_a_modelscope_name_without_the_package_says_how_to_install_it(hf_home, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, "modelscope://AI-ModelScope/alpaca-gpt4-data-zh")
    with pytest.raises(UserError) as err:
        resolve_source(cfg.data_sources[0], cfg)
    assert "pip install modelscope" in str(err.value) and "\n" not in str(err.value)


def test_an_unreachable_hub_gives_the_same_line_without_retrying(tiny_model_dir, tmp_path):
    """Not offline, but the Hub does not answer (as on a machine without network): the command
    ends with the one line, before datasets' retries (half a minute of them) begin."""
    env = {k: v for k, v in offline_env(tmp_path / "hf").items() if not k.endswith("_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens there
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"pretrained_model_name_or_path = {str(tiny_model_dir)!r}\ndata_files = 'tatsu-lab/alpaca'\n"
                   "max_steps = 1\nreplay_general = False\n")
    proc = tuneforge("train", str(cfg), "--work-dir", str(tmp_path / "w"), "--no-progress", env=env,
                     cwd=tmp_path, seconds=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert "dataset 'tatsu-lab/alpaca' not found" in err[-1] and "http://127.0.0.1:9 does not answer" in err[-1]


def test_a_missing_hub_model_says_how_to_fetch_it(hf_home):
    with pytest.raises(UserError) as err:
        resolve_model("tuneforge-test/no-such-model")
    msg = str(err.value)
    assert "\n" not in msg and "hf download tuneforge-test/no-such-model" in msg and str(hf_home / "hub") in msg
