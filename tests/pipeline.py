"""The README's personal-assistant pipeline (scripts/demo.sh steps 1-5) on the bundled model, run
once per test session: the end-to-end test and the GGUF tests read the same merged folder instead of
each training it again (one training is ~5 idle minutes on 2 cores, ~20 under load)."""

from __future__ import annotations

from pathlib import Path

from waits import tuneforge

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CFG = "smollm2_135m_instruct_lora_assistant"


def run(*args: str, cwd: Path, seconds: float = 600) -> str:
    """One command within a scaled limit (tests/waits.py): a guard against hanging, not a check."""
    proc = tuneforge(*args, seconds=seconds, cwd=cwd)
    assert proc.returncode == 0, f"tuneforge {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def assistant_pipeline(root: Path, cfg: str = CFG, checkpoint: str = "iter_60.pth") -> Path:
    """Identity data, copy-cfg, train (ZeRO-2), pth_to_hf and merge in ROOT, as the README lists them
    for the preset CFG, whose last checkpoint is CHECKPOINT; returns ROOT, which then holds
    work_dirs/assistTuner, hf/ and merged/."""
    run("data", "self-cognition", "--name", "龙", "--name-en", "Long", "-o", "./data/assistant.jsonl", cwd=root)
    run("copy-cfg", cfg, "./", cwd=root)
    # README: <= 5 min for the whole pipeline on 2 cores; a loaded machine took over 900 s to train
    run("train", f"./{cfg}_copy.py", "--deepspeed", "deepspeed_zero2", "--work-dir", "./work_dirs/assistTuner",
        cwd=root, seconds=1800)
    run("convert", "pth_to_hf", f"./{cfg}_copy.py", f"./work_dirs/assistTuner/{checkpoint}", "./hf", cwd=root)
    run("convert", "merge", BASE, "./hf", "./merged", "--max-shard-size", "2GB", cwd=root)
    return root
