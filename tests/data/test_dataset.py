from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_config, write_jsonl

from tuneforge.config.schema import DataSource
from tuneforge.data.dataset import bad_lines, build_rows
from tuneforge.data.inspect import check_dataset, log_dataset
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    import tuneforge.data.cache as cache

    monkeypatch.setattr(cache, "data_cache_dir", lambda: tmp_path / "cache")


def qa(i: int, answer: str = "a") -> dict:
    return {"conversation": [{"input": f"q{i}", "output": answer}]}


def rows_for(cfg, tokenizer):
    return build_rows(cfg, tokenizer, get_template(cfg.prompt_template, tokenizer))


def test_sources_mix_files_folders_repeat_and_max_samples(tiny_model_dir, tokenizer, tmp_path):
    ident = write_jsonl(tmp_path / "id.jsonl", [qa(i) for i in range(5)])
    write_jsonl(tmp_path / "general" / "a.jsonl", [qa(i) for i in range(10, 13)])
    (tmp_path / "general" / "sub").mkdir()
    (tmp_path / "general" / "sub" / "b.json").write_text('[{"instruction": "x", "output": "y"}]')
    cfg = tiny_config(tiny_model_dir, ident, pack_to_max_length=False, data_files=[
        DataSource(path=str(ident), repeat=3, max_samples=2), str(tmp_path / "general")])
    rows, stats = rows_for(cfg, tokenizer)
    assert len(stats.files) == 3 and stats.samples == 6 + 3 + 1 and len(rows) == 10
    first = [tokenizer.decode(rows[k].input_ids) for k in range(6)]
    assert [("q0" in t, "q1" in t) for t in first] == [(True, False), (False, True)] * 3


def test_dict_sources_validate_from_a_config_file():
    from tuneforge.config.load import build_config

    cfg = build_config({"pretrained_model_name_or_path": "m",
                        "data_files": [{"path": "a.jsonl", "repeat": 2}, "b.jsonl"]})
    assert [(s.path, s.repeat) for s in cfg.data_sources] == [("a.jsonl", 2), ("b.jsonl", 1)]
    with pytest.raises(UserError, match="repeat"):
        build_config({"pretrained_model_name_or_path": "m", "data_files": [{"path": "a", "repeat": 0}]})


def test_second_build_comes_from_the_cache_with_the_same_rows(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(i, f"answer {i}") for i in range(50)])
    cfg = tiny_config(tiny_model_dir, path)
    rows1, s1 = rows_for(cfg, tokenizer)
    rows2, s2 = rows_for(cfg, tokenizer)
    assert (s1.cached_files, s2.cached_files) == (0, 1)
    assert [rows1[i] for i in range(len(rows1))] == [rows2[i] for i in range(len(rows2))]
    _, s3 = rows_for(tiny_config(tiny_model_dir, path, SYSTEM="be nice"), tokenizer)  # other tokens
    assert s3.cached_files == 0
    write_jsonl(path, [qa(i, f"changed {i}") for i in range(50)])
    _, s4 = rows_for(cfg, tokenizer)
    assert s4.cached_files == 0


def test_skip_bad_lines_counts_them_and_keeps_the_rest(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0), {"conversation": [{"input": {"t": 1}, "output": "a"}]}, qa(2)])
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(UserError, match=r"d\.jsonl:2: conversation\[0\]\.input"):
        rows_for(tiny_config(tiny_model_dir, path), tokenizer)
    rows, stats = rows_for(tiny_config(tiny_model_dir, path, skip_bad_lines=True, pack_to_max_length=False), tokenizer)
    assert len(rows) == 2 and stats.bad_lines == 2 and "d.jsonl:4: invalid JSON" in bad_lines(rows)[1]


def test_long_samples_are_truncated_or_dropped_and_counted(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0), qa(1, "word " * 200)])
    _, stats = rows_for(tiny_config(tiny_model_dir, path, max_length=64), tokenizer)
    assert (stats.truncated, stats.dropped, stats.samples) == (1, 0, 2)
    _, stats = rows_for(tiny_config(tiny_model_dir, path, max_length=64, long_samples="drop"), tokenizer)
    assert (stats.truncated, stats.dropped) == (1, 1)


def test_check_dataset_reports_bad_lines_lengths_and_a_marked_sample(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0, "hello there"), {"messages": [{"role": "bot", "content": "x"}]}])
    report, bad = check_dataset(tiny_config(tiny_model_dir, path), tokenizer, get_template("auto", tokenizer))
    assert bad == 1 and "d.jsonl:2: messages[0].role: unknown role 'bot'" in report
    assert "tokens per sample: min" in report and "⟦hello there<|im_end|>⟧" in report


def test_log_dataset_shows_masked_text(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0, "hello there")])
    cfg = tiny_config(tiny_model_dir, path)
    out = log_dataset(cfg, tokenizer, get_template("auto", tokenizer), show="masked_text", num=1)
    assert out.splitlines()[1].startswith("[") and out.endswith("hello there<|im_end|>[1 masked]")
    with pytest.raises(UserError, match="masked_text"):
        log_dataset(cfg, tokenizer, get_template("auto", tokenizer), show="x", num=1)


def test_parquet_source(tiny_model_dir, tokenizer, tmp_path):
    import pyarrow as pa  # in the [test] extra: a missing one is a broken set-up, not a skip
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)])
    pq.write_table(table, tmp_path / "d.parquet")
    rows, stats = rows_for(tiny_config(tiny_model_dir, tmp_path / "d.parquet", pack_to_max_length=False), tokenizer)
    assert stats.samples == 3 and "a2<|im_end|>" in tokenizer.decode(rows[2].input_ids)


def test_few_steps_per_epoch_warns(tiny_model_dir, identity_data, tmp_path, capsys):
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import train

    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=None, max_epochs=1, max_length=512,
                      batch_size=1, accumulative_counts=16)
    train(cfg.model_copy(update={"max_epochs": 1}), tmp_path / "w", RunOptions(progress=False))
    out = capsys.readouterr()
    assert "optimizer step(s) per epoch" in out.out + out.err


def test_check_dataset_names_each_file_its_format_and_counts(tiny_model_dir, tokenizer, tmp_path):
    good = write_jsonl(tmp_path / "data" / "a.json", [{"query": f"q{i}", "response": "a"} for i in range(3)])
    mixed = write_jsonl(tmp_path / "data" / "b.jsonl", [qa(0), {"instruction": "q", "output": "a", "label": False}])
    (tmp_path / "data" / "c.json").write_text('[{"instruction": "q", "output": "a"}]')
    report, bad = check_dataset(tiny_config(tiny_model_dir, tmp_path / "data"), tokenizer,
                                get_template("auto", tokenizer))
    assert bad == 1
    lines = report.splitlines()
    assert lines[:4] == ["files: 3", f"  {good}: JSON Lines, swift; samples 3, bad lines 0",
                         f"  {mixed}: JSON Lines, conversation 1, alpaca 1; samples 1, bad lines 1",
                         f"  {tmp_path / 'data' / 'c.json'}: JSON list, alpaca; samples 1, bad lines 0"]
    assert lines[4].startswith("bad lines: 1 (training stops") and lines[5].startswith(f"  {mixed}:2: label: a KTO")
    assert "samples: 5 usable" in report


def test_check_dataset_names_the_first_bad_lines_when_every_line_is_bad(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}] * 30)
    cfg = tiny_config(tiny_model_dir, path)
    report, bad = check_dataset(cfg, tokenizer, get_template("auto", tokenizer))
    lines = report.splitlines()
    assert bad == 30 and lines[1] == f"  {path}: JSON Lines, messages; samples 0, bad lines 30"
    assert lines[3] == f"  {path}:1: messages[0].role: unknown role 'bot'; expected one of assistant, system, tool, user"
    assert lines[3 + 19].startswith(f"  {path}:20: ") and lines[23] == "  … 10 more"
    assert lines[24:] == ["samples: 0 usable (every line is bad)"]
    with pytest.raises(UserError) as err:  # asked to skip them all: one line, still naming the first
        check_dataset(tiny_config(tiny_model_dir, path, skip_bad_lines=True), tokenizer,
                      get_template("auto", tokenizer))
    assert str(err.value) == ("no usable sample in the data files (30 bad lines, all skipped; the first: "
                              f"{path}:1: messages[0].role: unknown role 'bot'; expected one of assistant, "
                              "system, tool, user)")


def test_relative_data_paths_are_tried_from_the_working_directory_then_beside_the_config(
        tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """docs/config.md: a relative data_files path is tried from the working directory, then beside
    the config file (also when the config is itself given by a relative path)."""
    from tuneforge.config import load_config

    project = tmp_path / "project"
    write_jsonl(project / "data" / "d.jsonl", [qa(0, "beside the config")])
    write_jsonl(project / "folder" / "f.jsonl", [qa(1, "in a folder beside it")])
    (project / "cfg.py").write_text(f"pretrained_model_name_or_path = {str(tiny_model_dir)!r}\n"
                                    "data_files = ['data/d.jsonl', 'folder']\npack_to_max_length = False\n")
    monkeypatch.chdir(tmp_path)  # neither path exists here
    rows, stats = rows_for(load_config("project/cfg.py"), tokenizer)
    assert [str(Path(f).resolve()) for f in stats.files] == [str(project / "data" / "d.jsonl"),
                                                             str(project / "folder" / "f.jsonl")]
    assert [tokenizer.decode(rows[k].input_ids).count("beside") for k in range(2)] == [1, 1]

    write_jsonl(tmp_path / "data" / "d.jsonl", [qa(0, "from the working directory")])  # now both exist
    rows, stats = rows_for(load_config("project/cfg.py"), tokenizer)
    assert Path(stats.files[0]).resolve() == tmp_path / "data" / "d.jsonl"
    assert "from the working directory" in tokenizer.decode(rows[0].input_ids)

    (project / "cfg.py").write_text(f"pretrained_model_name_or_path = {str(tiny_model_dir)!r}\n"
                                    "data_files = 'nowhere.jsonl'\n")
    looked = re.escape(f"data file 'nowhere.jsonl' not found (looked in nowhere.jsonl, {project / 'nowhere.jsonl'})")
    with pytest.raises(UserError, match=looked):
        rows_for(load_config("project/cfg.py"), tokenizer)
