from __future__ import annotations

import pytest
from conftest import tiny_config, write_jsonl

from tuneforge.config.schema import DataSource
from tuneforge.data.dataset import build_rows, load_dataset_samples
from tuneforge.data.inspect import check_dataset, log_dataset, masked_text
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError


def qa(i: int, answer: str = "a") -> dict:
    return {"conversation": [{"input": f"q{i}", "output": answer}]}


def test_sources_mix_files_folders_repeat_and_max_samples(tiny_model_dir, tmp_path):
    ident = write_jsonl(tmp_path / "id.jsonl", [qa(i) for i in range(5)])
    write_jsonl(tmp_path / "general" / "a.jsonl", [qa(i) for i in range(10, 13)])
    write_jsonl(tmp_path / "general" / "sub" / "b.json", [])
    (tmp_path / "general" / "sub" / "b.json").write_text('[{"instruction": "x", "output": "y"}]')
    cfg = tiny_config(tiny_model_dir, ident, data_files=[
        DataSource(path=str(ident), repeat=3, max_samples=2), str(tmp_path / "general")])
    files, samples, bad = load_dataset_samples(cfg)
    assert len(files) == 3 and not bad
    assert [s.messages[0].content for s in samples[:6]] == ["q0", "q1"] * 3
    assert len(samples) == 6 + 3 + 1


def test_dict_sources_validate_from_a_config_file(tiny_model_dir, tmp_path):
    from tuneforge.config.load import build_config

    cfg = build_config({"pretrained_model_name_or_path": "m",
                        "data_files": [{"path": "a.jsonl", "repeat": 2}, "b.jsonl"]})
    assert [(s.path, s.repeat) for s in cfg.data_sources] == [("a.jsonl", 2), ("b.jsonl", 1)]
    with pytest.raises(UserError, match="repeat"):
        build_config({"pretrained_model_name_or_path": "m", "data_files": [{"path": "a", "repeat": 0}]})


def test_skip_bad_lines_counts_them_and_keeps_the_rest(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0), {"conversation": [{"input": {"t": 1}, "output": "a"}]}, qa(2)])
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(UserError, match=r"d\.jsonl:2: conversation\[0\]\.input"):
        load_dataset_samples(tiny_config(tiny_model_dir, path))
    _, samples, bad = load_dataset_samples(tiny_config(tiny_model_dir, path, skip_bad_lines=True))
    assert len(samples) == 2 and len(bad) == 2 and "d.jsonl:4: invalid JSON" in bad[1]


def test_long_samples_are_truncated_or_dropped_and_counted(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0), qa(1, "word " * 200)])
    template = get_template("auto", tokenizer)
    _, stats = build_rows(tiny_config(tiny_model_dir, path, max_length=64), tokenizer, template)
    assert (stats.truncated, stats.dropped, stats.samples) == (1, 0, 2)
    _, stats = build_rows(tiny_config(tiny_model_dir, path, max_length=64, long_samples="drop"), tokenizer, template)
    assert (stats.truncated, stats.dropped) == (1, 1)


def test_check_dataset_reports_bad_lines_lengths_and_a_marked_sample(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0, "hello there"), {"messages": [{"role": "bot", "content": "x"}]}])
    report, bad = check_dataset(tiny_config(tiny_model_dir, path), tokenizer, get_template("auto", tokenizer))
    assert bad == 1 and "d.jsonl:2: messages[0].role: unknown role 'bot'" in report
    assert "tokens per sample: min" in report and "⟦hello there<|im_end|>⟧" in report


def test_log_dataset_shows_masked_text(tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(0, "hello there")])
    out = log_dataset(tiny_config(tiny_model_dir, path), tokenizer, get_template("auto", tokenizer),
                      show="masked_text", num=1)
    assert out.splitlines()[1].startswith("[") and out.endswith("hello there<|im_end|>[1 masked]")
    with pytest.raises(UserError, match="masked_text"):
        log_dataset(tiny_config(tiny_model_dir, path), tokenizer, get_template("auto", tokenizer), show="x", num=1)
    assert masked_text is not None
