"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneforge.train.parallel import free_port


def tuneforge(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
              **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env} if env else None, **kw)


def write_config(path: Path, model: Path, data: Path, **settings) -> Path:
    """A config file for the tiny model: small LoRA, short rows, no replay or guard; SETTINGS
    add or override."""
    base = dict(lora_r=4, lora_alpha=8, max_length=128, batch_size=2, replay_general=False,
                identity_guard=False)
    lines = [f"pretrained_model_name_or_path = {str(model)!r}", f"data_files = {str(data)!r}"]
    lines += [f"{k} = {v!r}" for k, v in {**base, **settings}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    for n in needles:
        assert n in err, err


def test_list_and_copy_cfg(tmp_path):
    listed = tuneforge("list-cfg", "-p", "internlm2_5").stdout.split()
    assert listed == ["internlm2_5_chat_7b_full_alpaca_e3", "internlm2_5_chat_7b_lora_alpaca_e3",
                      "internlm2_5_chat_7b_qlora_alpaca_e3"]
    proc = tuneforge("copy-cfg", "internlm2_5_chat_7b_qlora_alpaca_e3", "./", cwd=tmp_path)
    assert proc.returncode == 0
    assert (tmp_path / "internlm2_5_chat_7b_qlora_alpaca_e3_copy.py").is_file()


def test_training_a_7b_copy_without_weights_names_the_missing_model(tmp_path):
    tuneforge("copy-cfg", "internlm2_5_chat_7b_qlora_alpaca_e3", "./", cwd=tmp_path)
    proc = tuneforge("train", "./internlm2_5_chat_7b_qlora_alpaca_e3_copy.py", "--deepspeed",
                     "deepspeed_zero2", "--work-dir", "./work_dirs/assistTuner", cwd=tmp_path)
    assert_one_line_error(proc, "internlm/internlm2_5-7b-chat", "not found")


def test_bad_config_key_and_bad_deepspeed(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("pretrained_model_name_or_path = 'x'\ndata_files = 'd'\nmax_lenght = 5\n")
    assert_one_line_error(tuneforge("train", str(cfg)), "max_lenght", "did you mean 'max_length'")
    cfg.write_text("pretrained_model_name_or_path = 'x'\ndata_files = 'd'\n")
    assert_one_line_error(tuneforge("train", str(cfg), "--deepspeed", "zero9"), "deepspeed_zero2")


def test_debug_shows_the_traceback(tmp_path):
    proc = tuneforge("--debug", "train", str(tmp_path / "missing.py"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_kill_9_after_a_checkpoint_then_resume_finishes(tiny_model_dir, identity_data, tmp_path):
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data, max_steps=150, save_steps=5,
                       save_total_limit=2, lora_dropout=0.1)
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg), "--work-dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (work / "last_checkpoint").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = Path((work / "last_checkpoint").read_text().strip())
    step = int(killed_at.stem.split("_")[1])
    if step >= 150:
        pytest.fail("the run finished before it could be killed; raise max_steps")

    resumed = tuneforge("train", str(cfg), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {step}" in resumed.stderr + resumed.stdout
    assert (work / "iter_150.pth").is_file()


def test_bad_data_stops_before_training_and_skip_bad_lines_trains_on_the_rest(tiny_model_dir, identity_data, tmp_path):
    bad_line = len(identity_data.read_text().splitlines()) + 1
    with identity_data.open("a") as f:
        f.write('{"conversation": [{"input": {"text": "q"}, "output": "a"}]}\n')
    cfg = tmp_path / "c.py"
    cfg.write_text(f"pretrained_model_name_or_path = {str(tiny_model_dir)!r}\n"
                   f"data_files = {str(identity_data)!r}\nmax_length = 128\nmax_steps = 2\n"
                   "replay_general = False\n")
    work = tmp_path / "w"
    proc = tuneforge("train", str(cfg), "--work-dir", str(work))
    assert_one_line_error(proc, f"assistant.jsonl:{bad_line}: conversation[0].input: expected a string")
    assert not list(work.glob("iter_*.pth"))
    proc = tuneforge("train", str(cfg), "--work-dir", str(work), "--skip-bad-lines")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 bad line" in proc.stderr + proc.stdout
    assert (work / "iter_2.pth").is_file()
    check = tuneforge("check-dataset", str(cfg))
    assert check.returncode == 1 and f"assistant.jsonl:{bad_line}" in check.stdout


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tiny_model_dir, identity_data, tmp_path):
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data, max_steps=400, save_steps=1000)
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg), "--work-dir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    log = work / "train_log.jsonl"
    while time.time() < deadline and proc.poll() is None and (
            not log.exists() or '"step": 3,' not in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "stopped by SIGTERM" in err and "--resume" in err
    saved = list(work.glob("iter_*.pth"))
    assert len(saved) == 1 and int(saved[0].stem.split("_")[1]) < 400
    resumed = tuneforge("train", str(cfg), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (work / "iter_400.pth").is_file()


SLOW_SAVE = """
import sys, time
from pathlib import Path
import torch
from tuneforge.train.checkpoint import load_checkpoint, save_checkpoint

class Slow:  # pickled midway through torch.save: the file is open and incomplete meanwhile
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(60)
        return (int, (0,))

work = Path(sys.argv[1])
ckpt = load_checkpoint(work / "iter_4.pth")
ckpt.step, ckpt.extra = 6, {"padding": torch.zeros(1 << 20), "slow": Slow()}
save_checkpoint(work, ckpt, keep=-1)
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write_resumes_from_the_one_before(tiny_model_dir, identity_data, tmp_path):
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data, max_steps=4, save_steps=2,
                       save_total_limit=-1)
    work = tmp_path / "work"
    assert tuneforge("train", str(cfg), "--work-dir", str(work)).returncode == 0
    writer = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(work)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    assert list(work.glob("iter_6.pth.tmp*"))  # the write is under way
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert not (work / "iter_6.pth").exists()
    assert Path((work / "last_checkpoint").read_text().strip()).name == "iter_4.pth"

    write_config(cfg, tiny_model_dir, identity_data, max_steps=6, save_steps=2, save_total_limit=-1)
    resumed = tuneforge("train", str(cfg), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 4" in resumed.stderr + resumed.stdout
    assert (work / "iter_6.pth").is_file()


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_work_dir_without_room_is_refused_before_training(tiny_model_dir, identity_data, tmp_path, nproc):
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data, method="full", max_steps=2)
    # a 1 MiB filesystem: the tiny model's full checkpoints (params + AdamW) do not fit
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        if nproc == 1:
            proc = tuneforge("train", str(cfg), "--work-dir", str(mount / "work"))
            assert_one_line_error(proc, "GiB free", "save_total_limit", "--work-dir")
        else:  # rank 0 finds it; every rank must stop, not wait for rank 0 in a collective
            proc = tuneforge("train", str(cfg), "--work-dir", str(mount / "work"),
                             env={"NPROC_PER_NODE": "2", "PORT": str(free_port())}, timeout=120)
            assert proc.returncode == 1
            assert "GiB free" in proc.stderr and "rank 0 found no room" in proc.stderr
        assert not list((mount / "work").glob("iter_*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)
