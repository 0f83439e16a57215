"""Smoke-test the whole pipeline on whatever device is there, with a small random model.

For a GPU machine that has no bundled weights: it needs only a tokenizer folder.
    python scripts/gpu_smoke.py --tokenizer DIR --out DIR [--method lora|qlora|full]
Prints each step's outcome; exits non-zero when a step fails or the loss does not go down.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def tf(*args: str, cwd: Path) -> None:
    print("$ tuneforge", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--opt", nargs="*", default=[], help="more --cfg-options for train")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print(f"torch {torch.__version__} transformers {transformers.__version__} cuda {torch.cuda.is_available()}")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")

    tf("data", "self-cognition", "--name", "龙", "--name-en", "Long", "-o", "data/assistant.jsonl", cwd=out)
    tf("copy-cfg", "smollm2_135m_instruct_lora_assistant", ".", cwd=out)
    tf("train", "smollm2_135m_instruct_lora_assistant_copy.py", "--work-dir", "work", "--cfg-options",
       f"pretrained_model_name_or_path={str(out / 'base')!r}", f"method={args.method!r}", "max_steps=30",
       # replay targets from a random model are its own peaked outputs: meaningless, and their
       # loss rises as soon as the weights move, hiding whether training works
       "replay_general=False",
       "lr=1e-2" if args.method != "full" else "lr=1e-3", *args.opt, cwd=out)
    log = [json.loads(x) for x in (out / "work/train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    print(f"loss first {losses[0]:.3f} last {losses[-1]:.3f}")
    tf("convert", "pth_to_hf", "smollm2_135m_instruct_lora_assistant_copy.py", "work", "hf", cwd=out)
    if args.method != "full":
        tf("convert", "merge", str(out / "base"), "hf", "merged", "--device", "auto", cwd=out)
        subprocess.run([sys.executable, "-m", "tuneforge", "chat", "merged", "--max-new-tokens", "12"],
                       cwd=out, input="你是谁？\n", text=True, check=True)
        tf("eval", "identity", "merged", "--name", "龙", "--name-en", "Long", "--max-new-tokens", "8", cwd=out)
    if not losses[-1] < losses[0] - 0.5:
        sys.exit("loss did not go down")
    print("SMOKE OK")


if __name__ == "__main__":
    main()
