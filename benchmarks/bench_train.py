"""Training throughput on one GPU: plain transformers + peft (the baseline, written the way a user
writes it) against tuneforge's own training step, on the same random-initialised model, the same
data and the same settings, in one run. Each configuration runs in its own process so that peak
memory is its own. Writes benchmarks/results.json and the table in benchmarks/RESULTS.md.

    python benchmarks/bench_train.py                 # everything, InternLM2.5-7B shapes
    python benchmarks/bench_train.py --layers 4 --runs tuneforge-lora-full   # a quick look

Workloads: "full" is rows of exactly --seq tokens; "mix" is an SFT-like mix whose lengths are
drawn log-normally (median 300 tokens, sigma 1, capped at --seq): the baseline pads each batch of
4 samples to its longest, tuneforge packs samples into --seq-token rows. tokens/s counts trained
(non-padding) tokens only.

MFU: FLOPs counted per trained token times trained tokens/s, over the bf16 matmul rate measured
at the start of the same run (8192^3 products). Counted per token: 4 N for the frozen linear layers
(forward, and backward to the input; 6 N when they train), 6 N_lora for the adapters, and
6 d L n' for causal attention, where n' = sum(n^2) / sum(n) over the samples' lengths n.
Recomputation is overhead, not model work, and is not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only for a smoke run of --shape tiny
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# InternLM2.5-7B's shapes in the Llama architecture
SHAPES = {
    "internlm2.5-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, intermediate_size=14336, vocab_size=92544),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}


@dataclass(frozen=True)
class Run:
    engine: str  # "baseline" | "tuneforge"
    mode: str  # "lora" | "qlora" | "full"
    workload: str  # "full" | "mix"
    budget_gib: float | None = None  # tuneforge's memory_budget_gib
    optim: str = "AdamW"
    note: str = ""


RUNS = {
    "baseline-lora-full": Run("baseline", "lora", "full"),
    "baseline-qlora-full": Run("baseline", "qlora", "full"),
    "baseline-lora-mix": Run("baseline", "lora", "mix"),
    "tuneforge-lora-full": Run("tuneforge", "lora", "full", budget_gib=22, note="memory_budget_gib=22"),
    "tuneforge-lora-full-nobudget": Run("tuneforge", "lora", "full", note="whole GPU"),
    "tuneforge-qlora-full": Run("tuneforge", "qlora", "full", note="whole GPU"),
    "tuneforge-qlora-full-8gib": Run("tuneforge", "qlora", "full", budget_gib=8, optim="AdamW8bit",
                                     note="memory_budget_gib=8, AdamW8bit"),
    "tuneforge-lora-mix": Run("tuneforge", "lora", "mix", budget_gib=22, note="memory_budget_gib=22"),
}


def model_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(**kw, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_model(path: Path, shape: str, layers: int | None) -> None:
    """A random-initialised model on disk, so that every engine loads it the way users do."""
    from transformers import LlamaForCausalLM

    if (path / "tokenizer.json").is_file():
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(model_config(shape, layers)).to(torch.bfloat16)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int | None = None):
    """A word-level tokenizer with a ChatML template: the workloads are token ids, so the
    tokenizer only names the special tokens and the template (nothing is downloaded). With
    VOCAB_SIZE every other id gets a word too (``id_word``), so that a text of such words is
    exactly those ids: for a peer that takes text only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS)}
    vocab.update({id_word(i): i for i in range(len(SPECIAL_TOKENS), vocab_size or 0)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        chat_template="{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                      "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                      "{% endif %}")


def id_word(i: int) -> str:
    return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"w{i}"


def matmul_tflops() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def sample_lengths(n: int, seq: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 1.0 + math.log(300))
    return [int(min(seq, max(16, x))) for x in raw.tolist()]


def flops_per_token(cfg, mode: str, lengths: list[int], r: int = 64) -> float:
    d, L, f, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * d // cfg.num_attention_heads
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    n_lin = L * sum(i * o for i, o in shapes) + d * v
    n_lora = L * sum(r * (i + o) for i, o in shapes)
    ctx = sum(n * n for n in lengths) / sum(lengths)
    linear = 6 * n_lin if mode == "full" else 4 * n_lin + 6 * n_lora
    return linear + 6 * d * L * ctx


# ---------------------------------------------------------------- the two engines, one step each

def baseline(run: Run, path: Path, lr: float):
    """What a user writes with transformers + peft (+ bitsandbytes for QLoRA)."""
    loop = padded_loop(hf_model(run.mode, path, DEV), lr, DEV)
    return lambda samples: loop(samples)[0]


def hf_model(mode: str, path: Path, dev: str):
    """transformers + peft (+ bitsandbytes 4-bit for QLoRA), gradient checkpointing and SDPA, LoRA
    r64 on TARGETS: the baseline as a user sets it up."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": dev}
    if mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


def padded_loop(model, lr: float, dev: str):
    """One optimizer step per batch of samples, padded to the longest, labels on every real token;
    returns (labelled tokens, loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step(samples: list[list[int]]) -> tuple[int, float]:
        width = max(map(len, samples))
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(mask.sum()), float(out.loss)

    return step


def tuneforge_settings(run: Run, path: Path, lr: float, seq: int, steps: int, fast_path: bool = True,
                       data: Path | None = None) -> dict:
    """The config of a tuneforge run: the same keys a config file for `tuneforge train` holds."""
    return dict(pretrained_model_name_or_path=str(path), method=run.mode, lora_r=64, lora_alpha=16,
                lora_dropout=0.0, lora_target_modules=TARGETS, data_files=str(data or "unused.jsonl"),
                max_length=seq, batch_size=1, accumulative_counts=1, lr=lr, max_steps=steps,
                gradient_checkpointing="auto", memory_budget_gib=run.budget_gib, optim_type=run.optim,
                fast_path=fast_path, save_steps=10**9, save_last=False, evaluation_inputs=[],
                identity_guard=False, replay_general=False)


def tuneforge(run: Run, path: Path, lr: float, seq: int, steps: int, rows: list | None = None,
              fast_path: bool = True, data: Path | None = None, log=print, settings: dict | None = None):
    """tuneforge's training step, through the recipe `tuneforge train` runs: set up once (load,
    adapters, fast path, memory plan, compiled layers, engine, optimizer), then one
    ``Recipe.step`` per call. ROWS: the packed rows to train (else DATA, a data file, is read as
    the command reads it); SETTINGS: config keys over tuneforge_settings' (objective='dpo', ...)."""
    import tempfile

    from tuneforge.config.load import build_config
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import Recipe

    cfg = build_config({**tuneforge_settings(run, path, lr, seq, steps, fast_path, data), **(settings or {})})
    recipe = Recipe(cfg, Path(tempfile.mkdtemp(prefix="bench-")), RunOptions(progress=False))
    recipe.setup(rows=rows)
    log("  " + recipe.fast.describe() + (f"; {recipe.fast.memory.describe()}" if recipe.fast.memory else ""))

    def step(i: int) -> int:
        step.last_loss, _, tokens = recipe.step(i)
        return tokens

    step.plan = recipe.fast.describe() + (f"; {recipe.fast.memory.describe()}" if recipe.fast.memory else "")
    step.recipe = recipe  # bench_long_context trains other rows on the same setup
    return step


def as_rows(data: list[list[list[int]]]) -> list:
    """Each step's samples as one packed row, every token trained (as a pre-training row is)."""
    from tuneforge.data.pack import Row

    return [Row([t for s in samples for t in s], [t for s in samples for t in s],
                [i for s in samples for i in range(len(s))]) for samples in data]


def batches_for(run: Run, seq: int, vocab: int, n_steps: int, seed: int = 0) -> list[list[list[int]]]:
    """Per step, the samples it trains on: one full row, or a padded batch of 4 / a packed row."""
    g = torch.Generator().manual_seed(seed)

    def sample(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    if run.workload == "full":
        return [[sample(seq)] for _ in range(n_steps)]
    lengths = sample_lengths(n_steps * 40, seq, seed)
    if run.engine == "baseline":
        return [[sample(n) for n in lengths[i:i + 4]] for i in range(0, 4 * n_steps, 4)]
    from tuneforge.data.pack import pack_lengths

    rows = pack_lengths(lengths, seq)
    return [[sample(lengths[i]) for i in group] for group in rows[:n_steps]]


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def worker(name: str, args: argparse.Namespace) -> dict:
    run = RUNS[name]
    torch.manual_seed(0)
    cfg = model_config(args.shape, args.layers)
    data = batches_for(run, args.seq, cfg.vocab_size, args.warmup + args.steps)
    t0 = time.time()
    if run.engine == "baseline":
        by_step = baseline(run, args.model, args.lr)

        def step(i: int) -> int:
            return by_step(data[i])
    else:
        step = tuneforge(run, args.model, args.lr, args.seq, len(data), rows=as_rows(data))
    load_s = time.time() - t0
    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.time()
    tokens, lengths, times = 0, [s for samples in data for s in map(len, samples)], []
    for i in range(args.warmup, len(data)):
        t1 = time.time()
        tokens += step(i)
        sync()  # per-step times; the loss read-out syncs every step anyway
        times.append(round(time.time() - t1, 3))
    secs = time.time() - t0
    tps = tokens / secs
    return {"run": name, "engine": run.engine, "mode": run.mode, "workload": run.workload,
            "seq_len": args.seq, "tokens_per_s": round(tps, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if DEV == "cuda" else None,
            "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if DEV == "cuda" else None,
            "flops_per_token": flops_per_token(cfg, run.mode, lengths), "note": run.note,
            "steps": args.steps, "load_s": round(load_s, 1), "step_s": times,
            "plan": getattr(step, "plan", "")}


def loss_check(args: argparse.Namespace) -> dict:
    """50 steps of the plain path and of the fast path on the same packed rows (the mix
    workload, 10 rows, one per step in a shuffled order per epoch, so that the loss falls): the
    curves must agree."""
    run = Run("tuneforge", "lora", "mix", budget_gib=None)
    cfg = model_config(args.shape, args.check_layers)
    data = batches_for(run, args.seq, cfg.vocab_size, 10, seed=1)
    curves = {}
    for fast in (False, True):
        step = tuneforge(run, args.model, 1e-3, args.seq, args.loss_steps, rows=as_rows(data), fast_path=fast)
        curve = []
        for i in range(args.loss_steps):
            step(i)
            curve.append(step.last_loss)
        curves["fast" if fast else "plain"] = curve
        del step
        if DEV == "cuda":
            torch.cuda.empty_cache()
    rel = [abs(a - b) / a for a, b in zip(curves["plain"], curves["fast"], strict=True)]
    return {"steps": args.loss_steps, "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
            "plain_first_last": [curves["plain"][0], curves["plain"][-1]],
            "fast_first_last": [curves["fast"][0], curves["fast"][-1]], "curves": curves}


# ---------------------------------------------------------------- the driver

def write_results(rows: list[dict], meta: dict, check: dict | None, out: Path) -> None:
    base = {(r["mode"], r["workload"]): r["tokens_per_s"] for r in rows if r["engine"] == "baseline"}
    runs = []
    for r in rows:
        r = {**r, "mfu": round(r["flops_per_token"] * r["tokens_per_s"] / (meta["matmul_tflops"] * 1e12), 3),
             "gpu": meta["gpu"], "date": meta["date"], "command": meta["command"]}
        b = base.get((r["mode"], r["workload"]))
        r["vs_baseline"] = round(r["tokens_per_s"] / b, 2) if b else None
        runs.append(r)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    # other benchmarks' keys in the same file (bench_side_by_side.py's) are kept
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload.update({"meta": meta, "runs": runs, "loss_check": check})
    path.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"Measured {meta['date']} on {meta['gpu']} (bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s "
             f"measured in the same run), model shape {meta['shape']}"
             f"{' with ' + str(meta['layers']) + ' layers' if meta['layers'] else ''}, "
             f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}.",
             f"Command: `{meta['command']}`", "",
             "| run | engine | mode | workload | seq | tokens/s | vs baseline | peak GiB | MFU | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {r['engine']} | {r['mode']} | {r['workload']} | {r['seq_len']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['vs_baseline'] or ''} | {r['peak_gib']} | "
                     f"{r['mfu']:.1%} | {r['note']} |")
    if check:
        lines += ["", f"Loss check ({check['steps']} steps, plain vs fast path, bf16, packed rows): "
                  f"max relative difference {check['max_rel_diff']:.2e}, mean {check['mean_rel_diff']:.2e}; "
                  f"loss {check['plain_first_last'][0]:.3f} -> {check['plain_first_last'][1]:.3f} (plain), "
                  f"{check['fast_first_last'][0]:.3f} -> {check['fast_first_last'][1]:.3f} (fast)."]
    md = out / "RESULTS.md"
    text = md.read_text() if md.is_file() else "# Benchmark results\n\n<!-- results:begin -->\n<!-- results:end -->\n"
    head, rest = text.split("<!-- results:begin -->", 1)
    tail = rest.split("<!-- results:end -->", 1)[1]
    md.write_text(head + "<!-- results:begin -->\n" + "\n".join(lines) + "\n<!-- results:end -->" + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="internlm2.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick look")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated, from: " + ", ".join(RUNS))
    ap.add_argument("--loss-steps", type=int, default=50, help="0: no loss check")
    ap.add_argument("--check-layers", type=int, default=4, help="layers of the loss-check model")
    ap.add_argument("--model", type=Path, default=Path("/tmp/tuneforge-bench-model"))
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one or args.check:
        print("RESULT " + json.dumps(loss_check(args) if args.check else worker(args.one, args)), flush=True)
        return
    if DEV != "cuda" and args.shape != "tiny":
        sys.exit("bench_train.py needs a CUDA GPU (on a CPU only --shape tiny runs, as a smoke test)")
    import peft
    import transformers

    check_model = args.model.with_name(f"{args.model.name}-{args.shape}-{args.check_layers}")
    args.model = args.model.with_name(f"{args.model.name}-{args.shape}-{args.layers or 'all'}")
    make_model(args.model, args.shape, args.layers)
    meta = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "CPU", "matmul_tflops": round(matmul_tflops(), 1),
            "date": datetime.date.today().isoformat(), "shape": args.shape, "layers": args.layers,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])}
    print(f"{meta['gpu']}: bf16 matmul {meta['matmul_tflops']} TFLOP/s", flush=True)
    forwarded = ["--shape", args.shape, "--seq", str(args.seq), "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--lr", str(args.lr), "--loss-steps", str(args.loss_steps),
                 "--check-layers", str(args.check_layers)] + (["--layers", str(args.layers)] if args.layers else [])

    def child(extra: list[str]) -> dict | None:
        proc = subprocess.run([sys.executable, __file__, *forwarded, *extra], timeout=900, capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        result = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        for line in proc.stdout.splitlines():
            if not line.startswith("RESULT "):
                print("  " + line, flush=True)
        if result is None:
            print(f"  failed (exit {proc.returncode}):\n" + proc.stderr[-3000:], flush=True)
        return result

    rows = []
    for name in [n.strip() for n in args.runs.split(",") if n.strip()]:
        t0 = time.time()
        r = child(["--one", name, "--model", str(args.model)])
        if r:
            rows.append(r)
            print(f"{name}: {r['tokens_per_s']:,.0f} tok/s, peak {r['peak_gib']} GiB, steps {r['step_s']} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
            write_results(rows, meta, None, args.out)  # a cut-off run still leaves what it measured
    check = None
    if args.loss_steps:
        make_model(check_model, args.shape, args.check_layers)
        check = child(["--check", "--model", str(check_model)])
    if check:
        print(f"loss check: max rel diff {check['max_rel_diff']:.2e}", flush=True)
    write_results(rows, meta, check, args.out)
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
