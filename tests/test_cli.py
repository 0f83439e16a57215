"""The command line as a user meets it: exit codes, one-line errors, no tracebacks; and a run as
a user stops it (kill -9, SIGTERM, Ctrl-C, a full disk) and resumes it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from waits import limit, tuneforge, wait_for

from tuneforge.train.checkpoint import LAST, list_checkpoints, load_checkpoint
from tuneforge.train.parallel import free_port


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


SLOW_SAVE = """
import sys, time
from pathlib import Path
import torch
from tuneforge.train.checkpoint import load_checkpoint, save_checkpoint

class Slow:  # pickled midway through torch.save: the file is open and incomplete meanwhile
    def __reduce__(self):
        print("writing", flush=True)
        while True:
            time.sleep(0.05)

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
    out = tmp_path / "writer.txt"
    with out.open("w") as f:
        writer = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(work)], stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "writing" in out.read_text(), 120, "the writer to start iter_6.pth", proc=writer)
        assert list(work.glob("iter_6.pth.tmp*"))  # the write is under way
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert not (work / "iter_6.pth").exists()
    assert Path((work / LAST).read_text().strip()).name == "iter_4.pth"

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
                             env={"NPROC_PER_NODE": "2", "PORT": str(free_port())}, seconds=120)
            assert proc.returncode == 1
            assert "GiB free" in proc.stderr and "rank 0 found no room" in proc.stderr
        assert not list((mount / "work").glob("iter_*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------ stopping a run and resuming it
#
# A run of 8 steps (2 micro-batches each, LoRA dropout on, so the random state matters) that
# checkpoints at steps 3 and 6 and at the end. The interrupted runs are held in step 5 (its second
# micro-batch, `HOLD_STEP_5`) until the signal the test sends has arrived, so that every signal
# lands in a known step whatever the machine's speed.

STEPS, SAVE_STEPS, HELD_STEP = 8, 3, 5

# Runs `tuneforge` as the command line does (cli.main), after a test's PATCH; `hold` keeps the
# step or the save it is called from going until N signals arrived (None: until killed).
RUN_PATCHED = """
import sys, time
from tuneforge import cli
cli._quiet_libraries()
import tuneforge.train.objective as objective
import tuneforge.train.recipe as recipe
import tuneforge.train.stop as stop
from tuneforge.train.checkpoint import Checkpoint

signals = []
_handle = stop.StopRequest._handle
def _counted(self, signum, frame):
    signals.append(signum)
    _handle(self, signum, frame)
stop.StopRequest._handle = _counted

def hold(what, until):
    print(f"holding {what}", flush=True)
    while until is None or len(signals) < until:
        time.sleep(0.02)

PATCH
sys.exit(cli.main())
"""

# step 5's second micro-batch is the 10th call of the loss
HOLD_STEP_5 = """
_loss, _calls = objective.loss_sum, [0]
def loss_sum(*args):
    _calls[0] += 1
    if _calls[0] == 10:
        hold("step 5", UNTIL)
    return _loss(*args)
objective.loss_sum = loss_sum  # the SFT objective's loss
"""

# the checkpoint of step 5 is held while torch.save pickles it (its temporary file open)
HOLD_SAVE_5 = """
_to_dict = Checkpoint.to_dict
class Held:
    def __reduce__(self):
        hold("the save of step 5", None)
        return (int, (0,))
def to_dict(self):
    return {**_to_dict(self), "held": Held()} if self.step == 5 else _to_dict(self)
Checkpoint.to_dict = to_dict
"""


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The run uninterrupted: its config (which every test here reuses) and its work dir."""
    from tuneforge.data.selfcog import write_self_cognition

    root = tmp_path_factory.mktemp("straight")
    data = root / "assistant.jsonl"
    write_self_cognition(data, "龙", "Long")
    cfg = write_config(root / "tiny.py", tiny_model_dir, data, max_steps=STEPS, save_steps=SAVE_STEPS,
                       save_total_limit=-1, lora_dropout=0.1, accumulative_counts=2, lr=1e-3, warmup_ratio=0.0)
    proc = tuneforge("train", str(cfg), "--work-dir", str(root / "work"))
    assert proc.returncode == 0, proc.stderr
    return cfg, root / "work"


@pytest.fixture
def started(tmp_path):
    """start(PATCH, *ARGS): `tuneforge ARGS` with PATCH applied; its output goes to files (read
    while it runs, with no pipe to block on). Whatever is still running at the end is killed."""
    procs = []

    def start(patch: str, *args: str) -> tuple[subprocess.Popen, Path, Path]:
        out, err = tmp_path / f"out{len(procs)}.txt", tmp_path / f"err{len(procs)}.txt"
        with out.open("w") as o, err.open("w") as e:
            procs.append(subprocess.Popen([sys.executable, "-c", RUN_PATCHED.replace("PATCH", patch), *args],
                                          stdout=o, stderr=e, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        return procs[-1], out, err

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def log_steps(work: Path) -> list[dict]:
    """The per-step records of train_log.jsonl (loss, lr, grad norm, tokens), without the clocks."""
    records = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")} for r in records if "loss" in r]


def assert_same_run(work: Path, reference: Path) -> None:
    """WORK's log and final checkpoint are bit for bit those of the uninterrupted run."""
    assert log_steps(work) == log_steps(reference)
    mine, theirs = load_checkpoint(work / f"iter_{STEPS}.pth"), load_checkpoint(reference / f"iter_{STEPS}.pth")
    assert mine.state_dict.keys() == theirs.state_dict.keys()
    for name, value in theirs.state_dict.items():
        assert torch.equal(mine.state_dict[name], value), name
    for i, moments in theirs.optimizer["state"].items():
        for k, v in moments.items():
            assert torch.equal(mine.optimizer["state"][i][k], v), (i, k)
    assert mine.rng["torch"].equal(theirs.rng["torch"])


def wait_exit(proc: subprocess.Popen, err: Path, seconds: float, what: str) -> str:
    wait_for(lambda: proc.poll() is not None, seconds, what)
    return err.read_text()


def test_kill_9_mid_step_then_resume_continues_exactly(straight, started, tmp_path):
    cfg, reference = straight
    work = tmp_path / "work"
    proc, out, _ = started(HOLD_STEP_5.replace("UNTIL", "None"), "train", str(cfg), "--work-dir", str(work))
    wait_for(lambda: "holding step 5" in out.read_text(), 300, "the run to reach step 5", proc=proc)
    assert Path((work / LAST).read_text().strip()).name == f"iter_{SAVE_STEPS}.pth"
    assert [r["step"] for r in log_steps(work)] == [1, 2, 3, 4]  # step 4 logged, not in any checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    resumed = tuneforge("train", str(cfg), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {SAVE_STEPS}" in resumed.stdout
    assert_same_run(work, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_saves_at_the_end_of_the_step_and_resume_continues_exactly(straight, started, tmp_path, sig):
    cfg, reference = straight
    work = tmp_path / "work"
    proc, out, err = started(HOLD_STEP_5.replace("UNTIL", "1"), "train", str(cfg), "--work-dir", str(work))
    wait_for(lambda: "holding step 5" in out.read_text(), 300, "the run to reach step 5", proc=proc)
    proc.send_signal(sig)
    stderr = wait_exit(proc, err, 120, f"the run to stop after {sig.name}")
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"tuneforge: error: stopped by {sig.name} at step {HELD_STEP}/{STEPS}; checkpoint {work / 'iter_5.pth'}. "
        "Continue with the same command plus --resume")
    assert f"{sig.name}: saving a checkpoint at the end of this step" in out.read_text()
    # the step under way finished and was saved; no later step ran
    assert [p.name for p in list_checkpoints(work)] == [f"iter_{SAVE_STEPS}.pth", f"iter_{HELD_STEP}.pth"]
    assert Path((work / LAST).read_text().strip()).name == f"iter_{HELD_STEP}.pth"
    assert [r["step"] for r in log_steps(work)] == list(range(1, HELD_STEP + 1))
    if sig == signal.SIGINT:
        return  # resuming from a stop's checkpoint is the same for either signal

    resumed = tuneforge("train", str(cfg), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {HELD_STEP}" in resumed.stdout
    assert_same_run(work, reference)


@pytest.mark.parametrize("during", ["step", "save"])
def test_a_second_ctrl_c_stops_at_once(straight, started, tmp_path, during):
    """The first Ctrl-C asks for a checkpoint at the end of the step; a second one, while that
    step or that save is still going (held here until killed), stops at once: no traceback, no
    checkpoint of the step, nothing half-written, the one before intact."""
    cfg, _ = straight
    work = tmp_path / "work"
    patch = HOLD_STEP_5.replace("UNTIL", "None") if during == "step" else HOLD_STEP_5.replace("UNTIL", "1") + HOLD_SAVE_5
    proc, out, err = started(patch, "train", str(cfg), "--work-dir", str(work))
    wait_for(lambda: "holding step 5" in out.read_text(), 300, "the run to reach step 5", proc=proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: saving a checkpoint at the end of this step" in out.read_text(), 60,
             "the first Ctrl-C to be acknowledged", proc=proc)
    if during == "save":
        wait_for(lambda: "holding the save of step 5" in out.read_text(), 60, "the save of step 5 to start", proc=proc)
        assert list(work.glob("iter_5.pth.tmp*"))  # the write is under way
    proc.send_signal(signal.SIGINT)
    stderr = wait_exit(proc, err, 30, "the second Ctrl-C to stop the run")
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "tuneforge: interrupted"
    assert sorted(p.name for p in work.glob("iter_*")) == [f"iter_{SAVE_STEPS}.pth"]
    assert Path((work / LAST).read_text().strip()).name == f"iter_{SAVE_STEPS}.pth"
    assert load_checkpoint(work).step == SAVE_STEPS


# the checkpoint of step 6 meets a full disk a few bytes into its temporary file
FULL_DISK_AT_6 = """
import contextlib, errno
import tuneforge.train.checkpoint as checkpoint
class Full:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        self.f.write(bytes(data)[:100])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self.f, name)
_atomic_write = checkpoint.atomic_write
@contextlib.contextmanager
def atomic_write(path, *args, **kw):
    with _atomic_write(path, *args, **kw) as f:
        yield Full(f) if path.name == "iter_6.pth" else f
checkpoint.atomic_write = atomic_write
"""


def test_a_full_disk_mid_run_stops_with_one_line_and_the_last_good_checkpoint_resumes(straight, started, tmp_path):
    cfg, reference = straight
    work = tmp_path / "work"
    proc, out, err = started(FULL_DISK_AT_6, "train", str(cfg), "--work-dir", str(work))
    stderr = wait_exit(proc, err, 300, "the run to stop at the full disk")
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines() == [
        f"tuneforge: error: could not write checkpoint {work / 'iter_6.pth'}: No space left on device; the last "
        f"good checkpoint is {work / 'iter_3.pth'}: free space, then run the same command with --resume"]
    assert sorted(p.name for p in work.glob("iter_*")) == ["iter_3.pth"]  # no half-written file
    assert Path((work / LAST).read_text().strip()).name == "iter_3.pth"
    assert [r["step"] for r in log_steps(work)] == list(range(1, 7))
    assert load_checkpoint(work / "iter_3.pth").step == 3

    resumed = tuneforge("train", str(cfg), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 3" in resumed.stdout
    assert_same_run(work, reference)


# ------------------------------------------------------------------ DeepSpeed, Slurm, compiling

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed (the [deepspeed] extra) is not installed")


@needs_deepspeed
@pytest.mark.parametrize(("settings", "preset", "message"), [
    (dict(method="qlora"), "deepspeed_zero3",
     "tuneforge: error: --deepspeed ZeRO-3 with method='qlora': 4-bit weights cannot be partitioned; "
     "use deepspeed_zero2 (what XTuner's QLoRA recipes use)"),
    (dict(optim_type="AdamW8bit"), "deepspeed_zero2",
     "tuneforge: error: --deepspeed with optim_type='AdamW8bit': DeepSpeed partitions AdamW's state itself; "
     "use optim_type='AdamW'"),
], ids=["qlora-zero3", "adamw8bit-zero2"])
def test_deepspeed_refuses_what_it_cannot_train_in_one_line(tiny_model_dir, identity_data, tmp_path, settings,
                                                            preset, message):
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data, max_steps=2, **settings)
    proc = tuneforge("train", str(cfg), "--deepspeed", preset, "--work-dir", str(tmp_path / "w"))
    assert_one_line_error(proc)
    assert proc.stderr.strip() == message
    assert not list((tmp_path / "w").glob("iter_*"))


def without_deepspeed(tmp_path: Path) -> dict:
    """An environment whose Python finds no DeepSpeed, as where the extra is not installed (also
    in the ranks torchrun starts: sitecustomize runs in every process)."""
    shim = tmp_path / "no_deepspeed"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None  # import fails, "
                                           "find_spec finds nothing\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])}
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=limit(60))
    assert "ModuleNotFoundError" in probe.stderr, probe.stderr  # the shim works
    return env


def test_without_deepspeed_one_process_trains_with_the_built_in_loop_and_two_ranks_stop(tiny_model_dir, identity_data,
                                                                                         tmp_path):
    env = without_deepspeed(tmp_path)
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data, max_steps=2)
    one = tuneforge("train", str(cfg), "--deepspeed", "deepspeed_zero2", "--work-dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr
    assert ("--deepspeed deepspeed_zero2: DeepSpeed is not installed; one process has nothing to shard, so the "
            "built-in loop trains with the same settings") in one.stdout
    assert "DeepSpeed ZeRO" not in one.stdout  # the model line names no engine: the one-process loop
    assert load_checkpoint(tmp_path / "one").step == 2

    two = tuneforge("train", str(cfg), "--deepspeed", "deepspeed_zero2", "--work-dir", str(tmp_path / "two"),
                    env={**env, "NPROC_PER_NODE": "2", "PORT": str(free_port())}, seconds=300)
    assert two.returncode == 1
    assert ("tuneforge: error: --deepspeed needs DeepSpeed: pip install 'tuneforge[deepspeed]' (or train with "
            "--fsdp, which needs nothing more than PyTorch)") in two.stderr.splitlines()
    assert "tuneforge: error: a rank failed (exit 1); its error is printed above" in two.stderr
    assert not list((tmp_path / "two").glob("iter_*"))


def slurm_free_env(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **extra}


def test_launcher_slurm_takes_the_ranks_from_slurm_or_says_to_use_srun(tiny_model_dir, identity_data, tmp_path):
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data, max_steps=2)
    args = [sys.executable, "-m", "tuneforge", "train", str(cfg), "--launcher", "slurm"]
    outside = subprocess.run([*args, "--work-dir", str(tmp_path / "none")], capture_output=True, text=True,
                             env=slurm_free_env(), timeout=limit(300))
    assert_one_line_error(outside)
    assert outside.stderr.strip() == ("tuneforge: error: --launcher slurm: SLURM_PROCID is not set; start the "
                                      "command with srun")
    # one task of `srun --ntasks=1`: it trains by itself (NPROC_PER_NODE, torchrun's, is not used)
    task = subprocess.run([*args, "--work-dir", str(tmp_path / "w")], capture_output=True, text=True,
                          env=slurm_free_env(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
                                             SLURM_JOB_NODELIST="node[07-09]", NPROC_PER_NODE="2"),
                          timeout=limit(300))
    assert task.returncode == 0, task.stderr
    assert "rank(s)" not in task.stdout  # one rank, not two
    assert load_checkpoint(tmp_path / "w").step == 2


def test_slurm_variables_become_the_rank_layout(monkeypatch):
    """What each task of `srun --ntasks=8` hands torch.distributed: its rank, the world, its GPU,
    and the first node as the rendezvous."""
    import torch.distributed as dist

    from tuneforge.train import parallel
    from tuneforge.train.launch import slurm_environment

    # a copy of the environment, put back afterwards: a world of 8 left behind would make the next
    # in-process run wait for 7 ranks
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                     "MASTER_PORT", "ADDR", "PORT")})
    os.environ.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[03-05,09]")
    slurm_environment()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="gpu03", MASTER_PORT="29500")
    joined = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel.init() == parallel.Ranks(rank=5, world=8, local_rank=1)
    assert joined == ["gloo"]


@pytest.mark.parametrize(("flags", "env", "compiles"), [
    ([], None, True),
    (["--no-compile"], None, False),
    ([], "0", False),  # the older spelling
    ([], "1", True),
    (["--no-compile"], "1", False),
])
def test_no_compile_and_tuneforge_compile_0_turn_compiling_off(tiny_model_dir, identity_data, tmp_path, monkeypatch,
                                                               flags, env, compiles):
    """What the command line hands the recipe (which passes it on to the fast path:
    tests/train/test_loop.py checks that part)."""
    import tuneforge.train.recipe as recipe
    from tuneforge import cli

    for name in ("NPROC_PER_NODE", "NNODES", "TUNEFORGE_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    if env is not None:
        monkeypatch.setenv("TUNEFORGE_COMPILE", env)
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)
    seen = []
    monkeypatch.setattr(recipe, "train", lambda cfg, work_dir, options: seen.append(options))
    cfg = write_config(tmp_path / "tiny.py", tiny_model_dir, identity_data)
    assert cli.main(["train", str(cfg), "--work-dir", str(tmp_path / "w"), *flags]) == 0
    assert [o.compile for o in seen] == [compiles]


def test_check_and_log_dataset_read_the_identity_preset_s_conversations_as_sft_data(tmp_path):
    """The SFT-then-ORPO preset's data_files are conversations it makes pairs from: both commands
    show them as the SFT samples they are, and say where the pairs come from."""
    cfg = "smollm2_135m_instruct_lora_assistant_dpo"
    for args in (["data", "self-cognition", "--name", "龙", "--name-en", "Long", "-o", "./data/assistant.jsonl"],
                 ["copy-cfg", cfg, "./"]):
        assert tuneforge(*args, cwd=tmp_path, seconds=120).returncode == 0
    check = tuneforge("check-dataset", f"./{cfg}_copy.py", cwd=tmp_path, seconds=120)
    assert check.returncode == 0, check.stderr
    assert "conversation; samples 645, bad lines 0" in check.stdout and "pairs from them" in check.stdout
    log = tuneforge("log-dataset", f"./{cfg}_copy.py", "--num", "1", cwd=tmp_path, seconds=120)
    assert log.returncode == 0 and "----- sample 0" in log.stdout, log.stderr
