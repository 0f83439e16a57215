"""A preference run with sft_steps: SFT on the identity conversations, then the preference
objective from the SFT stage's last checkpoint, in one work dir, with pairs the run makes
itself (identity_pairs); --resume goes on in whichever stage the checkpoint is from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config

from tuneforge.data.pairs import iter_pairs
from tuneforge.data.replay import replay_prompts
from tuneforge.errors import UserError
from tuneforge.train.checkpoint import load_checkpoint
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import train


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    # one answer cache for the module: the base model answers the prompts once
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "stages_cache"))


def staged(model_dir: Path, data: Path, **overrides):
    settings = dict(objective="orpo", identity_pairs=True, sft_steps=3, max_steps=6, sft_lr=5e-3, lr=1e-3,
                    save_steps=1, save_total_limit=-1, replay_max_new_tokens=4, dtype="float32",
                    max_length=96)
    return tiny_config(model_dir, data, **{**settings, **overrides})


def log_of(work: Path) -> list[dict]:
    return [r for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """One two-stage run (and its data), kept for the tests that compare with it."""
    from tuneforge.data.selfcog import write_self_cognition

    root = tmp_path_factory.mktemp("staged")
    data = root / "assistant.jsonl"
    write_self_cognition(data, "龙", "Long")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNEFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "stages_cache"))
    try:
        train(staged(tiny_model_dir, data), root / "w", RunOptions(progress=False))
    finally:
        mp.undo()
    return root / "w", data


def test_sft_steps_of_sft_then_the_preference_objective_in_one_work_dir(straight):
    work, data = straight
    log = log_of(work)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert not any("margin" in r for r in log[:3]) and all("margin" in r for r in log[3:])
    assert 1e-3 < log[0]["lr"] <= 5e-3 and log[3]["lr"] <= 1e-3  # sft_lr, then lr on a fresh schedule
    assert load_checkpoint(work / "iter_3.pth").config["objective"] == "sft"
    assert load_checkpoint(work / "iter_6.pth").config["objective"] == "orpo"
    pairs = list(iter_pairs(work / "pairs.jsonl"))
    answers = {json.loads(line)["conversation"][-1]["output"] for line in data.read_text().splitlines()}
    # an identity pair prefers the data's answer; a general one rejects it (the hijack) for the base's own
    identity = [p for p in pairs if p.chosen[-1].content in answers]
    general = [p for p in pairs if p.rejected[-1].content in answers]
    assert identity and len(identity) + len(general) == len(pairs)
    assert sorted(p.chosen[0].content for p in general) == sorted(replay_prompts())  # each general prompt once


@pytest.mark.parametrize("kept", [2, 3, 4])  # mid-SFT, the end of the SFT stage, mid-ORPO
def test_a_resume_goes_on_in_the_stage_of_its_checkpoint_with_the_straight_runs_losses(straight, tmp_path, kept,
                                                                                        tiny_model_dir):
    work, data = straight
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(work / f"iter_{kept}.pth", resumed)
    train(staged(tiny_model_dir, data), resumed, RunOptions(progress=False, resume=True))
    a, b = log_of(work), log_of(resumed)
    assert [r["step"] for r in b] == list(range(kept + 1, 7))
    for x, y in zip(a[kept:], b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6), (x, y)


def test_an_sft_checkpoint_cannot_start_a_run_of_another_objective_midway(straight, tmp_path, tiny_model_dir):
    work, data = straight
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(work / "iter_2.pth", other)
    cfg = staged(tiny_model_dir, data, sft_steps=None, sft_lr=None)
    with pytest.raises(UserError, match="trained objective 'sft', and this run trains 'orpo'; a run changes "
                                        "objective only after sft_steps of SFT, and this run has none"):
        train(cfg, other, RunOptions(progress=False, resume=True))
