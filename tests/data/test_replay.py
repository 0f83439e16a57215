from __future__ import annotations

import json
import re

from conftest import tiny_config

from tuneforge.data.general_prompts import GENERAL_EN, GENERAL_ZH
from tuneforge.data.replay import (
    answer_prompts,
    prompts_for,
    read_answers,
    replay_path,
    replay_prompts,
    training_file,
)
from tuneforge.data.templates import get_template


def test_replay_is_the_base_models_own_answers_and_is_keyed_by_model(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.models.generate import Sampling, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    template = get_template("auto", tokenizer)
    cache = tmp_path / "answers.jsonl"
    answer_prompts(model, tokenizer, template, cache, replay_prompts(), max_new_tokens=6)
    out = training_file(cache, replay_prompts(), tmp_path / "r.jsonl")
    records = [json.loads(x) for x in out.read_text().splitlines()]
    prompts = [r["conversation"][0]["input"] for r in records]
    assert set(prompts) <= set(GENERAL_EN + GENERAL_ZH) and len(records) >= 150
    one = generate(model, tokenizer, template, [{"role": "user", "content": prompts[0]}], Sampling(max_new_tokens=6))
    assert records[0]["conversation"][0]["output"] == one  # batched == one by one, greedy
    assert replay_path(tiny_model_dir, template, "", 64) != replay_path(tiny_model_dir, template, "", 32)
    assert replay_path(tiny_model_dir, template, "", 64) != replay_path(tiny_model_dir, template, "sys", 64)


def test_a_short_run_answers_only_the_prompts_it_can_train_on_and_a_longer_one_adds_the_rest(tmp_path):
    every = replay_prompts()
    assert every == GENERAL_EN + GENERAL_ZH
    few, more = prompts_for(0.1), prompts_for(0.2)
    assert len(few) == 32 and len(more) == 63 and set(few) < set(more)  # a longer run's share holds a shorter one's
    assert {p in GENERAL_ZH for p in few} == {True, False}  # both languages
    assert few == [p for p in every if p in set(few)]  # in the shipped order
    assert prompts_for(1.0) == every and len(prompts_for(0.0)) == 1

    class Echo:  # a stand-in for generate_batch's model: answers each prompt with its length
        calls: list[list[str]] = []

    def fake_generate(model, tokenizer, template, chats, sampling, batch_size, with_finished, on_batch):
        asked = [c[-1]["content"] for c in chats]
        Echo.calls.append(asked)
        on_batch(len(chats), len(chats))
        return [str(len(p)) for p in asked], [True] * len(asked)

    import tuneforge.data.replay as replay

    real, replay.generate_batch = replay.generate_batch, fake_generate
    try:
        cache = tmp_path / "answers.jsonl"
        answer_prompts(None, None, None, cache, few, progress=False)
        later = replay.missing(cache, more)
        assert later == [p for p in more if p not in set(few)]  # only what the longer run adds
        answer_prompts(None, None, None, cache, later, progress=False)
    finally:
        replay.generate_batch = real
    assert Echo.calls == [few, later]
    assert set(read_answers(cache)) == set(more)


def _samples(row) -> list[tuple[int, ...]]:
    """A packed row cut back into its samples (positions restart at 0 at each one)."""
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row)]
    return [tuple(row.input_ids[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_training_with_replay_mixes_it_in(tiny_model_dir, identity_data, tmp_path, monkeypatch, capsys):
    """The replay file's samples are in the rows the run trains, each as often as the run repeats
    it, so that replay holds the share of the data a whole-epoch run gives it (replay_repeat x the
    314 prompts), and the steps the run took trained some of them."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    from collections import Counter

    from tuneforge.data.batching import micro_batches
    from tuneforge.data.cache import encode_sample
    from tuneforge.data.dataset import encode_settings
    from tuneforge.data.encode import IGNORE
    from tuneforge.data.formats import load_samples
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import Recipe

    cfg = tiny_config(tiny_model_dir, identity_data, replay_general=True, replay_max_new_tokens=4,
                      max_steps=2, identity_guard=True, evaluation_max_new_tokens=4)
    recipe = Recipe(cfg, tmp_path / "w", RunOptions(progress=False))
    recipe.setup()
    recipe.train()
    out = capsys.readouterr()
    said = out.out + out.err
    assert "data with replay:" in said
    # 2 steps of 2x2 rows, of the identity data's ~200 rows: a few of the 314 prompts
    chosen = re.search(r"replay: (\d+) of the 314 general prompts \(what 2 steps can train on\)", said)
    assert chosen, said
    n_prompts = int(chosen.group(1))
    replay_file = tmp_path / "w" / "replay.jsonl"
    trained = [json.loads(x)["conversation"][0]["input"] for x in replay_file.read_text().splitlines()]
    assert 1 <= len(trained) < 20 and set(trained) <= set(prompts_for(20 / 314))
    assert len(trained) == n_prompts  # the tiny model answered every prompt (none empty, none left out)

    # the replay samples, encoded as the run encodes its data, among the samples of the run's rows
    settings = encode_settings(recipe.cfg, recipe.template)
    replay = [tuple(encode_sample(s, recipe.tokenizer, settings).input_ids) for s in load_samples(replay_file)]
    in_rows = Counter(s for k in range(len(recipe.rows)) for s in _samples(recipe.rows[k]))
    repeat = max(1, round(cfg.replay_repeat * len(replay_prompts()) / n_prompts))
    assert repeat > 1  # a short run repeats its few prompts
    assert [in_rows[s] for s in replay] == [repeat] * len(replay)
    identity_samples = sum(in_rows.values()) - repeat * len(replay)
    assert identity_samples == len(load_samples(identity_data))  # and the identity data is all there
    # the share: as many replay samples as a whole epoch's (replay_repeat per prompt, all 314 of
    # them), up to the rounding of the repeat count (half a repeat of the chosen prompts)
    whole_epoch = cfg.replay_repeat * len(replay_prompts())
    assert abs(repeat * len(replay) - whole_epoch) <= len(replay) / 2, (repeat, len(replay))
    # and their answers are trained (labelled), not context
    row_of = {s: recipe.rows[k] for k in range(len(recipe.rows)) for s in _samples(recipe.rows[k])}
    assert all(any(t != IGNORE for t in _labels_of(row_of[s], s)) for s in replay)
    # the two steps the run took trained replay samples next to identity ones
    steps = [s for step in range(2) for batch in micro_batches(recipe.rows, cfg.batch_size,
                                                               cfg.accumulative_counts, cfg.seed, step)
             for row in batch for s in _samples(row)]
    assert any(s in set(replay) for s in steps) and not all(s in set(replay) for s in steps)
    log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in log)  # the guard asked its questions


def _labels_of(row, sample: tuple[int, ...]) -> list[int]:
    for a in (i for i, p in enumerate(row.position_ids) if p == 0):
        if tuple(row.input_ids[a:a + len(sample)]) == sample:
            return row.labels[a:a + len(sample)]
    raise AssertionError("sample not in row")


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

    # a whole epoch (about 50 steps of the tiny model): every prompt is answered
    cfg = tiny_config(tiny_model_dir, identity_data, method="qlora", replay_general=True,
                      replay_max_new_tokens=4, max_steps=None, max_epochs=1, save_steps=1000)
    train(cfg, tmp_path / "w", RunOptions(progress=True))
    out = capsys.readouterr()
    prompts = replay_prompts()
    assert f"replay: all {len(prompts)} general prompts (what the whole run can train on); the base " \
           f"model (unquantized: 4-bit is slow on a CPU) answers the {len(prompts)} not cached yet" in out.out
    assert "will take about" in out.out  # the estimate, once the first batch is done
    assert f"replay: 64/{len(prompts)} prompts [" in out.err and "left]" in out.err  # a line per batch
    records = [json.loads(x)["conversation"][0] for x in (tmp_path / "w" / "replay.jsonl").read_text().splitlines()]

    tok = load_tokenizer(tiny_model_dir)
    template = get_template(cfg.prompt_template, tok)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    cpu = torch.device("cpu")
    full = generate_batch(load_model(tiny_model_dir, cpu, torch.float32), tok, template, chats, Sampling(4), 64)
    four_bit = load_model(tiny_model_dir, cpu, torch.float32, load_in_4bit=True)
    for m in four_bit.modules():
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs on the first eval forward and
        # fails on layers narrower than its 64-wide blocks (the tiny model's are 32): its other CPU
        # path, the one CPUs without AVX512-BF16 take, computes the same 4-bit product
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    four = generate_batch(four_bit, tok, template, chats, Sampling(4), 64)
    expected = [(p, a) for p, a in zip(prompts, full, strict=True) if a.strip()]
    assert [(r["input"], r["output"]) for r in records] == expected
    assert full != four  # the check above tells the two apart
