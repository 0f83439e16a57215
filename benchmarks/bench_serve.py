"""Concurrent streaming clients against `tuneforge serve`: aggregate generated tokens/s and median
time to first token, for 1 client and for N at once, with continuous batching and, side by side
in the same run, the same server batching in waves (`--batching waves`: requests that arrive
while a batch decodes wait for it to end), the baseline.

It starts the very command users run (`python -m tuneforge serve MODEL --batching MODE`), one
mode after the other, unless --url points at one already running (a GPU box with a 7B model,
say: then only that server is measured), and talks to it with the official `openai` client, one
thread per client, each streaming MAX_TOKENS tokens of its own question.

    python benchmarks/bench_serve.py                         # bundled model, CPU: 1, 8, 32 clients
    python benchmarks/bench_serve.py --clients 1 8 --modes continuous
    python benchmarks/bench_serve.py --url http://gpu-box:8000 --clients 1 8 32

The load average is printed with the results: on a shared machine the numbers are only as good
as the cores the server had.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BUNDLED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _start(model: str, port: int, max_batch: int, mode: str) -> subprocess.Popen:
    from tuneforge.models.resolve import resolve_model

    path = str(resolve_model(model))
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{port}_{mode}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", path, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "256", "--batching", mode],
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 600
    while _health(f"http://127.0.0.1:{port}") is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start; see {log.name}")
        time.sleep(0.5)
    return proc


def _one(client, model: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, tokens) of one streamed answer."""
    start = time.monotonic()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        # min_tokens does not exist in the API: ask for something long so that every answer runs to the limit
        messages=[{"role": "user", "content": f"Write a long story about a dragon named number {i}."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.monotonic() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or float("nan"), time.monotonic() - start, tokens


def run(url: str, clients: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"),
                    timeout=3600, max_retries=0)
    model = client.models.list().data[0].id
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: _one(client, model, i, max_tokens), range(clients)))
    wall = time.monotonic() - start
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2),
            "median_ttft_s": round(statistics.median(r[0] for r in results), 2),
            "completed": sum(r[2] == max_tokens for r in results)}


def measure(args: argparse.Namespace, mode: str | None) -> list[dict]:
    """Each client count against one server: the one at --url, or one started in MODE."""
    proc = None if args.url else _start(args.model, args.port, args.max_batch, mode)
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        run(url, 1, 4)  # warm-up: the first forward pass allocates
        rows = []
        for n in args.clients:  # each row as it is measured: a long run on a loaded machine shows progress
            rows.append({"mode": mode or "at --url", **run(url, n, args.max_tokens)})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


def report(rows: list[dict], before: tuple[float, ...], after: tuple[float, ...]) -> None:
    print(f"load average (1, 5, 15 min) before: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
          f"after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} on {os.cpu_count()} cores")
    print(f"{'batching':>10} {'clients':>8} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'median TTFT s':>14} "
          f"{'complete':>9} {'vs 1 tok/s':>10} {'vs 1 TTFT':>10}")
    for r in rows:
        one = next(o for o in rows if o["mode"] == r["mode"] and o["clients"] == min(
            x["clients"] for x in rows if x["mode"] == r["mode"]))
        print(f"{r['mode']:>10} {r['clients']:>8} {r['tokens']:>7} {r['wall_s']:>8} {r['tokens_per_s']:>8} "
              f"{r['median_ttft_s']:>14} {r['completed']:>9}/{r['clients']:<3}"
              f"{r['tokens_per_s'] / one['tokens_per_s']:>7.2f}x {r['median_ttft_s'] / one['median_ttft_s']:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a server already running (default: start one here per mode)")
    parser.add_argument("--model", default=BUNDLED)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=["continuous", "waves"], default=["continuous", "waves"],
                        help="the server's --batching, each measured in turn (ignored with --url)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    before = os.getloadavg()
    rows = [r for mode in ([None] if args.url else args.modes) for r in measure(args, mode)]
    after = os.getloadavg()
    report(rows, before, after)
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average_before": before, "load_average_after": after,
                                               "args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
