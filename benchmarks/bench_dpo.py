"""DPO on one GPU, in one run: tuneforge (through the recipe `tuneforge train` runs) against TRL's
DPOTrainer, on the same random-initialised 7B-shaped model, the same preference pairs in the same
order and the same settings. Each row runs in its own process (bench_side_by_side.py's machinery),
so that its peak memory is its own and a row that fails is that row's error.

    python benchmarks/bench_dpo.py --out DIR                     # both rows, InternLM2.5-7B shapes
    python benchmarks/bench_dpo.py --tiny --out DIR              # a CPU smoke run, tiny shape
    python benchmarks/bench_dpo.py --render DIR/results.json     # into benchmarks/RESULTS.md

On the lent GPU machine (TRL 1.15 and datasets travel in .carry/site.tar.gz, built by
benchmarks/peer_site.sh), in one call of under 9 minutes:

    mkdir -p /tmp/site && tar xzf .carry/site.tar.gz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 && python3 benchmarks/bench_dpo.py --out $OUT --deadline 500

Pairs: a prompt of ~--prompt tokens (256) and a chosen and a rejected answer of ~--answer tokens
(2048) each, every length drawn uniformly within +-25%, random token ids, each answer ending with
EOS; --pairs pairs per optimizer step (1). Both rows: LoRA r 64 / alpha 16 / dropout 0 on all
seven projections, DPO with the sigmoid loss, beta 0.1, the reference = the same model with the
adapter disabled, AdamW lr 5e-6 with cosine decay and no warm-up, clipping 1.0, bf16 weights with
bf16 autocast (adapters fp32), gradient checkpointing as each does by default.

- tuneforge: ``Recipe.setup(rows=...)`` and ``Recipe.step`` with objective='dpo'; a step's pairs
  are one packed row (each answer after its own copy of the prompt, varlen attention, no padding).
- TRL: ``DPOTrainer(model, args=DPOConfig(...), train_dataset, processing_class, peft_config)`` on
  the text of the same ids (a word-level tokenizer with a word per id; the tokenized dataset is
  checked to be exactly the pairs' ids), ``max_length=None`` (nothing truncated), its defaults
  otherwise: chosen and rejected padded to the longer one (TRL 1.15 has no padding-free path),
  its fused LM head, gradient checkpointing, adamw_torch_fused. Pairs in dataset order
  (train_sampling_strategy='sequential'); the recipe's rows are placed where its per-epoch shuffle
  takes step s's row at step s, so both rows train the same pairs at the same step.

Measured: trained tokens/s = (prompt + chosen + rejected) tokens of the pairs stepped in the timed
steps (after --warmup steps), over those steps' wall time (each step's end synchronised with the
GPU: tuneforge's loop around ``Recipe.step``, TRL's between its callbacks' ``on_step_end``, data
loading and logging included); peak memory = torch.cuda.max_memory_allocated / reserved of the
row's process; the loss at the first and the last step (log 2 = 0.693 at the first: reference =
policy). "positions" is what the model ran per step: tuneforge's packed row, TRL's padded batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_side_by_side as sbs  # noqa: E402  (after the path: it lies beside this file)

GIB = 1 << 30
MARK = "dpo"
SEED = 0
BETA = 0.1
EOS = 2  # bench_train's model config and tokenizer
ROWS = {  # run -> what its table row says about it
    "tuneforge-dpo": {"engine": "tuneforge", "note": "Recipe.step, objective='dpo': a pair's answers packed in one row"},
    "trl-dpo": {"engine": "trl", "note": "DPOTrainer + peft_config: chosen/rejected padded to the longer"},
    # at no more memory than TRL's row (19.6 GiB allocated on the H200, 2026-12-02): the memory
    # plan recomputes layers to fit, as it would for a user who sets the cap
    "tuneforge-dpo-19gib": {"engine": "tuneforge", "budget_gib": 19.0,
                            "note": "as tuneforge-dpo, memory_budget_gib=19"},
    # the plan underestimates a preference run's peak by ~2 GiB (19 gave 20.95): the cap that lands
    # under TRL's peak
    "tuneforge-dpo-17gib": {"engine": "tuneforge", "budget_gib": 17.5,
                            "note": "as tuneforge-dpo, memory_budget_gib=17.5"},
}
MIN_SECONDS = {"tuneforge-dpo": 60, "trl-dpo": 60, "tuneforge-dpo-19gib": 60, "tuneforge-dpo-17gib": 60}  # a row is not started with less left: load, compile, steps
# what tuneforge's row sets beyond bench_train.tuneforge_settings (LoRA r64/16/0 on all seven, ...)
TUNEFORGE_DPO = {"objective": "dpo", "dpo_loss": "sigmoid", "beta": BETA, "warmup_ratio": 0.0, "seed": SEED}


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def tokens(self) -> int:
        """Trained tokens, as both rows count them: the prompt once and both answers."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def make_pairs(n: int, prompt: int, answer: int, vocab: int, seed: int = SEED) -> list[Pair]:
    """N pairs of random ids (no special token inside, EOS last in each answer), every length
    drawn uniformly within +-25% of PROMPT and ANSWER."""
    import torch
    from bench_train import SPECIAL_TOKENS

    g = torch.Generator().manual_seed(seed)

    def ids(mean: int, eos: bool) -> list[int]:
        n_ids = int(torch.randint(max(1, round(0.75 * mean)), round(1.25 * mean) + 1, (1,), generator=g))
        out = torch.randint(len(SPECIAL_TOKENS), vocab, (n_ids,), generator=g).tolist()
        return out[:-1] + [EOS] if eos else out

    return [Pair(ids(prompt, False), ids(answer, True), ids(answer, True)) for _ in range(n)]


def by_step(pairs: list[Pair], per_step: int) -> list[list[Pair]]:
    return [pairs[i:i + per_step] for i in range(0, len(pairs), per_step)]


# ---------------------------------------------------------------- the two rows

def pair_rows(steps: list[list[Pair]], seed: int = SEED) -> list:
    """Each step's pairs as one packed preference row, as tuneforge's data pipeline builds them
    (each answer after its own copy of the prompt; labels on the answers only), placed where the
    recipe's per-epoch shuffle (seed SEED, one row per step) takes step s's row at step s."""
    from tuneforge.data.batching import micro_batches
    from tuneforge.data.encode import IGNORE, Encoded
    from tuneforge.data.pack import assemble_pairs

    def sides(p: Pair) -> list[Encoded]:
        return [Encoded(p.prompt + a, [IGNORE] * len(p.prompt) + a) for a in (p.chosen, p.rejected)]

    rows = [assemble_pairs([s for p in pairs for s in sides(p)]) for pairs in steps]
    placed: list = [None] * len(rows)
    for s, row in enumerate(rows):
        placed[micro_batches(range(len(rows)), 1, 1, seed, s)[0][0]] = row
    return placed


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def tuneforge_row(args: argparse.Namespace, steps: list[list[Pair]], dev: str, budget_gib: float | None = None) -> dict:
    """tuneforge through the recipe (bench_train.tuneforge): set up once, then one
    ``Recipe.step`` per step, timed to the GPU's end of it."""
    import bench_train

    rows = pair_rows(steps)
    t0 = time.time()
    step = bench_train.tuneforge(bench_train.Run("tuneforge", "lora", "full", budget_gib=budget_gib), args.model, args.lr,
                                 max(map(len, rows)), len(rows), rows=rows, settings=TUNEFORGE_DPO)
    load_s = time.time() - t0
    step_s, losses, positions = [], [], []
    for i in range(len(rows)):
        t1 = time.time()
        positions.append(step(i))  # the packed row's length: no padding at one row per step
        sync(dev)
        step_s.append(time.time() - t1)
        losses.append(step.last_loss)
    return {"load_s": load_s, "step_s": step_s, "losses": losses, "positions": positions, "plan": step.plan,
            "settings": {**TUNEFORGE_DPO, **({"memory_budget_gib": budget_gib} if budget_gib else {})}}


def as_text(ids: list[int]) -> str:
    from bench_train import id_word

    return " ".join(map(id_word, ids))


def trl_dataset(pairs: list[Pair]):
    """The pairs as TRL's standard prompt/chosen/rejected text: TRL appends the completion to the
    prompt as strings, so the prompt ends with the space between them."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": as_text(p.prompt) + " ", "chosen": as_text(p.chosen),
                               "rejected": as_text(p.rejected)} for p in pairs])


def check_tokenized(dataset, pairs: list[Pair]) -> None:
    """TRL's tokenized dataset must be exactly the pairs' ids (nothing added, merged or cut)."""
    for k, (got, p) in enumerate(zip(dataset, pairs, strict=True)):
        if (got["prompt_ids"], got["chosen_ids"], got["rejected_ids"]) != (p.prompt, p.chosen, p.rejected):
            raise RuntimeError(f"pair {k}: TRL tokenized the pair into other ids than the pair's own")


def trl_positions(steps: list[list[Pair]]) -> list[int]:
    """What TRL's collator gives the model per step: 2 x pairs sequences (prompt + answer), right-
    padded to the longest of them."""
    return [2 * len(s) * max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in s) for s in steps]


def trl_row(args: argparse.Namespace, steps: list[list[Pair]], dev: str) -> dict:
    """TRL's DPOTrainer as its docs use it with LoRA: the base model and a peft_config (so the
    reference is the model with the adapter disabled), a dataset, a tokenizer; trainer.train()."""
    import bench_train
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = dev == "cuda"
    pairs = [p for s in steps for p in s]

    class Clock(TrainerCallback):
        """Each step's end, synchronised with the GPU, and each logged loss."""

        def __init__(self) -> None:
            self.begin, self.ends, self.losses = None, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            if self.begin is None:
                sync(dev)
                self.begin = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            sync(dev)
            self.ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    t0 = time.time()
    tokenizer = bench_train.make_tokenizer(bench_train.model_config(args.shape, None).vocab_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", device_map=dev)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1, max_steps=len(steps), learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=None,
        bf16=cuda, seed=SEED, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    peft_config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=bench_train.TARGETS,
                             task_type="CAUSAL_LM")
    clock = Clock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=trl_dataset(pairs), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    check_tokenized(trainer.train_dataset, pairs)
    load_s = time.time() - t0
    trainer.train()
    ends = [clock.begin, *clock.ends]
    return {"load_s": load_s, "step_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
            "losses": clock.losses, "positions": trl_positions(steps),
            "settings": {"optim": getattr(config.optim, "value", str(config.optim)), "gradient_checkpointing": config.gradient_checkpointing,
                         "padding_free": trainer.padding_free, "precompute_ref_log_probs": config.precompute_ref_log_probs,
                         "reference": "adapter disabled" if trainer.ref_model is None and
                         "ref" not in trainer.model.peft_config else "a separate model or adapter",
                         "max_length": config.max_length, "bf16": config.bf16}}


def worker(name: str, args: argparse.Namespace) -> dict:
    import bench_train
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = bench_train.model_config(args.shape, None).vocab_size
    steps = by_step(make_pairs(args.pairs * (args.warmup + args.steps), args.prompt, args.answer, vocab), args.pairs)
    if ROWS[name]["engine"] == "tuneforge":
        got = tuneforge_row(args, steps, dev, ROWS[name].get("budget_gib"))
    else:
        got = trl_row(args, steps, dev)
    if len(got["step_s"]) != len(steps):
        raise RuntimeError(f"{len(got['step_s'])} steps timed of {len(steps)}")
    timed = range(args.warmup, len(steps))
    tokens = sum(p.tokens for i in timed for p in steps[i])
    secs = sum(got["step_s"][i] for i in timed)
    engine = ROWS[name]["engine"]
    return {"run": name, "tokens_per_s": round(tokens / secs, 1), "timed_tokens": tokens,
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if dev == "cuda" else None,
            "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if dev == "cuda" else None,
            "load_s": round(got["load_s"], 1), "warmup_s": [round(x, 3) for x in got["step_s"][:args.warmup]],
            "step_s": [round(x, 3) for x in got["step_s"][args.warmup:]],
            "losses": [round(x, 4) for x in got["losses"]], "pair_tokens": [sum(p.tokens for p in s) for s in steps],
            "positions": got["positions"], "plan": got.get("plan", ""), "settings": got["settings"],
            "versions": sbs.package_versions(["torch", "transformers", "peft", "accelerate"]
                                             + (["trl", "datasets"] if engine == "trl" else []))}


# ---------------------------------------------------------------- results

def with_derived(rows: list[dict]) -> list[dict]:
    """Each row with its speed and its peak memory against the TRL row's."""
    trl = next((r for r in rows if r.get("engine") == "trl" and r.get("tokens_per_s")), None)
    out = []
    for r in rows:
        r = dict(r)
        if trl and r.get("tokens_per_s"):
            r["vs_trl"] = round(r["tokens_per_s"] / trl["tokens_per_s"], 2)
            if r.get("peak_gib") and trl.get("peak_gib"):
                r["memory_vs_trl"] = round(r["peak_gib"] / trl["peak_gib"], 2)
        out.append(r)
    return out


def render_table(rows: list[dict], meta: dict) -> str:
    v = meta.get("versions", {})
    lines = [f"Measured {meta['date']} on {meta['gpu']}, model shape {meta['shape']} (random weights); "
             f"{meta['pairs']} pair(s) per step of a ~{meta['prompt']}-token prompt and ~{meta['answer']}-token "
             f"chosen and rejected answers (random ids, the same pairs at the same steps in both rows); LoRA r64 / "
             f"alpha 16 / dropout 0 on all seven projections, DPO sigmoid, beta {BETA}, AdamW lr {meta['lr']}; "
             f"{meta['warmup']} warm-up + {meta['steps']} timed steps per row; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, peft {meta['peft']}, trl {v.get('trl') or '-'}. tokens/s: (prompt + chosen + "
             "rejected) tokens of the pairs stepped per second; positions: what the model ran per step (TRL pads).",
             f"Command: `{meta['command']}`", "",
             "| run | tokens/s | vs TRL | peak GiB (allocated / reserved) | memory vs TRL | loss first -> last | "
             "positions / step | first step s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in with_derived(rows):
        if "error" in r:
            lines.append(f"| {r['run']} | - | | | | | | | **{r['error'].replace('|', '/')}** |")
            continue
        losses = r.get("losses") or []
        loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
        mem = f"{r['peak_gib']} / {r['reserved_gib']}" if r.get("peak_gib") is not None else "n/a (CPU)"
        positions = round(sum(r["positions"]) / len(r["positions"])) if r.get("positions") else ""
        first = r["warmup_s"][0] if r.get("warmup_s") else ""
        lines.append(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r.get('vs_trl') or ''} | {mem} | "
                     f"{r.get('memory_vs_trl') or ''} | {loss} | {positions} | {first} | {r['note']} |")
    return "\n".join(lines)


def with_versions(rows: list[dict], meta: dict) -> dict:
    """META with the TRL row's package versions (trl, datasets), once it has run."""
    got = next((r["versions"] for r in rows if r.get("engine") == "trl" and "versions" in r), None)
    return {**meta, "versions": got or meta.get("versions", {})}


def write_results(rows: list[dict], meta: dict, out: Path) -> None:
    """OUT/results.json under the key "dpo" and the table between the "dpo" markers of
    OUT/RESULTS.md; other benchmarks' parts of both files are kept."""
    meta = with_versions(rows, meta)
    sbs.write_marked(out, MARK, {"meta": meta, "rows": with_derived(rows)}, render_table(rows, meta))


def describe(result: dict) -> str:
    losses = result["losses"]
    return (f"{result['tokens_per_s']:,.0f} tok/s, peak {result['peak_gib']} GiB (reserved {result['reserved_gib']}), "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, steps {result['step_s']}, warm-up {result['warmup_s']}")


# ---------------------------------------------------------------- the driver

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny shape, short pairs, 1 + 1 steps: a CPU smoke run")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens, about (256; 16 with --tiny)")
    ap.add_argument("--answer", type=int, default=None, help="tokens of each answer, about (2048; 48 with --tiny)")
    ap.add_argument("--pairs", type=int, default=1, help="pairs per optimizer step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (8; 1 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="steps before the timed ones, at least 1 (2; 1 with --tiny)")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: rows that would start too late are recorded as not run")
    ap.add_argument("--model", type=Path, default=None, help="where the random model is written (and reused)")
    ap.add_argument("--out", type=Path, default=HERE, help="results.json, RESULTS.md, log.txt")
    ap.add_argument("--render", type=Path, default=None,
                    help="a results.json from another machine: write it into benchmarks/ and stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--info", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tiny = args.tiny or args.shape == "tiny"
    args.shape = args.shape or ("tiny" if tiny else "internlm2.5-7b")
    args.prompt = args.prompt or (16 if tiny else 256)
    args.answer = args.answer or (48 if tiny else 2048)
    args.steps = args.steps or (1 if tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    if args.warmup < 1 or args.steps < 1 or args.pairs < 1:
        ap.error("--warmup, --steps and --pairs must be at least 1 (the timed steps start after a warm-up step)")
    args.model = args.model or sbs.model_dir(args.shape)
    return args


def main() -> None:
    args = parse_args()
    if args.render:
        sbs.render_saved(args.render, MARK, write_results, render_table)
        return
    if args.one or args.info:
        print("RESULT " + json.dumps(sbs.make_model(args) if args.info else worker(args.one, args)), flush=True)
        return
    started = time.time()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; rows are: {', '.join(ROWS)}")
    forwarded = ["--shape", args.shape, "--prompt", str(args.prompt), "--answer", str(args.answer), "--pairs",
                 str(args.pairs), "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr),
                 "--model", str(args.model)]
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "log.txt"
    log_file.write_text("")

    def left() -> float:
        return 3600.0 if args.deadline is None else args.deadline - (time.time() - started)

    info, log = sbs.child([*forwarded, "--info"], timeout=min(600, left()), script=Path(__file__))
    with log_file.open("a") as f:
        f.write(f"===== model\n{log}\n")
    if "error" in info:
        sys.exit(f"could not make the model: {info['error']} (see {log_file})")
    meta = {**info, "date": datetime.date.today().isoformat(), "shape": args.shape, "prompt": args.prompt,
            "answer": args.answer, "pairs": args.pairs, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
            "log2": math.log(2), "command": "python benchmarks/bench_dpo.py " + " ".join(sys.argv[1:])}
    print(f"{meta['gpu']}: model {args.model} [{time.time() - started:.0f}s]", flush=True)
    rows = sbs.run_each(names, {n: ROWS[n] for n in names}, forwarded, left, MIN_SECONDS, log_file,
                        lambda done: write_results(done, meta, args.out), describe=describe, script=Path(__file__))
    write_results(rows, meta, args.out)
    print(render_table(rows, with_versions(rows, meta)), flush=True)
    print(f"total {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
