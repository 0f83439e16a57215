"""InternLM2 natively on a GPU: the fast path engages (varlen attention, fused SwiGLU, compiled
layers), packed samples stay apart under varlen attention, and the tutorial's commands run.

    python scripts/internlm2_gpu_check.py --out DIR
Builds a small random InternLM2.5 checkpoint in the original layout (tests/internlm2_checkpoint.py)
and exits non-zero on the first check that fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def tf(*args: str, cwd: Path, stdin: str | None = None) -> str:
    print("$ tuneforge", " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, input=stdin, text=True,
                          capture_output=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    if proc.returncode:
        sys.exit(f"tuneforge {args[0]} failed")
    return proc.stdout + proc.stderr


def packed_equals_alone(base: Path) -> None:
    import tempfile

    import torch
    from conftest import tiny_config

    from tuneforge.data.batching import collate, model_inputs
    from tuneforge.data.encode import IGNORE
    from tuneforge.data.pack import Row
    from tuneforge.train.loss import loss_sum
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import Recipe

    cfg = tiny_config(base, base / "config.json", max_length=512)
    device = torch.device("cuda")
    one = [Row(input_ids=[5, 6, 7], labels=[5, 6, 7], position_ids=[0, 1, 2])]
    recipe = Recipe(cfg, Path(tempfile.mkdtemp()), RunOptions(progress=False))
    recipe.setup(rows=one)  # as `tuneforge train` sets it up
    model, fast = recipe.model, recipe.fast
    print(fast.describe())
    assert fast.varlen and fast.mlps == 4, "fast path did not engage on InternLM2"
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (37, 120, 64)]
    # A sample's first token is never a target (as in the data: prompts are masked), so the last
    # token of one sample does not predict the first of the next.
    labels = [[IGNORE] + s[1:] for s in samples]
    rows = [Row(input_ids=s, labels=t, position_ids=list(range(len(s)))) for s, t in zip(samples, labels, strict=True)]
    packed = Row(input_ids=sum(samples, []), labels=sum(labels, []),
                 position_ids=sum((list(range(len(s))) for s in samples), []))

    def loss(row_list: list) -> float:
        batch = model_inputs(collate(row_list, 2), fast.varlen, device)
        with torch.no_grad():
            return loss_sum(model, batch, fast).item()

    together = loss([packed])
    apart = sum(loss([r]) for r in rows)
    print(f"packed row loss {together:.4f}, samples alone {apart:.4f}")
    assert abs(together - apart) <= 2e-3 * abs(apart), "packed samples see each other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from internlm2_checkpoint import make_internlm2

    base = make_internlm2(out / "internlm2_5-7b-chat", hidden=256, heads=4, kv_heads=2, layers=4,
                          max_position=4096, fmt="bin", shards=2)
    packed_equals_alone(base)

    tf("data", "self-cognition", "--name", "龙", "--name-en", "Long", "-o", "data/assistant.jsonl", cwd=out)
    small = ["max_steps=30", "max_length=512", "replay_general=False", "evaluation_max_new_tokens=8",
             "save_steps=30", "lr=1e-2"]
    for method in ("lora", "qlora"):
        preset = f"internlm2_5_chat_7b_{method}_alpaca_e3"
        tf("copy-cfg", preset, ".", cwd=out)
        copy = out / f"{preset}_copy.py"
        copy.write_text(copy.read_text().replace("'internlm/internlm2_5-7b-chat'", repr(str(base)))
                        .replace("'tatsu-lab/alpaca'", "'./data/assistant.jsonl'"))
        said = tf("train", copy.name, "--work-dir", f"work_{method}", "--cfg-options", *small, cwd=out)
        log = [json.loads(x) for x in (out / f"work_{method}/train_log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in log if "loss" in r]
        print(f"{method}: loss first {losses[0]:.3f} last {losses[-1]:.3f}")
        assert losses[-1] < losses[0] - 0.5, f"{method}: loss did not go down"
        if method == "lora":
            assert "varlen attention" in said and "compiled layers" in said, "fast path not fully on"
        tf("convert", "pth_to_hf", copy.name, f"work_{method}", f"hf_{method}", cwd=out)
        for layout in ("llama", "original"):
            tf("convert", "merge", str(base), f"hf_{method}", f"merged_{method}_{layout}", "--device", "auto",
               "--layout", layout, cwd=out)
        answered = tf("chat", f"merged_{method}_llama", "--max-new-tokens", "8", cwd=out, stdin="你是谁？\n")
        assert ">>> Assistant:" in answered
    print("INTERNLM2 GPU OK")


if __name__ == "__main__":
    main()
