from __future__ import annotations

import json

from conftest import tiny_config

from tuneforge.data.general_prompts import GENERAL_EN, GENERAL_ZH
from tuneforge.data.replay import build_replay, replay_path
from tuneforge.data.templates import get_template


def test_replay_is_the_base_models_own_answers_and_is_keyed_by_model(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.models.generate import Sampling, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    template = get_template("auto", tokenizer)
    out = build_replay(model, tokenizer, template, tmp_path / "r.jsonl", max_new_tokens=6)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    prompts = [r["conversation"][0]["input"] for r in records]
    assert set(prompts) <= set(GENERAL_EN + GENERAL_ZH) and len(records) >= 150
    one = generate(model, tokenizer, template, [{"role": "user", "content": prompts[0]}], Sampling(max_new_tokens=6))
    assert records[0]["conversation"][0]["output"] == one  # batched == one by one, greedy
    assert replay_path(tiny_model_dir, template, "", 64) != replay_path(tiny_model_dir, template, "", 32)
    assert replay_path(tiny_model_dir, template, "", 64) != replay_path(tiny_model_dir, template, "sys", 64)


def test_training_with_replay_mixes_it_in(tiny_model_dir, identity_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import train

    cfg = tiny_config(tiny_model_dir, identity_data, replay_general=True, replay_max_new_tokens=4,
                      max_steps=2, identity_guard=True, evaluation_max_new_tokens=4)
    train(cfg, tmp_path / "w", RunOptions(progress=False))
    out = capsys.readouterr()
    assert "data with replay:" in out.out + out.err
    assert list((tmp_path / "cache" / "replay").glob("*.jsonl"))
    log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in log)  # the guard asked its questions


def test_qlora_on_a_cpu_replays_the_unquantized_base_with_progress(tiny_model_dir, identity_data, tmp_path,
                                                                     monkeypatch, capsys):
    """The answers trained on are the base model's own (what the user trains from), not its 4-bit
    copy's; the run says how many prompts and how long, and shows each batch with an ETA."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    import torch

    from tuneforge.models.generate import Sampling, generate_batch
    from tuneforge.models.load import load_model, load_tokenizer
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import train

    cfg = tiny_config(tiny_model_dir, identity_data, method="qlora", replay_general=True,
                      replay_max_new_tokens=4, max_steps=1)
    train(cfg, tmp_path / "w", RunOptions(progress=True))
    out = capsys.readouterr()
    prompts = GENERAL_EN + GENERAL_ZH
    assert f"(unquantized: 4-bit is slow on a CPU) answers {len(prompts)} general prompts" in out.out
    assert "will take about" in out.out  # the estimate, once the first batch is done
    assert f"replay: 64/{len(prompts)} prompts [" in out.err and "left]" in out.err  # a line per batch
    records = [json.loads(x)["conversation"][0] for x in
               next((tmp_path / "cache" / "replay").glob("*.jsonl")).read_text().splitlines()]

    tok = load_tokenizer(tiny_model_dir)
    template = get_template(cfg.prompt_template, tok)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    cpu = torch.device("cpu")
    full = generate_batch(load_model(tiny_model_dir, cpu, torch.float32), tok, template, chats, Sampling(4), 64)
    four = generate_batch(load_model(tiny_model_dir, cpu, torch.float32, load_in_4bit=True), tok, template,
                          chats, Sampling(4), 64)
    expected = [(p, a) for p, a in zip(prompts, full, strict=True) if a.strip()]
    assert [(r["input"], r["output"]) for r in records] == expected
    assert full != four  # the check above tells the two apart
