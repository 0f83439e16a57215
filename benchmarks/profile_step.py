"""Where a training step's GPU time goes: one bench_train.py configuration, a few timed steps,
then the PyTorch profiler's kernel table over two more.

    python benchmarks/profile_step.py --run tuneforge-lora-full-nobudget --layers 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="tuneforge-lora-full-nobudget", choices=sorted(bt.RUNS))
    ap.add_argument("--shape", default="internlm2.5-7b", choices=sorted(bt.SHAPES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=30, help="kernel table rows")
    ap.add_argument("--model", type=Path, default=Path("/tmp/tuneforge-bench-model"))
    args = ap.parse_args()
    run = bt.RUNS[args.run]
    path = args.model.with_name(f"{args.model.name}-{args.shape}-{args.layers}")
    bt.make_model(path, args.shape, args.layers)
    data = bt.batches_for(run, args.seq, bt.model_config(args.shape, args.layers).vocab_size, args.steps + 4)
    if run.engine == "baseline":
        by_samples = bt.baseline(run, path, 2e-4)

        def step(i: int) -> int:
            return by_samples(data[i])
    else:
        step = bt.tuneforge(run, path, 2e-4, args.seq, len(data), rows=bt.as_rows(data))
    step(0)
    step(1)
    torch.cuda.synchronize()
    t0 = time.time()
    tokens = sum(step(i) for i in range(2, 2 + args.steps))
    torch.cuda.synchronize()
    secs = (time.time() - t0) / args.steps
    print(f"{args.run}, {args.layers} layers: {secs * 1e3:.1f} ms/step, {tokens / args.steps / secs:,.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / bt.GIB:.2f} GiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(len(data) - 2, len(data)):
            step(i)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
