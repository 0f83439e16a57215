"""Which checkpoint a work dir means, for `--resume` and for `convert pth_to_hf WORK_DIR` alike."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.templates import Template
from tuneforge.errors import UserError
from tuneforge.train.checkpoint import (
    LAST,
    Checkpoint,
    find_resume,
    load_checkpoint,
    save_checkpoint,
)


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint(step=step, state_dict={"w": torch.full((2,), float(step))}, optimizer={}, scheduler={},
                      rng={}, config={}, method="lora", template=Template("t", "{{ x }}", ("<e>",)))


def test_a_lost_marker_still_finds_the_newest_checkpoint_for_resume_and_convert(tmp_path):
    for step in (2, 4, 10):
        save_checkpoint(tmp_path, _ckpt(step), keep=0)
    (tmp_path / LAST).unlink()  # e.g. copied without it, or removed by hand
    assert find_resume(tmp_path, None).name == "iter_10.pth"  # by step, not by name order
    assert load_checkpoint(tmp_path).step == 10
    assert torch.equal(load_checkpoint(tmp_path).state_dict["w"], torch.full((2,), 10.0))


def test_a_marker_naming_a_pruned_file_falls_back_to_what_is_there(tmp_path):
    save_checkpoint(tmp_path, _ckpt(3), keep=0)
    (tmp_path / LAST).write_text(str(tmp_path / "iter_99.pth"))
    assert load_checkpoint(tmp_path).step == 3


def test_a_work_dir_without_checkpoints_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no last_checkpoint, no iter_"):
        load_checkpoint(tmp_path)
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        find_resume(tmp_path, None)
