"""Loss curves of every training engine on a CPU: the check that a change to the training code
changed no number.

Trains a tiny random Llama (the bundled tokenizer, fixed seed, fp32) for 50 steps through
`tuneforge train` with each engine: one process (LoRA and full), two ranks of data parallel,
FSDP2 and DeepSpeed ZeRO-2 (gloo). Writes each run's per-step loss and gradient norm to a JSON
file; with --compare, checks them against an earlier file to a relative 1e-6.

    python scripts/engine_curves.py --out before.json --keep ckpts/   # before a change
    python scripts/engine_curves.py --compare before.json             # after it

--keep copies each run's mid-run checkpoint (step 25) there, to test that checkpoints written
before a change resume after it (tests/train/test_engine_curves.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ENGINES = {
    "local-lora": (1, [], "lora"),
    "local-full": (1, [], "full"),
    "data-parallel": (2, [], "lora"),
    "fsdp2": (2, ["--fsdp"], "lora"),
    "zero2": (2, ["--deepspeed", "deepspeed_zero2"], "lora"),
}
STEPS, SAVE_AT = 50, 25


def make_model(path: Path) -> Path:
    """A 2-layer random Llama with the bundled tokenizer; the same weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import BUNDLED_MODEL, resolve_model

    tokenizer = load_tokenizer(resolve_model(BUNDLED_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_config(root: Path, model: Path, data: Path, method: str, steps: int = STEPS) -> Path:
    cfg = root / f"{method}.py"
    cfg.write_text(
        f"pretrained_model_name_or_path = {str(model)!r}\n"
        f"data_files = {str(data)!r}\nmethod = {method!r}\n"
        "lora_r = 8\nlora_alpha = 16\nlora_dropout = 0.0\nmax_length = 128\nbatch_size = 1\n"
        f"accumulative_counts = 2\nmax_steps = {steps}\nsave_steps = {SAVE_AT}\nsave_total_limit = -1\n"
        "lr = 1e-3\nwarmup_ratio = 0.0\ndtype = 'float32'\nreplay_general = False\n"
        "identity_guard = False\nevaluation_inputs = []\nseed = 0\n")
    return cfg


def train(cfg: Path, work: Path, nproc: int, extra: list[str], resume: Path | None = None) -> list[dict]:
    from tuneforge.train.parallel import free_port

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": str(nproc), "PORT": str(free_port())}
    cmd = [sys.executable, "-m", "tuneforge", "train", str(cfg), "--work-dir", str(work), "--no-progress", *extra]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    log = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in log if "loss" in r]


def setup(root: Path) -> tuple[Path, Path]:
    from tuneforge.data.selfcog import write_self_cognition

    model = make_model(root / "model")
    data = root / "assistant.jsonl"
    write_self_cognition(data, "龙", "Long")
    return model, data


def curves(root: Path, names: list[str], keep: Path | None = None) -> dict[str, list[dict]]:
    model, data = setup(root)
    out = {}
    for name in names:
        nproc, extra, method = ENGINES[name]
        work = root / name
        out[name] = train(write_config(root, model, data, method), work, nproc, extra)
        print(f"{name}: loss {out[name][0]['loss']:.6f} -> {out[name][-1]['loss']:.6f}", flush=True)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / f"iter_{SAVE_AT}.pth", keep / f"{name}.pth")
    return out


# The last decimal train_log.jsonl keeps of each (the recipe rounds loss to 6, grad_norm to 4). The
# curves were recorded on a CPU without AVX-512; on one with it (another BLAS kernel, another fp32
# summation order) a 50-step grad norm moved by one unit in its 4th decimal (8.5999 against 8.6):
# a value may move by one logged unit, a change of the code by more.
LOGGED_UNIT = {"loss": 1e-6, "grad_norm": 1e-4}


def differences(got: dict[str, list[dict]], want: dict[str, list[dict]], rel: float = 1e-6) -> list[str]:
    """Where GOT's curves leave WANT's by more than REL (relative) plus one logged unit, one line each."""
    bad = []
    for name, rows in want.items():
        have = {r["step"]: r for r in got.get(name, [])}
        for r in rows:
            h = have.get(r["step"])
            if h is None:
                bad.append(f"{name}: step {r['step']} missing")
                continue
            for key in ("loss", "grad_norm"):
                if abs(h[key] - r[key]) > rel * abs(r[key]) + LOGGED_UNIT[key] * 1.001:
                    bad.append(f"{name}: step {r['step']} {key} {h[key]} != {r[key]}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the curves here")
    ap.add_argument("--compare", type=Path, help="check against curves written earlier")
    ap.add_argument("--keep", type=Path, help="copy each run's step-25 checkpoint here")
    ap.add_argument("--engines", default=",".join(ENGINES))
    args = ap.parse_args()
    names = [n for n in args.engines.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        got = curves(Path(tmp), names, args.keep)
    if args.out:
        args.out.write_text(json.dumps(got, indent=1) + "\n")
    if args.compare:
        want = {k: v for k, v in json.loads(args.compare.read_text()).items() if k in names}
        bad = differences(got, want)
        print("\n".join(bad[:20]) if bad else f"identical to {args.compare} within 1e-6: {', '.join(want)}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
