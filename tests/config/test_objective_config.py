"""The preference settings: each belongs to an objective, and a wrong one is one clear line."""

from __future__ import annotations

import pytest

from tuneforge.config.load import build_config
from tuneforge.errors import UserError

BASE = dict(pretrained_model_name_or_path="m", data_files="d.jsonl")


@pytest.mark.parametrize(("extra", "message"), [
    (dict(objective="orpo", dpo_loss="ipo"), "config: dpo_loss applies to objective='dpo' only, and objective is 'orpo'"),
    (dict(objective="dpo", beta=0), r"config: beta must be > 0 \(got 0.0\)"),
    (dict(objective="dpo", beta=-1.0), "beta must be > 0"),
    (dict(objective="orpo", beta=0.1), "beta applies to .* \\(ORPO's weight is orpo_lambda\\)"),
    (dict(beta=0.1), "beta applies to objective='dpo' or 'simpo' only, and objective is 'sft'"),
    (dict(objective="simpo", simpo_gamma=-1), "simpo_gamma must be >= 0"),
    (dict(objective="dpo", simpo_gamma=0.5), "simpo_gamma applies to objective='simpo' only"),
    (dict(objective="simpo", orpo_lambda=0.5), "orpo_lambda applies to objective='orpo' only"),
    (dict(objective="orpo", orpo_lambda=0), "orpo_lambda must be > 0"),
    (dict(objective="kto"), "setting 'objective': Input should be 'sft', 'dpo', 'orpo' or 'simpo'"),
    (dict(objective="dpo", dpo_loss="exo"), "setting 'dpo_loss'"),
    (dict(objective="dpo", data_format="alpaca"), "preference pairs are detected by their keys"),
    (dict(identity_pairs=True), "identity_pairs makes preference pairs, and objective is 'sft'; set objective='orpo'"),
    (dict(objective="orpo", sft_steps=10, max_steps=20), "sft_steps .* needs identity_pairs=True"),
    (dict(objective="dpo", identity_pairs=True, sft_steps=10, max_steps=20), "use objective='orpo'"),
    (dict(objective="orpo", identity_pairs=True, sft_steps=10), r"counts within max_steps \(now None\)"),
    (dict(objective="orpo", identity_pairs=True, sft_steps=20, max_steps=20), "set max_steps above it"),
    (dict(objective="orpo", sft_lr=1e-3), "there is no SFT stage; set sft_steps or remove sft_lr"),
])
def test_a_misplaced_setting_is_one_line(extra, message):
    with pytest.raises(UserError, match=message) as err:
        build_config({**BASE, **extra})
    assert "\n" not in str(err.value) and "{" not in str(err.value)  # not the whole settings dict


def test_good_settings_pass():
    cfg = build_config({**BASE, "objective": "dpo", "dpo_loss": "hinge", "beta": 0.2})
    assert (cfg.objective, cfg.dpo_loss, cfg.beta, cfg.preference) == ("dpo", "hinge", 0.2, True)
    assert not build_config(BASE).preference
    assert build_config({**BASE, "objective": "simpo", "beta": 2.5, "simpo_gamma": 1.0}).simpo_gamma == 1.0


def test_identity_pairs_read_the_conversations_with_their_own_format():
    cfg = build_config({**BASE, "objective": "orpo", "identity_pairs": True, "data_format": "alpaca",
                        "sft_steps": 60, "max_steps": 90, "sft_lr": 1e-3})
    assert (cfg.sft_steps, cfg.max_steps, cfg.sft_lr, cfg.data_format) == (60, 90, 1e-3, "alpaca")
