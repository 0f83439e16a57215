"""The longest sequence one training step fits in, on one GPU, side by side: plain transformers +
peft, Unsloth and tuneforge (through the recipe `tuneforge train` runs), 7B-shaped random model,
LoRA r64 on all seven projections (and QLoRA), one sequence per step.

    python benchmarks/bench_long_context.py --out DIR                  # every row
    python benchmarks/bench_long_context.py --tiny --out DIR           # a CPU smoke run
    python benchmarks/bench_long_context.py --render DIR/results.json  # into benchmarks/

Each row runs in its own process and climbs a ladder of lengths (--lengths), one optimizer step
(forward, backward, clipping, AdamW) at each, until a step runs out of GPU memory or the next one
would not finish before the row's time is up: a step's attention grows with the square of the
length (a 7B step at 128k tokens is ~100 s), so the ladder may stop for time before memory. Each
row reports the longest length that trained, the first that did not fit, and, where it stopped
for time, where the straight line through its last two measured peaks (activation memory grows
linearly with the length under flash attention and full recomputation) reaches the GPU's memory:
a prediction, marked as one.

The "-packed" rows train tuneforge on rows of --doc-tokens-long documents packed to each length
(varlen attention, positions restarting per document): the same tensors of the same sizes as one
sequence of that length, but attention costs linear time, so these rows can climb to where the
memory really ends within the time the machine allows.

tuneforge is set up once per row for the ladder's longest length (its memory plan is the one a
run with that max_length would get) and then trains each length in turn.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_side_by_side as sbs  # noqa: E402

GIB = 1 << 30
MARK = "long-context"
K = 1024


@dataclass(frozen=True)
class Row:
    engine: str  # "hf" | "unsloth" | "tuneforge"
    mode: str  # "lora" | "qlora"
    packed: bool = False  # tuneforge: documents packed to each length (linear-time attention)
    note: str = ""


ROWS = {
    "tuneforge-lora": Row("tuneforge", "lora", note="memory plan for the longest length"),
    "unsloth-lora": Row("unsloth", "lora", note="use_gradient_checkpointing='unsloth'"),
    "hf-lora": Row("hf", "lora", note="gradient checkpointing, SDPA"),
    "tuneforge-qlora": Row("tuneforge", "qlora", note="memory plan for the longest length"),
    "unsloth-qlora": Row("unsloth", "qlora", note="use_gradient_checkpointing='unsloth'"),
    "tuneforge-lora-packed": Row("tuneforge", "lora", packed=True, note="documents packed to each length"),
    "tuneforge-qlora-packed": Row("tuneforge", "qlora", packed=True, note="documents packed to each length"),
    "hf-qlora": Row("hf", "qlora", note="prepare_model_for_kbit_training"),
}
LENGTHS = [16, 32, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512]  # in K tokens
WARMUP = [4 * K, 8 * K]  # compiles (a second length makes the compiled layers dynamic)
MIN_SECONDS = {"hf": 30, "unsloth": 70, "tuneforge": 60}


def is_oom(err: BaseException) -> bool:
    import torch

    text = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text \
        or "cudaerrormemoryallocation" in text


def step_for(row: Row, args: argparse.Namespace, longest: int):
    """STEP(tokens) -> (trained tokens, loss): one optimizer step on TOKENS, one sequence (or,
    packed, documents of --doc-tokens)."""
    import bench_train

    if row.engine in ("hf", "unsloth"):
        srow = sbs.Row(row.engine, row.mode, "full")
        loop = sbs.unsloth_step(srow, args.model, args.lr, longest) if row.engine == "unsloth" \
            else sbs.hf_step(srow, args.model, args.lr, liger=False)
        return lambda tokens: loop([tokens]), ""

    def as_row(tokens: list[int]):
        docs = [tokens[i:i + args.doc_tokens] for i in range(0, len(tokens), args.doc_tokens)] if row.packed \
            else [tokens]
        return bench_train.as_rows([docs])[0]

    run = bench_train.Run("tuneforge", row.mode, "full")
    first = as_row(list(range(3, 3 + longest)))
    step = bench_train.tuneforge(run, args.model, args.lr, longest, 1000, rows=[first])

    def by_tokens(tokens: list[int]) -> tuple[int, float]:
        step.recipe.rows = [as_row(tokens)]  # the same setup, another row
        n = step(0)
        return n, step.last_loss
    return by_tokens, step.plan


def worker(name: str, args: argparse.Namespace) -> dict:
    """Climb the ladder; each length's result is printed as a STEP line as soon as it is known,
    so that a row killed at its time limit still reports what it measured."""
    row = ROWS[name]
    if row.engine == "unsloth":
        import unsloth  # noqa: F401  (before transformers and peft: it patches them on import)
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = args.lengths
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    t0 = time.time()
    step, plan = step_for(row, args, max(lengths))
    load_s = round(time.time() - t0, 1)
    warm = []
    for n in (w for w in args.warmup_lengths if w < max(lengths)):
        t1 = time.time()
        step(tokens(n))
        if dev == "cuda":
            torch.cuda.synchronize()
        warm.append(round(time.time() - t1, 2))
    last: tuple[int, float] | None = None
    for n in lengths:
        left = args.stop_at - time.time()
        if last is not None:
            grows = (n / last[0]) ** (1 if row.packed else 2)  # attention: the square of the length
            guess = last[1] * grows
            if guess > left - 5:
                report({"seq": n, "skipped": f"would take ~{guess:.0f} s, {left:.0f} s left"})
                break
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.time()
        try:
            got, loss = step(tokens(n))
            if dev == "cuda":
                torch.cuda.synchronize()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            report({"seq": n, "oom": str(err).strip().splitlines()[0][:300] if str(err).strip() else "out of memory"})
            break
        secs = time.time() - t1
        report({"seq": n, "step_s": round(secs, 2), "tokens": got, "loss": round(float(loss), 4),
                "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if dev == "cuda" else None,
                "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if dev == "cuda" else None,
                "host_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 1)})
        last = (n, secs)
    return {"load_s": load_s, "warmup_s": warm, "plan": plan, "versions": sbs.versions(row.engine)}


def report(step: dict) -> None:
    print("STEP " + json.dumps(step), flush=True)


def summarise(result: dict, steps: list[dict], capacity_gib: float | None) -> dict:
    """The row's result with its ladder: the longest length that trained, the first that ran out
    of memory, and the straight-line prediction of the longest that would fit."""
    ok = [s for s in steps if "step_s" in s]
    out = {**result, "ladder": steps, "longest": ok[-1]["seq"] if ok else None,
           "oom_at": next((s["seq"] for s in steps if "oom" in s), None)}
    if len(ok) >= 2 and capacity_gib and out["oom_at"] is None and ok[-1].get("peak_gib") is not None:
        (n1, p1), (n2, p2) = [(s["seq"], s["peak_gib"]) for s in ok[-2:]]
        per_token = (p2 - p1) / (n2 - n1)
        if per_token > 0:
            out["predicted_longest"] = int(n2 + (capacity_gib - p2) / per_token)
            out["kib_per_token"] = round(per_token * GIB / K, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny shape, short lengths: a CPU smoke run")
    ap.add_argument("--lengths", default=None, help="comma-separated lengths in tokens (default: 16k ... 512k)")
    ap.add_argument("--doc-tokens", type=int, default=16 * K, help="document length of the -packed rows")
    ap.add_argument("--row-seconds", type=float, default=300, help="the most time one row may take")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--model", type=Path, default=None, help="where the random model is written")
    ap.add_argument("--out", type=Path, default=HERE, help="results.json, RESULTS.md, log.txt")
    ap.add_argument("--render", type=Path, default=None, help="a results.json from another machine: into benchmarks/")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--info", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render:
        sbs.render_saved(args.render, MARK, write_results, render_table)
        return
    args.shape = args.shape or ("tiny" if args.tiny else "internlm2.5-7b")
    args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else \
        [64, 128, 256, 512] if args.tiny else [n * K for n in LENGTHS]
    args.warmup_lengths = [16, 32] if args.tiny else WARMUP
    if args.tiny:
        args.doc_tokens = min(args.doc_tokens, 64)
    if args.model is None:
        shared = sbs.model_dir(args.shape)
        args.model = shared.with_name(shared.name + "-long")
    if args.one or args.info:
        print("RESULT " + json.dumps(make_model(args) if args.info else worker(args.one, args)), flush=True)
        return
    run(args)


def make_model(args: argparse.Namespace) -> dict:
    """The random model (sbs.make_model), its positions long enough for every length."""
    info = sbs.make_model(args)
    import torch

    cfg_file = args.model / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max(args.lengths))
    cfg_file.write_text(json.dumps(cfg, indent=1))
    info["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 2) \
        if torch.cuda.is_available() else None
    return info


def run(args: argparse.Namespace) -> None:
    started = time.time()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; rows are: {', '.join(ROWS)}")

    def left() -> float:
        return 3600.0 if args.deadline is None else args.deadline - (time.time() - started)

    forwarded = ["--shape", args.shape, "--lengths", ",".join(map(str, args.lengths)), "--lr", str(args.lr),
                 "--model", str(args.model), "--doc-tokens", str(args.doc_tokens)] + (["--tiny"] if args.tiny else [])
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "log.txt"
    log_file.write_text("")
    info, log = sbs.child([*forwarded, "--info"], timeout=min(600, left()), script=Path(__file__))
    with log_file.open("a") as f:
        f.write(f"===== model\n{log}\n")
    if "error" in info:
        sys.exit(f"could not make the model: {info['error']} (see {log_file})")
    meta = {**info, "date": datetime.date.today().isoformat(), "shape": args.shape, "lengths": args.lengths,
            "doc_tokens": args.doc_tokens, "row_seconds": args.row_seconds,
            "command": "python benchmarks/bench_long_context.py " + " ".join(sys.argv[1:])}
    print(f"{meta['gpu']} ({meta['gpu_total_gib']} GiB); model {args.model} [{time.time() - started:.0f}s]", flush=True)
    rows = []
    for name in names:
        row = ROWS[name]
        budget = min(args.row_seconds, left())
        if budget < MIN_SECONDS[row.engine]:
            rows.append({"run": name, **asdict(row), "error": f"not run: {left():.0f} s left of the deadline"})
            continue
        t0 = time.time()
        # the worker stops climbing a little before the row's time is up; the timeout is the backstop
        result, log = sbs.child([*forwarded, "--one", name, "--stop-at", str(t0 + budget - 10)],
                                timeout=budget + 30, script=Path(__file__))
        steps = [json.loads(x[5:]) for x in log.splitlines() if x.startswith("STEP ")]
        if "error" in result and steps:  # killed or crashed after some lengths: keep those
            result = {"stopped": result["error"]}
        result = {"run": name, **asdict(row), **summarise(result, steps, meta.get("gpu_total_gib")),
                  "wall_s": round(time.time() - t0, 1)}
        rows.append(result)
        with log_file.open("a") as f:
            f.write(f"===== {name}\n{log}\n")
        print(f"{name}: {describe(result)} [{result['wall_s']:.0f}s]", flush=True)
        write_results(rows, meta, args.out)
    write_results(rows, meta, args.out)
    print(render_table(rows, meta), flush=True)
    print(f"total {time.time() - started:.0f}s", flush=True)


def describe(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"]
    parts = [f"longest {kilo(r['longest'])}"]
    if r.get("oom_at"):
        parts.append(f"out of memory at {kilo(r['oom_at'])}")
    if r.get("predicted_longest"):
        parts.append(f"predicted {kilo(r['predicted_longest'])}")
    if r.get("stopped"):
        parts.append(r["stopped"])
    return ", ".join(parts) + "; " + " ".join(
        f"{kilo(s['seq'])}:{s['step_s']}s/{s['peak_gib']}GiB" if "step_s" in s else f"{kilo(s['seq'])}:-"
        for s in r["ladder"])


def kilo(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / K:g}k" if n >= K else str(n)


def render_table(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['gpu']} ({meta.get('gpu_total_gib')} GiB), model shape "
             f"{meta['shape']} (random weights), LoRA r64 all-linear, one optimizer step per length, at most "
             f"{meta['row_seconds']:.0f} s per row; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"peft {meta['peft']}.",
             f"Command: `{meta['command']}`", "",
             "| run | longest trained | first out of memory | peak GiB at the longest (allocated / reserved) | "
             "step s at the longest | host RSS GiB | predicted longest (linear fit) | stopped by | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | - | | | | | | **{r['error'].replace('|', '/')}** | {r['note']} |")
            continue
        ok = [s for s in r["ladder"] if "step_s" in s]
        top = ok[-1] if ok else {}
        skipped = next((s["skipped"] for s in r["ladder"] if "skipped" in s), "")
        stop = "memory" if r.get("oom_at") else (f"time ({skipped})" if skipped else r.get("stopped", "the ladder's end"))
        lines.append(f"| {r['run']} | {kilo(r['longest'])} | {kilo(r.get('oom_at'))} | "
                     f"{top.get('peak_gib', '-')} / {top.get('reserved_gib', '-')} | {top.get('step_s', '-')} | "
                     f"{top.get('host_max_rss_gib', '-')} | "
                     f"{kilo(r.get('predicted_longest')) + ' (prediction)' if r.get('predicted_longest') else ''} | "
                     f"{stop.replace('|', '/')} | {r['note']} |")
    return "\n".join(lines)


def write_results(rows: list[dict], meta: dict, out: Path) -> None:
    sbs.write_marked(out, MARK, {"meta": meta, "rows": rows}, render_table(rows, meta))


if __name__ == "__main__":
    main()
