"""Remote-code models: detected, refused without the flag in one line, and probed for what their
code does with packed rows and logits_to_keep."""

from __future__ import annotations

import pytest
import torch
from remote_code_checkpoint import make_remote_code_model

from tuneforge.errors import UserError
from tuneforge.models import probe
from tuneforge.models.load import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, bundled_path):
    return make_remote_code_model(tmp_path_factory.mktemp("remote"), bundled_path)


def test_a_remote_code_model_without_the_flag_is_one_line_naming_it(remote_dir):
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(remote_dir, CPU, "auto")


def test_a_package_the_remote_code_needs_is_named_with_the_install_command(tmp_path, bundled_path):
    path = make_remote_code_model(tmp_path / "m", bundled_path, needs_package="einops_is_not_installed")
    with pytest.raises(UserError, match="pip install einops_is_not_installed"):
        load_model(path, CPU, "auto", trust_remote_code=True)


def test_the_probe_tells_remote_code_that_mixes_packed_samples(remote_dir):
    model = load_model(remote_dir, CPU, "auto", trust_remote_code=True)
    assert probe.runs_own_code(model)
    assert probe.needs_own_code(remote_dir, trust_remote_code=True)
    assert not probe.accepts(model, "logits_to_keep")
    assert not probe.isolates_packed_samples(model)


def test_transformers_own_model_keeps_packed_samples_apart(tiny_model_dir):
    model = load_model(tiny_model_dir, CPU, "auto")
    assert not probe.runs_own_code(model) and not probe.needs_own_code(tiny_model_dir, True)
    assert probe.accepts(model, "logits_to_keep")
    assert probe.isolates_packed_samples(model)


def test_training_a_remote_code_model_unpacks_and_the_loss_falls(remote_dir, tmp_path, identity_data, capsys):
    from conftest import tiny_config

    from tuneforge.train.checkpoint import load_checkpoint
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import train

    cfg = tiny_config(remote_dir, identity_data, trust_remote_code=True, max_steps=8, lr=1e-2)
    last = train(cfg, tmp_path / "work", RunOptions(progress=False))
    out = capsys.readouterr()
    said = out.out + out.err
    assert "one sample per row" in said and "plain path" in said
    assert load_checkpoint(last).config["pack_to_max_length"] is False
    import json
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "work" / "train_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0]
