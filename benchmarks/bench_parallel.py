"""Training on several GPUs: the real `tuneforge train` command with NPROC_PER_NODE=1 and =N, for
each engine, on the 7B-shaped random model of bench_train.py, in one run. Writes the "parallel"
part of benchmarks/results.json and its table in benchmarks/RESULTS.md.

    python benchmarks/bench_parallel.py --gpus 2 --tokenizer DIR     # everything
    python benchmarks/bench_parallel.py --gpus 2 --tokenizer DIR --runs zero2-lora-1,zero2-lora-2

DIR holds a tokenizer (tokenizer.json, tokenizer_config.json, a chat template): the benchmark model
is random, so any tokenizer whose ids fit its 92,544-word vocabulary will do; we use the bundled
SmolLM2's. The data is synthetic alpaca records of ~1,000 tokens packed into 4,096-token rows.

tokens/s is from the training log: all ranks' tokens over the wall time of the steps after
--warmup, summed (single steps vary by +-15% with the rows' lengths). Each rank trains accumulative_counts rows of --seq
tokens per step, so N ranks train N times the tokens of one per step (weak scaling, the way a
user adds GPUs). Scaling = tokens/s on N GPUs / tokens/s on one, same engine.

fsdp-lora-1xN runs N unrelated one-GPU trainings at once, one per GPU, and sums them: what the host
gives N GPUs that never talk to each other (they share its CPUs, memory and power), the ceiling
for any data-parallel engine here. --profile adds `tuneforge train --profile`: the table then
says how much of each step rank 0's GPU ran kernels (below 100%: it waited for the CPU side).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import make_model  # noqa: E402  (same model, same shapes)

WORDS = ["the", "model", "learns", "to", "answer", "questions", "about", "history", "science", "music", "cooking", "travel", "sport", "language", "numbers", "weather", "animals", "plants", "cities", "rivers", "mountains", "stories", "letters", "code", "tables", "lists", "reasons", "steps", "examples", "people", "friends", "water", "light", "sound", "time", "space"]


@dataclass(frozen=True)
class Run:
    engine: str  # "zero2" | "zero3" | "fsdp" | "builtin"
    method: str  # "lora" | "full"
    gpus: int
    copies: int = 1  # >1: that many independent one-GPU runs at once, one per GPU

    @property
    def flags(self) -> list[str]:
        return {"zero2": ["--deepspeed", "deepspeed_zero2"], "zero3": ["--deepspeed", "deepspeed_zero3"],
                "fsdp": ["--fsdp"], "builtin": []}[self.engine]


def runs_for(n: int) -> dict[str, Run]:
    out = {}
    for engine in ("zero2", "fsdp", "builtin"):
        for gpus in (1, n):
            out[f"{engine}-lora-{gpus}"] = Run(engine, "lora", gpus)
    for engine in ("zero3", "fsdp"):
        out[f"{engine}-full-{n}"] = Run(engine, "full", n)
    # The host's own ceiling: N unrelated one-GPU runs at the same time share its CPUs, memory and
    # power, with no communication between them. Data parallelism cannot beat their sum.
    out[f"fsdp-lora-1x{n}"] = Run("fsdp", "lora", 1, copies=n)
    return out


def write_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": " ".join(rng.choices(WORDS, k=100)),
                                "input": "", "output": " ".join(rng.choices(WORDS, k=700))}) + "\n")


def write_config(path: Path, model: Path, data: Path, run: Run, args: argparse.Namespace) -> None:
    path.write_text(
        f"pretrained_model_name_or_path = {str(model)!r}\ndata_files = {str(data)!r}\n"
        f"method = {run.method!r}\nlora_r = 64\nlora_alpha = 16\nlora_dropout = 0.0\n"
        f"max_length = {args.seq}\npack_to_max_length = True\nbatch_size = 1\n"
        f"accumulative_counts = {args.accumulation}\nmax_steps = {args.steps}\n"
        f"lr = {2e-5 if run.method == 'full' else 2e-4}\nwarmup_ratio = 0.0\n"
        "save_steps = 100000\nsave_last = False\nreplay_general = False\nidentity_guard = False\n"
        "evaluation_inputs = []\n")


def train(name: str, run: Run, args: argparse.Namespace) -> dict | None:
    cfg = args.scratch / f"{name}.py"
    write_config(cfg, args.model, args.data, run, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": str(run.gpus)}
    works, procs = [], []
    t0 = time.time()
    for copy in range(run.copies):
        work = args.scratch / (name if run.copies == 1 else f"{name}.{copy}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if run.copies > 1:
            env = {**env, "CUDA_VISIBLE_DEVICES": str(copy)}
        # its own process group, so that a run that hangs takes its ranks with it when it is killed
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tuneforge", "train", str(cfg), "--work-dir", str(work), "--no-progress",
             *run.flags, *(["--profile"] if args.profile else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True))
        works.append(work)
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1, args.timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            print(f"  {name}: no result in {args.timeout}s\n" + proc.communicate()[1][-3000:], flush=True)
            return None
    wall = time.time() - t0
    rows = []
    for proc, work, (stdout, stderr) in zip(procs, works, outputs, strict=True):
        (work / "stderr.txt").write_text(stderr)  # compiler warnings, NCCL messages
        said = [x for x in stdout.splitlines() + stderr.splitlines() if x.startswith("[tuneforge]")]
        for line in said:
            print("  " + line, flush=True)
        log = work / "train_log.jsonl"
        records = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        steps = [r for r in records if "tokens_per_s" in r]
        if proc.returncode != 0 or len(steps) < args.steps:
            print(f"  {name} failed (exit {proc.returncode}):\n" + stderr[-4000:], flush=True)
            return None
        timed = steps[args.warmup:]
        seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
        rows.append({"tokens_per_s": sum(r["tokens"] for r in timed) / seconds, "steps": steps,
                     "profile": next((r["profile"] for r in records if "profile" in r), None),
                     "setup": [x[12:] for x in said if "model:" in x or "recompute" in x or "fast path" in x]})
    steps = rows[0]["steps"]
    return {"run": name, "engine": run.engine, "method": run.method, "gpus": run.gpus * run.copies,
            "copies": run.copies, "steps": args.steps, "date": datetime.date.today().isoformat(),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in rows), 1),
            "per_copy_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rows] if run.copies > 1 else None,
            "tokens_per_step": steps[args.warmup]["tokens"],
            "peak_gib": max((r.get("peak_gib") or 0) for r in steps) or None,
            "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
            "step_tokens_per_s": [r["tokens_per_s"] for r in steps], "wall_s": round(wall, 1),
            "profile": rows[0]["profile"], "setup": rows[0]["setup"]}


def write_results(rows: list[dict], meta: dict, out: Path) -> None:
    # the same engine and method on one GPU, by its run name (not other one-GPU rows kept by hand)
    one = {(r["engine"], r["method"]): r["tokens_per_s"] for r in rows
           if r["run"] == f"{r['engine']}-{r['method']}-1"}
    for r in rows:
        base = one.get((r["engine"], r["method"]))
        r["scaling"] = round(r["tokens_per_s"] / base, 3) if base and r["gpus"] > 1 else None
        busy = r.get("profile")
        r["gpu_busy"] = f"{100 * busy['gpu_ms'] / busy['wall_ms']:.0f}%" if busy and busy["gpu_ms"] else None
    results = out / "results.json"
    payload = json.loads(results.read_text()) if results.is_file() else {}
    payload["parallel"] = {"meta": meta, "runs": rows}
    results.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"Measured {meta['date']} on {meta['gpus']}x {meta['gpu']}, model shape internlm2.5-7b "
             f"(random weights), {meta['seq']}-token packed rows, {meta['accumulation']} rows per rank per "
             f"step, tokens over time of steps {meta['warmup'] + 1}-{meta['steps']}; torch {meta['torch']}, "
             f"deepspeed {meta['deepspeed']}.", f"Command: `{meta['command']}`", "",
             "| run | engine | method | GPUs | tokens/s | scaling vs 1 GPU | GPU busy (rank 0) | peak GiB (rank 0) "
             "| loss first -> last | steps | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['engine']} | {r['method']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | "
                     f"{str(r['scaling']) + 'x' if r['scaling'] else ''} | {r.get('gpu_busy') or ''} | "
                     f"{r['peak_gib'] or ''} | {' -> '.join(f'{x:.3f}' for x in r.get('loss_first_last', []))} | "
                     f"{r.get('steps', '')} | {r.get('date', '')} |")
    md = out / "RESULTS.md"
    text = md.read_text() if md.is_file() else "# Benchmark results\n"
    if "<!-- parallel:begin -->" not in text:
        text += "\n<!-- parallel:begin -->\n<!-- parallel:end -->\n"
    head, rest = text.split("<!-- parallel:begin -->", 1)
    tail = rest.split("<!-- parallel:end -->", 1)[1]
    md.write_text(head + "<!-- parallel:begin -->\n" + "\n".join(lines) + "\n<!-- parallel:end -->" + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with a tokenizer (see above)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s (compilation)")
    ap.add_argument("--runs", default="", help="comma-separated names (default: all)")
    ap.add_argument("--model", type=Path, default=Path("/tmp/tuneforge-bench-model-internlm2.5-7b-all"))
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/tuneforge-bench-parallel"))
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--profile", action="store_true",
                    help="pass --profile: how busy each run keeps its GPU (steps 1-5 are then left out of tokens/s)")
    args = ap.parse_args()
    if args.profile:  # the profiler slows steps 3-5
        args.warmup = max(args.warmup, 5)
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        sys.exit(f"bench_parallel.py needs {args.gpus} CUDA GPUs")
    import deepspeed

    plan = runs_for(args.gpus)
    names = [n.strip() for n in args.runs.split(",") if n.strip()] or list(plan)
    make_model(args.model, "internlm2.5-7b", None)
    torch.cuda.empty_cache()  # the ranks need GPU 0 whole (a first run here saw 28 GiB still held)
    for f in args.tokenizer.iterdir():  # the random model speaks through this tokenizer
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, args.model / f.name)
    args.scratch.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = args.scratch / "data.jsonl"
    write_data(args.data, 64 * args.accumulation * args.gpus)
    meta = {"gpu": torch.cuda.get_device_name(), "gpus": args.gpus, "date": datetime.date.today().isoformat(),
            "seq": args.seq, "accumulation": args.accumulation, "steps": args.steps, "warmup": args.warmup,
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "command": "python benchmarks/bench_parallel.py " + " ".join(sys.argv[1:])}
    out_file = args.out / "results.json"
    old = json.loads(out_file.read_text()).get("parallel", {}) if out_file.is_file() else {}
    rows = [r for r in old.get("runs", []) if r["run"] not in names and old["meta"]["gpus"] == args.gpus]
    for name in names:
        t0 = time.time()
        r = train(name, plan[name], args)
        if r:
            rows = [x for x in rows if x["run"] != name] + [r]
            rows.sort(key=lambda x: list(plan).index(x["run"]) if x["run"] in plan else 99)
            print(f"{name}: {r['tokens_per_s']:,.0f} tok/s, peak {r['peak_gib']} GiB [{time.time() - t0:.0f}s]",
                  flush=True)
            write_results(rows, meta, args.out)  # a cut-off run still leaves what it measured
    print((args.out / "RESULTS.md").read_text().split("<!-- parallel:begin -->")[-1])


if __name__ == "__main__":
    main()
