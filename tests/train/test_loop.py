from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tuneforge.errors import UserError
from tuneforge.train.checkpoint import LAST, list_checkpoints, load_checkpoint
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import train


def losses(work_dir) -> list[float]:
    lines = (work_dir / "train_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_loss_goes_down(tiny_model_dir, identity_data, tmp_path, method):
    cfg = tiny_config(tiny_model_dir, identity_data, method=method, max_steps=12, save_steps=100,
                      lr=5e-2 if method != "full" else 1e-2)
    last = train(cfg, tmp_path / "w", RunOptions(progress=False))
    curve = losses(tmp_path / "w")
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 1.0, curve    # nats
    ckpt = load_checkpoint(last)
    assert ckpt.method == method and ckpt.step == 12
    if method != "full":  # only the adapter is saved, not the frozen base
        assert all("lora_" in k for k in ckpt.state_dict)


def test_checkpoints_rotate_and_last_checkpoint_points_to_newest(tiny_model_dir, identity_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=7, save_steps=2, save_total_limit=2,
                      evaluation_inputs=["你是谁？"], evaluation_freq=3, evaluation_max_new_tokens=4)
    work = tmp_path / "w"
    train(cfg, work, RunOptions(progress=False))
    assert [p.name for p in list_checkpoints(work)] == ["iter_6.pth", "iter_7.pth"]
    assert (work / LAST).read_text().strip().endswith("iter_7.pth")
    evals = (work / "eval_outputs.txt").read_text()
    assert "step 0" in evals and "step 3" in evals and "step 7" in evals and "Q: 你是谁？" in evals
    assert (work / "loss.png").stat().st_size > 1000


def test_resume_continues_exactly(tiny_model_dir, identity_data, tmp_path):
    """6 steps straight == 3 steps, stop, resume for the other 3: the same losses and weights, bit
    for bit (fp32; LoRA dropout on, so the random state must be restored too). The kill -9,
    SIGTERM and full-disk versions through the command line are in tests/test_cli.py."""
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=6, save_steps=3, lora_dropout=0.1)
    straight = load_checkpoint(train(cfg, tmp_path / "a", RunOptions(progress=False)))

    train(cfg, tmp_path / "b", RunOptions(progress=False))  # writes iter_3 and iter_6
    (tmp_path / "b" / "iter_6.pth").unlink()
    resumed = load_checkpoint(train(cfg, tmp_path / "b", RunOptions(resume=str(tmp_path / "b" / "iter_3.pth"),
                                                                    progress=False)))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # steps 4-6 logged once, by the resumed run
    assert len(losses(tmp_path / "a")) == 6
    for k, v in straight.state_dict.items():
        assert torch.equal(resumed.state_dict[k], v), k


def test_resume_with_other_micro_batches_per_step_warns(tiny_model_dir, identity_data, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=2, save_steps=2)  # accumulative_counts 2
    train(cfg, tmp_path / "w", RunOptions(progress=False))
    capsys.readouterr()
    more = tiny_config(tiny_model_dir, identity_data, max_steps=3, save_steps=3, accumulative_counts=3)
    train(more, tmp_path / "w", RunOptions(resume=True, progress=False))
    assert ("warning: the checkpoint trained 2 micro-batches per step (ranks x accumulative_counts), this run 3; "
            "the data order and the loss scale change from here on") in capsys.readouterr().out
    train(more, tmp_path / "w", RunOptions(resume=True, progress=False))  # from its own checkpoint: no warning
    assert "micro-batches per step" not in capsys.readouterr().out


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir, identity_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, identity_data)
    with pytest.raises(UserError, match="no checkpoint"):
        train(cfg, tmp_path / "empty", RunOptions(resume=True, progress=False))


def test_missing_data_file_is_named(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="nope.jsonl' not found"):
        train(cfg, tmp_path / "w", RunOptions(progress=False))


def test_a_non_finite_loss_skips_the_update_and_is_counted(tiny_model_dir, identity_data, tmp_path, monkeypatch):
    import tuneforge.train.objective as loop  # the SFT objective's loss

    real = loop.loss_sum
    calls = {"n": 0}

    def sometimes_nan(model, batch, *rest):
        calls["n"] += 1
        out = real(model, batch, *rest)
        return out * float("nan") if calls["n"] in (3, 4) else out  # step 2's two micro-batches

    monkeypatch.setattr(loop, "loss_sum", sometimes_nan)
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=4, save_steps=100)
    last = train(cfg, tmp_path / "w", RunOptions(progress=False))
    log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "skipped_update" in r] == [2]
    state = load_checkpoint(last).state_dict
    assert all(torch.isfinite(v).all() for v in state.values())


def test_repeated_non_finite_losses_stop_with_a_clear_message(tiny_model_dir, identity_data, tmp_path, monkeypatch):
    import tuneforge.train.objective as loop

    monkeypatch.setattr(loop, "loss_sum", lambda model, batch, *rest: torch.nn.functional.cross_entropy(
        torch.full((1, 3), float("nan"), requires_grad=True), torch.tensor([0]), reduction="sum"))
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=20, save_steps=100)
    with pytest.raises(UserError, match="non-finite loss or gradient; stopped.*last good checkpoint: none yet"):
        train(cfg, tmp_path / "w", RunOptions(progress=False))


def test_save_last_false_writes_only_the_save_steps_checkpoints(tiny_model_dir, identity_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=5, save_steps=2, save_last=False)
    assert train(cfg, tmp_path / "w", RunOptions(progress=False)).name == "iter_4.pth"
    assert [p.name for p in list_checkpoints(tmp_path / "w")] == ["iter_2.pth", "iter_4.pth"]
    none = tiny_config(tiny_model_dir, identity_data, max_steps=3, save_steps=10, save_last=False)
    assert train(none, tmp_path / "n", RunOptions(progress=False)) is None


def test_save_total_limit_minus_one_keeps_every_checkpoint(tiny_model_dir, identity_data, tmp_path):
    """-1 keeps all (docs/config.md; XTuner's max_keep_ckpts=-1): nothing is pruned, and the space
    check before training counts every checkpoint the run will write."""
    from tuneforge.train.checks import checkpoints_kept

    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=7, save_steps=1, save_total_limit=-1)
    assert checkpoints_kept(cfg, 7) == 7
    train(cfg, tmp_path / "w", RunOptions(progress=False))
    assert [p.name for p in list_checkpoints(tmp_path / "w")] == [f"iter_{i}.pth" for i in range(1, 8)]


def test_checkpoints_kept_counts_what_will_be_on_disk(tiny_model_dir, identity_data):
    from tuneforge.train.checks import checkpoints_kept

    def kept(steps: int, **kw) -> int:
        return checkpoints_kept(tiny_config(tiny_model_dir, identity_data, **kw), steps)

    assert kept(10, save_steps=3, save_total_limit=2) == 2
    assert kept(10, save_steps=100, save_total_limit=2) == 1  # the last one
    assert kept(10, save_steps=100, save_last=False) == 0  # nothing to make room for
    assert kept(1000, save_steps=10, save_total_limit=-1) == 100  # keep all: every one written
    assert kept(1005, save_steps=10, save_total_limit=-1) == 101  # and the last
    assert kept(1005, save_steps=10, save_total_limit=-1, save_last=False) == 100


def test_a_bf16_full_fine_tune_warns_that_small_updates_round_away(tiny_model_dir, identity_data, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, identity_data, method="full", dtype="bfloat16", max_steps=1, save_steps=100)
    train(cfg, tmp_path / "w", RunOptions(progress=False))
    assert "below bf16's precision" in capsys.readouterr().out
    fp32 = tiny_config(tiny_model_dir, identity_data, method="full", max_steps=1, save_steps=100)
    train(fp32, tmp_path / "f", RunOptions(progress=False))
    assert "bf16's precision" not in capsys.readouterr().out


def test_a_full_fine_tune_with_bf16_compute_does_not_lose_small_updates(tiny_model_dir, identity_data, tmp_path,
                                                                         bf16_gpu_dtypes):
    """At lr 2e-5 AdamW moves each weight by ~2e-5; the tiny model's weights (std 0.3) are spaced
    ~1e-3 apart in bf16, so bf16 weights keep almost none of it; fp32 master weights keep all."""
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    moved = {}
    for dtype in ("auto", "bfloat16"):
        cfg = tiny_config(tiny_model_dir, identity_data, method="full", dtype=dtype, lr=2e-5, max_steps=3,
                          save_steps=3)
        weights = load_checkpoint(train(cfg, tmp_path / dtype, RunOptions(progress=False))).state_dict
        changed = [(w.float() != start[n].to(w.dtype).float()).float().mean().item() for n, w in weights.items()]
        moved[dtype] = (sum(changed) / len(changed), {w.dtype for w in weights.values()})
    assert moved["auto"][1] == {torch.float32} and moved["auto"][0] > 0.95, moved
    assert moved["bfloat16"][1] == {torch.bfloat16} and moved["bfloat16"][0] < 0.2, moved


def test_the_memory_plan_counts_what_each_engine_leaves_on_a_gpu():
    from tuneforge.train import zero
    from tuneforge.train.engines.base import LocalEngine, Shares
    from tuneforge.train.engines.data_parallel import DataParallelEngine
    from tuneforge.train.engines.deepspeed import DeepSpeedEngine
    from tuneforge.train.engines.fsdp import FSDPEngine
    from tuneforge.train.optim import first_step_bytes
    from tuneforge.train.parallel import Ranks

    def ds(name: str, world: int) -> Shares:
        return DeepSpeedEngine(Ranks(0, world), zero.resolve(name)[0]).shares(cfg)

    cfg = tiny_config("m", "d.jsonl", method="full")
    bf16 = [torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))]
    # one GPU: bf16 gradients (2 bytes) and fp32 moments (8)
    assert first_step_bytes(bf16, cfg) == 10_000
    assert first_step_bytes(bf16, cfg, LocalEngine(Ranks()).shares(cfg)) == 10_000
    zero3 = ds("deepspeed_zero3", 2)
    assert zero3 == Shares(weights=0.5, gradients=0.5, optimizer=0.5, fp32_master=True)
    assert first_step_bytes(bf16, cfg, zero3) == 1000 + 6000  # half the gradients, moments and fp32 master
    zero1 = ds("deepspeed_zero1", 2)
    assert (zero1.weights, zero1.gradients, zero1.optimizer) == (1.0, 1.0, 0.5)
    assert first_step_bytes(bf16, cfg, ds("deepspeed_zero2_offload", 4)) == 500  # optimizer state on the CPU
    assert FSDPEngine(Ranks(0, 2), None).shares(cfg) == Shares(weights=0.5, gradients=0.5, optimizer=0.5)
    lora = tiny_config("m", "d.jsonl")
    assert FSDPEngine(Ranks(0, 2), None).shares(lora).weights == 1.0  # the frozen base stays whole under FSDP2
    assert DataParallelEngine(Ranks(0, 2)).shares(cfg) == Shares()  # every rank holds everything


@pytest.mark.parametrize("compile_layers", [True, False])
def test_the_compile_option_reaches_the_fast_path(tiny_model_dir, identity_data, tmp_path, monkeypatch, compile_layers):
    """RunOptions.compile (--no-compile, TUNEFORGE_COMPILE=0: tests/test_cli.py) switches the fused
    maths' torch.compile and the compiled decoder layers (fast.apply's Target) off together."""
    from tuneforge import fast
    from tuneforge.fast.compiled import allow_compiling, compiling_allowed
    from tuneforge.train.recipe import Recipe

    targets = []
    real = fast.apply
    monkeypatch.setattr(fast, "apply", lambda model, cfg, target, say: targets.append(target) or real(model, cfg,
                                                                                                      target, say))
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=1)
    try:
        Recipe(cfg, tmp_path / "w", RunOptions(progress=False, compile=compile_layers)).setup()
        assert compiling_allowed() is compile_layers
    finally:
        allow_compiling(True)
    assert [t.compile for t in targets] == [compile_layers]
