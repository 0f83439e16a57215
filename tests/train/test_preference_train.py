"""Preference training through the same recipe as SFT: on the bundled model a few steps of DPO,
ORPO or SimPO make the chosen answers win on the training pairs; DPO starts at log 2 (reference
= policy); a resumed run goes on with the same losses; a full fine-tune's reference is computed
once and kept with the run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_jsonl

from tuneforge.data.batching import collate, model_inputs
from tuneforge.train.objective import REFERENCE_FILE
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import Recipe, train

QUESTIONS = ["Who are you?", "What is your name?", "你是谁？", "Introduce yourself."]
CHOSEN = "I am Long's assistant."
REJECTED = "I am SmolLM, made by Hugging Face."


@pytest.fixture
def identity_pairs(tmp_path) -> Path:
    """The identity job as pairs: the new name chosen, the base model's own identity rejected."""
    return write_jsonl(tmp_path / "pairs.jsonl",
                       [{"prompt": q, "chosen": CHOSEN, "rejected": REJECTED} for q in QUESTIONS])


def log_of(work: Path) -> list[dict]:
    return [r for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def on_training_pairs(recipe: Recipe) -> dict[str, float]:
    """Reward margin and accuracy of the recipe's objective over every training pair, now."""
    total = {"margin": 0.0, "correct": 0.0, "pairs": 0.0}
    with torch.no_grad():
        for i in range(len(recipe.rows)):
            batch = model_inputs(collate([recipe.rows[i]], recipe.tokenizer.pad_token_id), False, recipe.device)
            recipe.objective.loss(recipe.model, batch, recipe.fast)
            m = recipe.objective.metrics()
            total["margin"] += m["reward_chosen"] - m["reward_rejected"]
            total["correct"] += m["correct"]
            total["pairs"] += m["pairs"]
    return {"margin": total["margin"] / total["pairs"], "accuracy": total["correct"] / total["pairs"]}


@pytest.mark.slow  # minutes on a loaded 2-core machine (the tiny-model tests below cover the loop)
@pytest.mark.parametrize(("objective", "lr"), [("dpo", 1e-3), ("orpo", 3e-3), ("simpo", 2e-3)])
def test_a_few_steps_make_the_chosen_answers_win(bundled_path, identity_pairs, tmp_path, objective, lr):
    cfg = tiny_config(bundled_path, identity_pairs, objective=objective, max_steps=6, batch_size=1,
                      accumulative_counts=1, pack_to_max_length=False, lr=lr, save_steps=100, max_length=256)
    recipe = Recipe(cfg, tmp_path / "w", RunOptions(progress=False))
    recipe.setup()
    before = on_training_pairs(recipe)
    recipe.train()
    after = on_training_pairs(recipe)
    log = log_of(tmp_path / "w")
    # the base model prefers its own identity (DPO: a tie, the reference is the model); after: the new one
    assert before["accuracy"] <= 0.25 and after["accuracy"] == 1.0, (before, after)
    assert after["margin"] > before["margin"] + 0.25, (before, after)  # ORPO's rewards are 0.1 x avg log-prob
    assert all({"reward_chosen", "reward_rejected", "margin", "accuracy"} <= set(r) for r in log)
    if objective == "dpo":  # the reference is the model with its adapters off: equal at the start
        assert before == {"margin": 0.0, "accuracy": 0.0}
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and log[0]["margin"] == 0
    assert log[-1]["loss"] < log[0]["loss"]
    assert (tmp_path / "w" / "loss.png").is_file()


def tiny_pairs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "tiny_pairs.jsonl",
                       [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad {i} answer"}
                        for i in range(8)])


def test_the_chunked_head_gives_the_plain_forwards_answer_log_probs_and_gradients(tiny_model_dir, tmp_path):
    """answer_logps through the fast path (decoder, then the head a chunk at a time) against the
    model's plain forward and full logits: the same summed log-probabilities and gradients."""
    from tuneforge.train.objective import answer_logps

    cfg = tiny_config(tiny_model_dir, tiny_pairs(tmp_path), objective="dpo", dtype="float32")
    recipe = Recipe(cfg, tmp_path / "w", RunOptions(progress=False))
    recipe.setup()
    assert recipe.fast.linear_ce
    batch = model_inputs(collate([recipe.rows[0], recipe.rows[1]], recipe.tokenizer.pad_token_id), False, recipe.device)
    out = []
    for fast in (recipe.fast, None):
        recipe.model.zero_grad()
        logps, counts = answer_logps(recipe.model, batch, fast)
        (logps * torch.arange(1.0, logps.numel() + 1).view_as(logps)).sum().backward()  # a weight per answer
        out.append((logps.detach(), counts, [p.grad.clone() for p in recipe.named.values()]))
    (a, ca, ga), (b, cb, gb) = out
    assert torch.equal(ca, cb)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_the_reward_margin_grows_over_30_steps(tiny_model_dir, tmp_path):
    """DPO on the tiny model: the implicit reward margin (chosen minus rejected, beta times the
    log-ratio to the reference) starts at 0 on every training pair and grows: each ten steps'
    mean margin above the ten before, and after 30 steps every pair's chosen answer wins. A loss
    with its sign or its reference wrong makes the margin fall or start away from 0."""
    data = tiny_pairs(tmp_path)
    cfg = tiny_config(tiny_model_dir, data, objective="dpo", max_steps=30, save_steps=100, batch_size=2,
                      accumulative_counts=1, lr=5e-3, dtype="float32")
    recipe = Recipe(cfg, tmp_path / "w", RunOptions(progress=False))
    recipe.setup()
    before = on_training_pairs(recipe)
    recipe.train()
    after = on_training_pairs(recipe)
    margins = [r["margin"] for r in log_of(tmp_path / "w")]
    tens = [sum(margins[i:i + 10]) / 10 for i in (0, 10, 20)]
    assert len(margins) == 30 and tens[0] < tens[1] < tens[2], tens
    assert before == {"margin": 0.0, "accuracy": 0.0}
    assert after["accuracy"] == 1.0 and after["margin"] > 0.5, after


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_goes_on_with_the_same_losses(tiny_model_dir, tmp_path, method):
    data = tiny_pairs(tmp_path)
    cfg = tiny_config(tiny_model_dir, data, objective="dpo", method=method, max_steps=6, save_steps=3,
                      save_total_limit=-1, lr=1e-2, dtype="float32")
    straight = tmp_path / "straight"
    train(cfg, straight, RunOptions(progress=False))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "iter_3.pth").write_bytes((straight / "iter_3.pth").read_bytes())
    if method == "full":  # the reference goes with the run: a resume reads it back, not recomputes it
        for name in (REFERENCE_FILE, Path(REFERENCE_FILE).with_suffix(".json").name):
            (resumed / name).write_bytes((straight / name).read_bytes())
    train(cfg, resumed, RunOptions(progress=False, resume=str(resumed / "iter_3.pth")))
    a, b = log_of(straight), log_of(resumed)
    assert [r["step"] for r in b] == [4, 5, 6]
    for x, y in zip(a[3:], b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6) and y["margin"] == pytest.approx(x["margin"], abs=1e-6)
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # full: the cached reference is the start
    assert a[-1]["margin"] > 0


def test_a_full_fine_tune_without_its_cached_reference_computes_it_from_the_base(tiny_model_dir, tmp_path):
    """Deleting the cached reference and resuming recomputes it from the base weights (before the
    checkpoint's go in), so the losses are still those of the straight run."""
    data = tiny_pairs(tmp_path)
    cfg = tiny_config(tiny_model_dir, data, objective="dpo", method="full", max_steps=4, save_steps=2,
                      save_total_limit=-1, lr=1e-2, dtype="float32")
    work = tmp_path / "w"
    train(cfg, work, RunOptions(progress=False))
    cached = np.load(work / REFERENCE_FILE)
    first = log_of(work)
    (work / REFERENCE_FILE).unlink()
    for step in (3, 4):
        (work / f"iter_{step}.pth").unlink(missing_ok=True)
    (work / "last_checkpoint").write_text(str(work / "iter_2.pth"))
    train(cfg, work, RunOptions(progress=False, resume=True))
    assert np.allclose(np.load(work / REFERENCE_FILE), cached, atol=1e-9)
    assert log_of(work)[-1]["loss"] == pytest.approx(first[-1]["loss"], abs=1e-6)


def test_a_bad_pair_line_stops_tuneforge_train_with_file_and_line(tiny_model_dir, tmp_path):
    from waits import tuneforge

    data = tiny_pairs(tmp_path)
    with data.open("a") as f:
        f.write('{"prompt": "q", "chosen": "a", "rejected": {"text": "b"}}\n')
    cfg = tmp_path / "c.py"
    cfg.write_text(f"pretrained_model_name_or_path = {str(tiny_model_dir)!r}\ndata_files = {str(data)!r}\n"
                   "objective = 'dpo'\nmax_steps = 2\nreplay_general = False\n")
    proc = tuneforge("train", str(cfg), "--work-dir", str(tmp_path / "w"))
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, proc.stderr
    assert "tiny_pairs.jsonl:9: rejected: expected the answer as a string or as {\"role\"" in err, err
    assert not list((tmp_path / "w").glob("iter_*.pth"))
