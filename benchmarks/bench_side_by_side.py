"""Side by side on one GPU, in one run: plain transformers + peft, the same with Liger's kernels,
Unsloth, and tuneforge (through the recipe `tuneforge train` runs, whole GPU and under memory
caps), on the same random-initialised 7B-shaped model, the same token rows and the same settings
(LoRA r 64 / alpha 16 / dropout 0 on all seven projections, AdamW lr 2e-4, clipping 1.0). Each row
runs in its own process, so that its peak memory is its own and a row that crashes (a peer that
does not import, an out-of-memory) is recorded as that row's error while the others still run.

    python benchmarks/bench_side_by_side.py --out DIR            # every row, InternLM2.5-7B shapes
    python benchmarks/bench_side_by_side.py --tiny --out DIR     # a CPU smoke run, tiny shape
    python benchmarks/bench_side_by_side.py --render DIR/results.json   # into benchmarks/

Workloads: "full" is one row of exactly --seq tokens per step; "mix" is the SFT-like length mix of
bench_train.py (log-normal lengths, median 300): the peers pad each batch of 4 samples to its
longest, tuneforge packs samples into --seq-token rows. tokens/s counts trained (non-padding)
tokens. Peak memory: torch.cuda.max_memory_allocated and max_memory_reserved of the row's process.
Rows marked for profiling run one more step under torch.profiler after the timed ones and say
where its GPU time went: by phase of the step (forward, backward, optimizer, ...) and by kind of
kernel (matmul, attention, 4-bit dequantisation, compiled elementwise, copies).

The peers are not installed with tuneforge; on the lent GPU machine they travel as one folder put
on PYTHONPATH (benchmarks/peer_site.sh builds it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
GIB = 1 << 30
MARK = "side-by-side"


@dataclass(frozen=True)
class Row:
    engine: str  # "hf" | "liger" | "unsloth" | "tuneforge"
    mode: str  # "lora" | "qlora"
    workload: str  # "full" | "mix"
    budget_gib: float | None = None  # tuneforge's memory_budget_gib
    optim: str = "AdamW"
    profile: bool = False
    note: str = ""
    gpu_inputs: bool = False  # tuneforge: the plan keeps recomputed layers' inputs on the GPU (offloads none
    #                           unless every layer is recomputed: the policy before 2026-12-03), an A/B of the plan


# In order of what the comparison needs most: a run cut short by its deadline still has these.
ROWS = {
    "tuneforge-lora-full": Row("tuneforge", "lora", "full", profile=True, note="whole GPU"),
    "unsloth-lora-full": Row("unsloth", "lora", "full", note="use_gradient_checkpointing='unsloth'"),
    "tuneforge-lora-full-18gib": Row("tuneforge", "lora", "full", budget_gib=18, note="memory_budget_gib=18"),
    "unsloth-qlora-full": Row("unsloth", "qlora", "full", note="use_gradient_checkpointing='unsloth'"),
    "tuneforge-qlora-full": Row("tuneforge", "qlora", "full", profile=True, note="whole GPU"),
    "tuneforge-qlora-full-8gib": Row("tuneforge", "qlora", "full", budget_gib=8, optim="AdamW8bit",
                                     note="memory_budget_gib=8, AdamW8bit"),
    "hf-lora-full": Row("hf", "lora", "full", note="gradient checkpointing"),
    "liger-lora-full": Row("liger", "lora", "full", note="gradient checkpointing, apply_liger_kernel_to_llama"),
    "tuneforge-lora-full-22gib": Row("tuneforge", "lora", "full", budget_gib=22, note="memory_budget_gib=22"),
    "tuneforge-qlora-full-12gib": Row("tuneforge", "qlora", "full", budget_gib=12, note="memory_budget_gib=12"),
    "tuneforge-lora-full-22gib-gpu-inputs": Row("tuneforge", "lora", "full", budget_gib=22, gpu_inputs=True,
                                                note="memory_budget_gib=22, no inputs offloaded"),
    "tuneforge-qlora-full-12gib-gpu-inputs": Row("tuneforge", "qlora", "full", budget_gib=12, gpu_inputs=True,
                                                 note="memory_budget_gib=12, no inputs offloaded"),
    "hf-qlora-full": Row("hf", "qlora", "full", note="prepare_model_for_kbit_training"),
    "liger-qlora-full": Row("liger", "qlora", "full", note="prepare_model_for_kbit_training, Liger"),
    "unsloth-lora-mix": Row("unsloth", "lora", "mix", note="padded batches of 4"),
    "tuneforge-lora-mix": Row("tuneforge", "lora", "mix", note="packed rows, whole GPU"),
    "hf-lora-mix": Row("hf", "lora", "mix", note="padded batches of 4"),
}
# a row is not started with less time left than this (seconds): load, compile, steps
MIN_SECONDS = {"hf": 25, "liger": 30, "unsloth": 60, "tuneforge": 40}


# ---------------------------------------------------------------- one row, in its own process

def unsloth_step(row: Row, path: Path, lr: float, seq: int):
    """Unsloth as its notebooks use it: FastLanguageModel, LoRA on all seven projections, its own
    gradient checkpointing (layer inputs offloaded to CPU), our loop around its model."""
    import torch
    from bench_train import TARGETS, padded_loop
    from unsloth import FastLanguageModel  # imported before transformers already (worker)

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=row.mode == "qlora", load_in_16bit=row.mode == "lora")
    model = FastLanguageModel.get_peft_model(model, r=64, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=0)
    FastLanguageModel.for_training(model)
    return padded_loop(model, lr, "cuda")


def hf_step(row: Row, path: Path, lr: float, liger: bool):
    """Plain transformers + peft (+ bitsandbytes for QLoRA), gradient checkpointing and SDPA, as a
    user writes it (bench_train.py's baseline); LIGER: Liger's kernels patched into transformers'
    Llama first (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)."""
    import torch
    from bench_train import hf_model, padded_loop

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return padded_loop(hf_model(row.mode, path, dev), lr, dev)


def tuneforge_step(row: Row, path: Path, lr: float, seq: int, data: list):
    """tuneforge through ``Recipe.setup(rows=...)`` and ``Recipe.step``: what `tuneforge train`
    runs (fast path, memory plan, compiled layers, engine, optimizer), on the same samples, each
    step's samples packed into one row."""
    import bench_train

    if row.gpu_inputs:  # no CPU memory for offloaded inputs, as the plan sees it
        import tuneforge.fast.path

        tuneforge.fast.path.host_memory = lambda: 0
    run = bench_train.Run("tuneforge", row.mode, row.workload, budget_gib=row.budget_gib, optim=row.optim)
    step = bench_train.tuneforge(run, path, lr, seq, len(data), rows=bench_train.as_rows(data))

    def by_index(i: int) -> tuple[int, float]:
        tokens = step(i)
        return tokens, step.last_loss
    by_index.plan = step.plan
    return by_index


def worker(name: str, args: argparse.Namespace) -> dict:
    if ROWS[name].engine == "unsloth":
        import unsloth  # noqa: F401  (before transformers and peft: it patches them on import)
    import bench_train
    import torch

    row = ROWS[name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bench_train.model_config(args.shape, None)
    engine_kind = "tuneforge" if row.engine == "tuneforge" else "baseline"  # packed or padded samples
    data = bench_train.batches_for(bench_train.Run(engine_kind, row.mode, row.workload), args.seq,
                                   cfg.vocab_size, args.warmup + args.steps + (1 if row.profile else 0))
    t0 = time.time()
    if row.engine == "tuneforge":
        by_index = tuneforge_step(row, args.model, args.lr, args.seq, data)
        plan = by_index.plan

        def step(i: int) -> tuple[int, float | None]:
            return by_index(i)
    else:
        by_samples = unsloth_step(row, args.model, args.lr, args.seq) if row.engine == "unsloth" \
            else hf_step(row, args.model, args.lr, liger=row.engine == "liger")
        plan = ""

        def step(i: int) -> tuple[int, float | None]:
            return by_samples(data[i])
    load_s = time.time() - t0

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    losses, warm_s = [], []
    for i in range(args.warmup):  # the first includes compiling (tuneforge's layers, Unsloth's kernels)
        t1 = time.time()
        losses.append(step(i)[1])
        sync()
        warm_s.append(round(time.time() - t1, 3))
    tokens, times = 0, []
    t0 = time.time()
    for i in range(args.warmup, args.warmup + args.steps):
        t1 = time.time()
        n, loss = step(i)
        sync()
        tokens += n
        losses.append(loss)
        times.append(round(time.time() - t1, 3))
    secs = time.time() - t0
    lengths = [len(s) for samples in data[:args.warmup + args.steps] for s in samples]
    out = {"run": name, **asdict(row), "seq_len": args.seq, "tokens_per_s": round(tokens / secs, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if dev == "cuda" else None,
           "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if dev == "cuda" else None,
           "flops_per_token": bench_train.flops_per_token(cfg, row.mode, lengths), "steps": args.steps,
           "load_s": round(load_s, 1), "warmup_s": warm_s, "step_s": times,
           "losses": [None if x is None else round(x, 4) for x in losses], "plan": plan,
           "versions": versions(row.engine)}
    if row.profile:
        out["profile"] = profile_step(lambda: step(args.warmup + args.steps), dev, args.profile_dir / f"{name}.txt")
    return out


def versions(engine: str) -> dict:
    return package_versions({"hf": [], "liger": ["liger-kernel"], "unsloth": ["unsloth", "unsloth_zoo", "trl"],
                             "tuneforge": []}[engine] + ["torch", "transformers", "peft", "bitsandbytes"])


def package_versions(names: list[str]) -> dict:
    """The installed version of each package (None where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    got = {}
    for n in names:
        try:
            got[n] = version(n)
        except PackageNotFoundError:
            got[n] = None
    return got


# ---------------------------------------------------------------- where one step's time goes

KINDS = [  # first match wins; names as CUDA reports them
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("4-bit dequant", re.compile(r"dequant|kQuantize|quantize", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|splitK|sm90_|sm80_|ampere_|Kernel2", re.I)),
    ("compiled (triton)", re.compile(r"^triton", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
    ("optimizer maths", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("reductions", re.compile(r"reduce|norm|softmax|cross_entropy|logsumexp", re.I)),
]


def kernel_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other elementwise"


def profile_step(run_step, dev: str, table_file: Path) -> dict:
    """One step under torch.profiler: its GPU time by phase of the step and kind of kernel (a
    kernel counts in the phase the CPU was in when it launched it; backward includes the
    recomputed forwards), the busiest kernels, and the GPU's busy share of the step's wall time."""
    import torch

    from tuneforge.train.profile import busy

    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    t0 = time.time()
    with torch.profiler.profile(activities=acts) as prof:
        run_step()
        if dev == "cuda":
            torch.cuda.synchronize()
    wall = time.time() - t0
    trace_path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    summary = breakdown(trace)
    summary["busy"] = asdict(busy(trace, 1, wall))
    sort = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    table_file.parent.mkdir(parents=True, exist_ok=True)
    table_file.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90) + "\n")
    return summary


def breakdown(trace: dict) -> dict:
    """GPU milliseconds by (phase, kind) and the 15 busiest kernels, from a chrome trace."""
    events = trace.get("traceEvents", [])
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"].split(".", 1)[1]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name", "").startswith("tuneforge."))
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}

    def phase_at(ts: float | None) -> str:
        inner = "step"  # outside the recipe's phases (the peers have none)
        if ts is None:
            return inner
        for start, stop, name in phases:
            if start <= ts <= stop:
                inner = name  # sorted by start: the last one containing ts is the innermost
        return inner

    by: dict[str, dict[str, float]] = {}
    per_kernel: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        ms = e.get("dur", 0) / 1000
        where = phase_at(launches.get(e.get("args", {}).get("correlation")))
        kind = kernel_kind(e["name"])
        by.setdefault(where, {})
        by[where][kind] = by[where].get(kind, 0.0) + ms
        k = per_kernel.setdefault(e["name"], [0.0, 0])
        k[0] += ms
        k[1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {"gpu_ms": {p: {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
                       for p, kinds in by.items()},
            "top_kernels": [{"name": n[:120], "ms": round(v[0], 2), "calls": v[1], "kind": kernel_kind(n)}
                            for n, v in top]}


# ---------------------------------------------------------------- the driver

def child(argv: list[str], timeout: float, script: Path | None = None) -> tuple[dict, str]:
    """Run one row's process (SCRIPT, this file by default, with ARGV; it prints its result as a
    line "RESULT {json}"); its result (or {"error": ...}) and the tail of what it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run([sys.executable, str(script or __file__), *argv], timeout=timeout, capture_output=True,
                              text=True, env=env)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = (err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")) + \
            f"\nkilled: over its {timeout:.0f} s"
        code = "timeout"
    result = next((json.loads(x[7:]) for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    log = "\n".join(x for x in stdout.splitlines() if not x.startswith("RESULT "))
    log += "\n--- stderr ---\n" + "\n".join(stderr.splitlines()[-150:])
    if result is None:
        result = {"error": f"exit {code}: {last_error(stderr)}"}
    return result, log


def last_error(stderr: str) -> str:
    """The line that says what went wrong: the last exception line of a traceback, else the last line."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line) or line.startswith("killed:"):
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def make_model(args: argparse.Namespace) -> dict:
    """The random model on disk (every engine loads it the way users do) and the bf16 matmul rate."""
    import bench_train
    import torch

    bench_train.make_model(args.model, args.shape, None)
    info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "matmul_tflops": round(bench_train.matmul_tflops(), 1), "torch": torch.__version__}
    import peft
    import transformers

    info.update(transformers=transformers.__version__, peft=peft.__version__)
    return info


def model_dir(shape: str) -> Path:
    """In memory where there is room: writing the 7B model's 15 GB to the lent machine's disk took
    22 s of a 150 s run (2026-12-01); every row reads it back from the page cache either way."""
    import shutil

    shm = Path("/dev/shm")
    room = shutil.disk_usage(shm).free if shm.is_dir() else 0
    base = shm if room > (20 << 30) else Path(tempfile.gettempdir())
    return base / f"tuneforge-side-by-side-{shape}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny shape, 128 tokens: a CPU smoke run")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (4096; 128 with --tiny)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (compiling)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: rows that would start too late are recorded as not run")
    ap.add_argument("--model", type=Path, default=None, help="where the random model is written")
    ap.add_argument("--out", type=Path, default=HERE, help="results.json, RESULTS.md, log.txt, profiles")
    ap.add_argument("--render", type=Path, default=None,
                    help="a results.json from another machine: write it into benchmarks/ and stop")
    ap.add_argument("--profile", default="", help="comma-separated rows to profile too (one more step)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--info", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--profile-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render:
        render_saved(args.render, MARK, write_results, render_table)
        return
    args.shape = args.shape or ("tiny" if args.tiny else "internlm2.5-7b")
    args.seq = args.seq or (128 if args.tiny else 4096)
    args.model = args.model or model_dir(args.shape)
    args.profile_dir = args.profile_dir or args.out
    for name in filter(None, args.profile.split(",")):
        ROWS[name] = replace(ROWS[name], profile=True)
    if args.one or args.info:
        print("RESULT " + json.dumps(make_model(args) if args.info else worker(args.one, args)), flush=True)
        return
    started = time.time()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; rows are: {', '.join(ROWS)}")
    forwarded = ["--shape", args.shape, "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
                 str(args.warmup), "--lr", str(args.lr), "--model", str(args.model), "--profile-dir",
                 str(args.profile_dir), "--profile", args.profile]
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "log.txt"
    log_file.write_text("")

    def left() -> float:
        return 3600.0 if args.deadline is None else args.deadline - (time.time() - started)

    info, log = child([*forwarded, "--info"], timeout=min(600, left()))
    with log_file.open("a") as f:
        f.write(f"===== model and matmul rate\n{log}\n")
    if "error" in info:
        sys.exit(f"could not make the model: {info['error']} (see {log_file})")
    meta = {**info, "date": datetime.date.today().isoformat(), "shape": args.shape, "seq": args.seq,
            "steps": args.steps, "warmup": args.warmup,
            "command": "python benchmarks/bench_side_by_side.py " + " ".join(sys.argv[1:])}
    print(f"{meta['gpu']}: bf16 matmul {meta['matmul_tflops']} TFLOP/s; model {args.model} "
          f"[{time.time() - started:.0f}s]", flush=True)
    rows = run_each(names, {n: asdict(ROWS[n]) for n in names}, forwarded, left,
                    {n: MIN_SECONDS[ROWS[n].engine] for n in names}, log_file,
                    lambda done: write_results(done, meta, args.out), describe=describe)
    write_results(rows, meta, args.out)
    print(render_table(rows, meta), flush=True)
    print(f"total {time.time() - started:.0f}s", flush=True)


def describe(result: dict) -> str:
    return (f"{result['tokens_per_s']:,.0f} tok/s, peak {result['peak_gib']} GiB (reserved {result['reserved_gib']}), "
            f"steps {result['step_s']}, warm-up {result['warmup_s']}")


def run_each(names: list[str], fields: dict[str, dict], forwarded: list[str], left: Callable[[], float],
             min_seconds: dict[str, float], log_file: Path, save: Callable[[list[dict]], None],
             describe: Callable[[dict], str], script: Path | None = None) -> list[dict]:
    """Each named row in its own process (SCRIPT FORWARDED --one NAME), in order; a row with less
    than its MIN_SECONDS left of the deadline (LEFT()) is recorded as not run, one that fails or
    runs out of time as its error. Each result is FIELDS[name] plus what the row measured; SAVE
    gets the rows so far after each (a run cut off later still leaves what it measured)."""
    rows = []
    for name in names:
        if left() < min_seconds[name]:
            rows.append({"run": name, **fields[name], "error": f"not run: {left():.0f} s left of the deadline"})
            continue
        t0 = time.time()
        result, log = child([*forwarded, "--one", name], timeout=max(1.0, left()), script=script)
        result = {"run": name, **fields[name], **result, "wall_s": round(time.time() - t0, 1)}
        rows.append(result)
        with log_file.open("a") as f:
            f.write(f"===== {name}\n{log}\n")
        if "error" in result:
            print(f"{name}: FAILED {result['error']} [{result['wall_s']:.0f}s]", flush=True)
        else:
            print(f"{name}: {describe(result)} [{result['wall_s']:.0f}s]", flush=True)
        save(rows)
    return rows


# ---------------------------------------------------------------- results

def with_derived(rows: list[dict], meta: dict) -> list[dict]:
    """Each row with its MFU and its speed against the Unsloth row of the same mode and workload."""
    peer = {(r["mode"], r["workload"]): r["tokens_per_s"] for r in rows
            if r.get("engine") == "unsloth" and r.get("tokens_per_s")}
    out = []
    for r in rows:
        r = dict(r)
        if r.get("tokens_per_s"):
            rate = meta.get("matmul_tflops") or float("nan")
            r["mfu"] = round(r["flops_per_token"] * r["tokens_per_s"] / (rate * 1e12), 3) if rate == rate else None
            p = peer.get((r["mode"], r["workload"]))
            r["vs_unsloth"] = round(r["tokens_per_s"] / p, 2) if p else None
        out.append(r)
    return out


def render_table(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['gpu']} (bf16 matmul {meta['matmul_tflops']} TFLOP/s measured "
             f"in the same run), model shape {meta['shape']} (random weights), {meta['seq']}-token rows, "
             f"{meta['warmup']} warm-up + {meta['steps']} timed steps per row, torch {meta['torch']}, "
             f"transformers {meta['transformers']}, peft {meta['peft']}.",
             f"Command: `{meta['command']}`", "",
             "| run | mode | workload | tokens/s | vs Unsloth | peak GiB (allocated / reserved) | MFU | "
             "first step s | loss first -> last | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in with_derived(rows, meta):
        if "error" in r:
            lines.append(f"| {r['run']} | {r['mode']} | {r['workload']} | - | | | | | | "
                         f"**{r['error'].replace('|', '/')}** |")
            continue
        losses = [x for x in r.get("losses", []) if x is not None]
        loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
        mem = f"{r['peak_gib']} / {r['reserved_gib']}" if r.get("peak_gib") is not None else "n/a (CPU)"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        lines.append(f"| {r['run']} | {r['mode']} | {r['workload']} | {r['tokens_per_s']:,.0f} | "
                     f"{r.get('vs_unsloth') or ''} | {mem} | {mfu} | {r['warmup_s'][0]} | {loss} | {r['note']} |")
    return "\n".join(lines)


def write_results(rows: list[dict], meta: dict, out: Path) -> None:
    """OUT/results.json under the key "side-by-side" (other benchmarks' keys kept) and the table
    between this benchmark's markers in OUT/RESULTS.md."""
    write_marked(out, MARK, {"meta": meta, "rows": with_derived(rows, meta)}, render_table(rows, meta))


def render_saved(path: Path, mark: str, write: Callable[[list[dict], dict, Path], None],
                 render: Callable[[list[dict], dict], str]) -> None:
    """--render: a results.json from another machine (its MARK section, or the section itself)
    written into benchmarks/ with WRITE, and its table printed with RENDER."""
    payload = json.loads(path.read_text())
    payload = payload.get(mark, payload)
    write(payload["rows"], payload["meta"], HERE)
    print(render(payload["rows"], payload["meta"]))


def write_marked(out: Path, mark: str, section: dict, table: str) -> None:
    """SECTION into OUT/results.json under the key MARK, and TABLE between MARK's markers in
    OUT/RESULTS.md (added at the end where missing); everything else in both files is kept."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload[mark] = section
    path.write_text(json.dumps(payload, indent=1) + "\n")
    md = out / "RESULTS.md"
    begin, end = f"<!-- {mark}:begin -->", f"<!-- {mark}:end -->"
    text = md.read_text() if md.is_file() else "# Benchmark results\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    md.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
