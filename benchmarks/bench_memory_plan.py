"""The memory plan's estimate against the peak torch measures, on the recipe `tuneforge train`
runs: for each case, the plan's parts (weights and state, activations, head) beside what was
allocated at the end of the forward and at the peak of the first optimizer steps. Each case
runs in its own process so that its peak is its own.

    python benchmarks/bench_memory_plan.py                       # the default cases
    python benchmarks/bench_memory_plan.py --case small:8:8192   # SHAPE:LAYERS:SEQ[:BUDGET_GIB]

SHAPE: "small" (hidden 1024, the GPU tests' model) or "internlm2.5-7b" (its shapes, LAYERS of
them). BUDGET_GIB "half": room for about half the layers' activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_train  # noqa: E402  (the benchmarks' shared model and tokenizer makers)

bench_train.SHAPES.setdefault("small", dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                            num_key_value_heads=4, intermediate_size=2816, vocab_size=4096))
GIB = 1 << 30
DEFAULT_CASES = ["small:8:8192", "small:8:8192:half", "internlm2.5-7b:4:8192", "internlm2.5-7b:4:8192:half"]


def rows_for(vocab: int, seq: int, n: int) -> list:
    from tuneforge.data.pack import Row

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        out.append(Row(ids, list(ids), [i % 1024 for i in range(seq)]))
    return out


def measure(shape: str, layers: int, seq: int, budget: float | None, work: Path) -> dict:
    from tuneforge.config.load import build_config
    from tuneforge.fast.path import causal_lm
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import Recipe

    path = work / f"{shape}-{layers}"
    bench_train.make_model(path, shape, layers)
    run = bench_train.Run("tuneforge", "lora", "full", budget_gib=budget)
    cfg = build_config(bench_train.tuneforge_settings(run, path, 1e-4, seq, 3))
    recipe = Recipe(cfg, work / "run", RunOptions(progress=False))
    recipe.setup(rows=rows_for(bench_train.SHAPES[shape]["vocab_size"], seq, 3))
    plan = recipe.fast.memory
    at_forward_end: list[int] = []
    causal_lm(recipe.model).model.norm.register_forward_hook(
        lambda *_: at_forward_end.append(torch.cuda.memory_allocated()))
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for i in range(3):
        recipe.step(i)
    peak = torch.cuda.max_memory_allocated()
    activations = plan.need_gib - plan.fixed_gib
    return {"case": f"{shape}:{layers}:{seq}:{budget or 'whole'}", "plan": plan.describe(),
            "est_gib": round(plan.need_gib, 3), "est_fixed_gib": round(plan.fixed_gib, 3),
            "est_activations_gib": round(activations, 3), "allocated_before_gib": round(start / GIB, 3),
            "forward_end_gib": round(max(at_forward_end) / GIB, 3), "peak_gib": round(peak / GIB, 3),
            "error_pct": round(100 * (plan.need_gib * GIB - peak) / peak, 1)}


def worker(case: str) -> dict:
    shape, layers, seq, *rest = case.split(":")
    work = Path(tempfile.mkdtemp(prefix="plan-"))
    budget = None
    if rest and rest[0] == "half":
        whole = measure(shape, int(layers), int(seq), None, work)
        torch.cuda.empty_cache()
        budget = (whole["est_fixed_gib"] + 0.5 * whole["est_activations_gib"]) / 0.97
        sub = subprocess.run([sys.executable, __file__, "--worker", f"{shape}:{layers}:{seq}:{budget:.3f}"],
                             capture_output=True, text=True, check=True)
        return json.loads(sub.stdout.strip().splitlines()[-1])
    if rest:
        budget = float(rest[0])
    return measure(shape, int(layers), int(seq), budget, work)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs="*", default=DEFAULT_CASES)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for case in args.case:
        proc = subprocess.run([sys.executable, __file__, "--worker", case], capture_output=True, text=True)
        if proc.returncode:
            print(f"{case}: failed\n{proc.stderr[-2000:]}")
            continue
        print(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
