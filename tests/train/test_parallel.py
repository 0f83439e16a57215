"""Two ranks (torchrun, gloo on CPU) train what one process with twice the accumulation trains,
and their checkpoints resume on one process (and one process's on two ranks).

How close is close enough. In fp32 every engine computes the sums one process computes, in
another order (over ranks, in partitions, with or without the fused kernels), so the two differ
by rounding alone, and the bounds below are the rounding of fp32 (unit roundoff u = 2^-24):
- a step's loss sums the losses of at most T = 256 labelled tokens (2 micro-batches of 128);
  reordering a sum of T terms moves it by up to about T u = 1.5e-5 of itself (LOSS_TOL), to
  which the log's rounding (6 decimals for the loss, 4 for the gradient norm) adds its own;
- a weight's update is lr * m / (sqrt(v) + eps): a gradient off by T u of itself moves the update
  by T u * lr at most, and storing the new fp32 weight rounds it by up to an ulp of the tensor's
  largest weight, in each run; so after S steps no weight differs by more than
  S * (2 ulp(max |w|) + lr T u) (`weight_bound`).
Measured (2026-12, this machine): losses equal to the log's last decimal, weights within 0.57 of
`weight_bound` (full fine-tune under ZeRO-3, which runs without the fused kernels) and 0.25 or
less for LoRA and QLoRA. A wrong update is far outside both: twice the lr, or a step that drops
the gradient of one of its two micro-batches, moves the loss by 30x to 470x LOSS_TOL and the
weights by 700x to 50,000x `weight_bound` (`test_the_bounds_see_a_wrong_update`).

bf16 compute (the full fine-tune's autocast under FSDP2): the two runs round different tensors to
bf16 (FSDP2 gathers every weight in bf16, autocast only the matmuls' inputs), so their losses
differ by bf16's rounding: BF16_LOSS_TOL = 2^-9, its unit roundoff (measured: 1.4e-4). The lr there
is high enough that twice of it moves the loss by 10x that (measured: 2e-2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from waits import limit

from tuneforge.train.checkpoint import load_checkpoint
from tuneforge.train.launch import first_host, torchrun_command
from tuneforge.train.parallel import free_port

U32 = 2.0 ** -24
TOKENS = 256  # labelled tokens of a step at most: batch_size 1 x 2 micro-batches x max_length 128
LOSS_TOL = TOKENS * U32
LOSS_LOG = 1e-6  # the log keeps 6 decimals of the loss
GRAD_LOG = 1e-4  # and 4 of the gradient norm
BF16_LOSS_TOL = 2.0 ** -9

# one process whose steps drop the gradient of their second micro-batch (its loss still counts)
DROP_SECOND_MICRO_BATCH = """
import tuneforge.train.engines.base as base
_backward, _calls = base.LocalEngine.backward, [0]
def backward(self, loss):
    _calls[0] += 1
    if _calls[0] % 2:
        _backward(self, loss)
base.LocalEngine.backward = backward
"""

# bf16 autocast on the CPU whether or not it has native bf16 (emulated it is slower, not different)
BF16_ON_CPU = """
import tuneforge.models.load as load
load.cpu_has_fast_bf16 = lambda: True
"""


def _config(tmp_path: Path, model: Path, data: Path, accumulation: int, name: str = "", **settings) -> Path:
    cfg = tmp_path / f"acc{accumulation}{name}.py"
    base = dict(pretrained_model_name_or_path=str(model), data_files=str(data), lora_r=8, lora_alpha=16,
                lora_dropout=0.0, max_length=128, batch_size=1, accumulative_counts=accumulation, max_steps=10,
                save_steps=5, save_total_limit=-1, lr=1e-3, warmup_ratio=0.0, dtype="float32",
                replay_general=False, identity_guard=False)
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in {**base, **settings}.items()))
    return cfg


def _train(cfg: Path, work: Path, nproc: int, *extra: str, patch: str | None = None) -> list[dict]:
    """`tuneforge train` on NPROC ranks; PATCH: code every process runs first (a sitecustomize)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": str(nproc), "PORT": str(free_port())}
    if patch:
        shim = work.parent / f"{work.name}-patch"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(patch)
        env["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(cfg), "--work-dir", str(work),
                           "--no-progress", *extra], capture_output=True, text=True, env=env, timeout=limit(900))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (work / "stdout.txt").write_text(proc.stdout)
    log = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    return [r for r in log if "loss" in r]


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed")
ENGINES = [
    pytest.param([], id="data-parallel"),
    pytest.param(["--fsdp"], id="fsdp2"),
    pytest.param(["--deepspeed", "deepspeed_zero2"], id="zero2", marks=needs_deepspeed),
    pytest.param(["--deepspeed", "deepspeed_zero3"], id="zero3", marks=needs_deepspeed),
]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One process, accumulation 2, the built-in loop: what every 2-rank engine must reproduce."""
    from tuneforge.data.selfcog import write_self_cognition

    root = tmp_path_factory.mktemp("parallel")
    data = root / "assistant.jsonl"
    write_self_cognition(data, "龙", "Long")
    one = _train(_config(root, tiny_model_dir, data, 2), root / "one", 1)
    assert [r["step"] for r in one] == list(range(1, 11))
    return root, data, one


def loss_excess(got: list[dict], want: list[dict], tol: float = LOSS_TOL, grad_norms: bool = True) -> float:
    """The worst step's loss (and gradient norm) difference, in units of what rounding allows:
    <= 1 is rounding."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        worst = max(worst, abs(a["loss"] - b["loss"]) / (tol * abs(b["loss"]) + LOSS_LOG))
        if grad_norms:
            worst = max(worst, abs(a["grad_norm"] - b["grad_norm"]) / (tol * b["grad_norm"] + GRAD_LOG))
    return worst


def ulp(x: float) -> float:
    """The spacing of fp32 numbers at X."""
    return 2.0 ** (math.floor(math.log2(x)) - 23) if x > 0 else 2.0 ** -149


def weight_bound(value: torch.Tensor, steps: int, lr: float) -> float:
    return steps * (2 * ulp(value.abs().max().item()) + lr * TOKENS * U32)


def weight_excess(got: Path, want: Path, steps: int, lr: float) -> float:
    """The worst tensor's largest weight difference between two checkpoints of step STEPS, in
    units of `weight_bound`: <= 1 is rounding."""
    mine, theirs = load_checkpoint(got).state_dict, load_checkpoint(want).state_dict
    assert set(mine) == set(theirs)
    return max((mine[n] - v).abs().max().item() / weight_bound(v, steps, lr) for n, v in theirs.items())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_match_one_process_and_resume_on_one(tiny_model_dir, reference, tmp_path, engine):
    root, data, one = reference
    two = _train(_config(tmp_path, tiny_model_dir, data, 1), tmp_path / "two", 2, *engine)
    assert loss_excess(two, one) <= 1
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert weight_excess(tmp_path / "two" / "iter_10.pth", root / "one" / "iter_10.pth", 10, 1e-3) <= 1

    # the engine's checkpoint converts like any other, to the adapter one process trained
    from tuneforge.convert.pth_to_hf import convert_checkpoint

    out = convert_checkpoint(tmp_path / "two" / "iter_10.pth", tmp_path / "hf", fp32=True)
    assert (out / "adapter_model.safetensors").is_file()

    # the 2-rank checkpoint of step 5 goes on in one process (twice the accumulation), no engine
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "iter_5.pth").write_bytes((tmp_path / "two" / "iter_5.pth").read_bytes())
    after = _train(_config(tmp_path, tiny_model_dir, data, 2), resumed, 1, "--resume", str(resumed / "iter_5.pth"))
    assert loss_excess(after, two[5:]) <= 1
    assert weight_excess(resumed / "iter_10.pth", tmp_path / "two" / "iter_10.pth", 10, 1e-3) <= 1

    # and the other way: the one-process checkpoint goes on with 2 ranks under the engine
    again = tmp_path / "again"
    again.mkdir()
    (again / "iter_5.pth").write_bytes((root / "one" / "iter_5.pth").read_bytes())
    after = _train(_config(tmp_path, tiny_model_dir, data, 1), again, 2, *engine, "--resume", str(again / "iter_5.pth"))
    assert loss_excess(after, one[5:]) <= 1
    assert weight_excess(again / "iter_10.pth", root / "one" / "iter_10.pth", 10, 1e-3) <= 1


@pytest.mark.slow
def test_the_bounds_see_a_wrong_update(tiny_model_dir, reference, tmp_path):
    """What the engine tests would see of an engine that doubled the lr or lost a micro-batch's
    gradient (one process stands in for it): far more than rounding, in losses and in weights."""
    root, data, one = reference
    doubled = _train(_config(tmp_path, tiny_model_dir, data, 2, lr=2e-3), tmp_path / "lr2", 1)
    dropped = _train(_config(tmp_path, tiny_model_dir, data, 2), tmp_path / "drop", 1, patch=DROP_SECOND_MICRO_BATCH)
    for name, log in (("lr2", doubled), ("drop", dropped)):
        assert log[0]["loss"] == one[0]["loss"]  # the first step's loss comes before any update
        assert loss_excess(log, one) > 10, name
        assert weight_excess(tmp_path / name / "iter_10.pth", root / "one" / "iter_10.pth", 10, 1e-3) > 100, name


@pytest.mark.slow
@pytest.mark.parametrize(("method", "engine"), [
    # what XTuner's tutorial runs
    pytest.param("qlora", ["--deepspeed", "deepspeed_zero2"], id="qlora-zero2", marks=needs_deepspeed),
    # the 4-bit base whole on every rank, the adapters sharded
    pytest.param("qlora", ["--fsdp"], id="qlora-fsdp2"),
    pytest.param("full", ["--deepspeed", "deepspeed_zero3"], id="full-zero3", marks=needs_deepspeed),
    pytest.param("full", ["--fsdp"], id="full-fsdp2"),
])
def test_qlora_and_full_on_two_ranks_match_one_process(tiny_model_dir, reference, tmp_path, method, engine):
    """3 steps; the full fine-tune at lr 1e-4, where twice the lr moves the third step's loss by
    30x LOSS_TOL and its weights by 700x `weight_bound` (measured). QLoRA's weights get 10x the
    bound: one adapter element (a near-zero gradient, which Adam's normalisation turns into a
    full-size step) ends 2.0x the bound apart with AVX2 kernels and 3.5x with AVX512 ones (an AMD
    EPYC, 2026-12-02), 18 ulps; twice the lr moves the adapters by ~1e-3 a step, 1,000x more."""
    _, data, _ = reference
    lr = 1e-4 if method == "full" else 1e-3
    runs = []
    for nproc, accumulation, flags in ((1, 2, []), (2, 1, engine)):
        cfg = _config(tmp_path, tiny_model_dir, data, accumulation, method=method, max_steps=3, lr=lr)
        runs.append(_train(cfg, tmp_path / f"{method}{nproc}", nproc, *flags))
    assert loss_excess(runs[1], runs[0]) <= 1
    assert weight_excess(tmp_path / f"{method}2" / "iter_3.pth", tmp_path / f"{method}1" / "iter_3.pth", 3, lr) \
        <= (10 if method == "qlora" else 1)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_lora_plus_groups_on_two_ranks_match_one_process_and_resume_either_way(tiny_model_dir, reference,
                                                                               tmp_path, engine):
    """LoRA+'s two parameter groups (B at 16x lr): the engines keep them apart, and their
    checkpoints (each group's lr and the state of its parameters) resume across engines."""
    _, data, _ = reference
    runs = {}
    for name, nproc, accumulation, flags in (("one", 1, 2, []), ("two", 2, 1, engine)):
        cfg = _config(tmp_path, tiny_model_dir, data, accumulation, name, lora_plus_ratio=16.0, max_steps=4,
                      save_steps=2)
        runs[name] = _train(cfg, tmp_path / name, nproc, *flags)
    assert loss_excess(runs["two"], runs["one"]) <= 1
    assert weight_excess(tmp_path / "two" / "iter_4.pth", tmp_path / "one" / "iter_4.pth", 4, 16e-3) <= 1
    lrs = [g["lr"] for g in load_checkpoint(tmp_path / "two" / "iter_2.pth").optimizer["param_groups"]]
    assert lrs[1] == pytest.approx(16 * lrs[0])
    for src, nproc, accumulation, flags in (("two", 1, 2, []), ("one", 2, 1, engine)):
        work = tmp_path / f"from-{src}"
        work.mkdir()
        (work / "iter_2.pth").write_bytes((tmp_path / src / "iter_2.pth").read_bytes())
        cfg = _config(tmp_path, tiny_model_dir, data, accumulation, f"r{src}", lora_plus_ratio=16.0, max_steps=4,
                      save_steps=2)
        after = _train(cfg, work, nproc, *flags, "--resume", str(work / "iter_2.pth"))
        assert loss_excess(after, runs[src][2:]) <= 1, src
        assert weight_excess(work / "iter_4.pth", tmp_path / src / "iter_4.pth", 4, 16e-3) <= 1, src


@pytest.mark.slow
def test_full_fsdp2_with_bf16_compute_keeps_fp32_master_weights(tiny_model_dir, reference, tmp_path):
    """dtype='auto' with bf16 compute: the sharded weights stay fp32 and are gathered in bf16
    (FSDP2's mixed precision), against one process computing in bf16 under autocast."""
    _, data, _ = reference
    runs = {}
    for name, nproc, accumulation, flags, lr in (("one", 1, 2, [], 3e-3), ("fsdp", 2, 1, ["--fsdp"], 3e-3),
                                                 ("lr2", 1, 2, [], 6e-3)):
        cfg = _config(tmp_path, tiny_model_dir, data, accumulation, name, method="full", max_steps=3, lr=lr,
                      dtype="auto")
        runs[name] = _train(cfg, tmp_path / name, nproc, *flags, patch=BF16_ON_CPU)
    for name in runs:
        assert "(torch.float32, bf16 autocast), full" in (tmp_path / name / "stdout.txt").read_text(), name
    # (not the gradient norms: FSDP2 computes the gradients in bf16 before it reduces them in fp32,
    # autocast hands fp32 weights fp32 gradients; measured 0.7% apart)
    assert loss_excess(runs["fsdp"], runs["one"], BF16_LOSS_TOL, grad_norms=False) <= 1
    assert loss_excess(runs["lr2"], runs["one"], BF16_LOSS_TOL, grad_norms=False) > 5  # it sees an update
    weights = load_checkpoint(tmp_path / "fsdp" / "iter_3.pth").state_dict
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_torchrun_only_when_asked(monkeypatch):
    for name in ("NPROC_PER_NODE", "NNODES", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_command(["train", "c.py"]) is None
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("ADDR", "10.0.0.7")
    cmd = torchrun_command(["train", "c.py"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.7"} <= set(cmd)
    assert cmd[-4:] == ["-m", "tuneforge", "train", "c.py"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a rank: no second launch
    assert torchrun_command(["train", "c.py"]) is None


def test_bad_launch_variables_are_one_clear_line(tmp_path):
    env = {**os.environ, "NPROC_PER_NODE": "two"}
    cfg = tmp_path / "c.py"
    cfg.write_text("pretrained_model_name_or_path = 'x'\ndata_files = 'd.jsonl'\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(cfg)], capture_output=True,
                          text=True, env=env, timeout=limit(300))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["tuneforge: error: NPROC_PER_NODE='two': expected a whole number"]


def test_slurm_first_host():
    assert first_host("gpu[03-05,09],cpu1") == "gpu03"
    assert first_host("node7") == "node7"
    assert first_host("a,b") == "a"
