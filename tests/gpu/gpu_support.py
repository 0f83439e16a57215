"""What the GPU tests share: a tokenizer, packed rows, the recipe set up on them."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 4096


def word_tokenizer():
    """Token ids are the workload, so a word-level tokenizer with a ChatML template is enough
    (nothing is downloaded on the GPU machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(VOCAB - 5)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        chat_template="{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                      "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                      "{% endif %}")


def packed_rows(n: int, length: int, seed: int = 0, samples: int = 4, alphabet: int = VOCAB - 5):
    """N packed rows of LENGTH tokens, each SAMPLES samples of random lengths, every token trained
    (as a pre-training row is). Tokens are drawn from ALPHABET ids: a small one is quickly
    learnt (the loss falls towards log(ALPHABET)), the whole vocabulary is noise.
"""

    from tuneforge.data.pack import Row

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        cuts = sorted(torch.randperm(length - 1, generator=g)[:samples - 1].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
        ids = torch.randint(5, 5 + alphabet, (length,), generator=g).tolist()
        rows.append(Row(ids, list(ids), [i for n_ in lengths for i in range(n_)]))
    return rows


def set_up(model_dir: Path, work: Path, rows, compile: bool = True, **settings):
    """The recipe `tuneforge train` runs, set up on ROWS with SETTINGS over a small LoRA config."""
    from tuneforge.config.load import build_config
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import Recipe

    base = dict(pretrained_model_name_or_path=str(model_dir), method="lora", lora_r=16, lora_alpha=32,
                lora_dropout=0.0, data_files="unused.jsonl", max_length=len(rows[0]), batch_size=1,
                accumulative_counts=1, lr=2e-3, warmup_ratio=0.0, max_steps=len(rows),
                save_steps=10**9, save_last=False, evaluation_inputs=[], identity_guard=False,
                replay_general=False, seed=0)
    cfg = build_config({**base, **settings})
    recipe = Recipe(cfg, work, RunOptions(progress=False, compile=compile))
    recipe.setup(rows=rows)
    return recipe


def losses(recipe, steps: int) -> list[float]:
    return [recipe.step(i)[0] for i in range(steps)]


def word_chats(path: Path, n: int = 200) -> Path:
    """A chat data file in the word tokenizer's words: each answer is the question's words
    shifted by one, which a LoRA learns within a few steps."""
    import json
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(n):
        q = [rng.randrange(5, 69) for _ in range(rng.randrange(4, 12))]
        lines.append(json.dumps({"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in q)},
                                              {"role": "assistant", "content": " ".join(f"w{i + 1}" for i in q)}]}))
    path.write_text("\n".join(lines) + "\n")
    return path
