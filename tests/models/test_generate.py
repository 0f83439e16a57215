from __future__ import annotations

import ast
from pathlib import Path

import torch

from tuneforge.data.templates import get_template
from tuneforge.models.generate import Sampling, generate_batch, is_4bit, unquantized_on_cpu
from tuneforge.models.load import load_model

SRC = Path(__file__).resolve().parents[2] / "src" / "tuneforge"


def test_batches_report_progress_and_match_one_by_one(tiny_model_dir, tokenizer):
    from tuneforge.models.generate import generate

    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    template = get_template("auto", tokenizer)
    chats = [[{"role": "user", "content": q}] for q in ["Hi", "What is 2+2?", "Name a colour.", "Why?", "Ok"]]
    calls = []
    replies = generate_batch(model, tokenizer, template, chats, Sampling(max_new_tokens=5), batch_size=2,
                             on_batch=lambda done, size: calls.append((done, size)))
    assert calls == [(2, 2), (4, 2), (5, 1)]
    # every reply, padded in a batch of two (or alone, the last), is the one asked alone
    alone = [generate(model, tokenizer, template, chat, Sampling(max_new_tokens=5)) for chat in chats]
    assert replies == alone and len(set(alone)) > 1  # and the prompts make a difference


def test_a_4bit_cpu_model_generates_through_its_unquantized_base(tiny_model_dir):
    cpu = torch.device("cpu")
    full = load_model(tiny_model_dir, cpu, torch.float32)
    with unquantized_on_cpu(full, tiny_model_dir) as same:
        assert same is full  # not quantized: the model answers itself
    q = load_model(tiny_model_dir, cpu, torch.float32, load_in_4bit=True)
    assert is_4bit(q) and not is_4bit(full)
    with unquantized_on_cpu(q, tiny_model_dir) as base:
        assert base is not q and not is_4bit(base)
        assert next(base.parameters()).dtype == torch.float32
        for (name, p), (_, p0) in zip(base.named_parameters(), full.named_parameters(), strict=True):
            assert torch.equal(p, p0), name


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_lower_layers_do_not_import_chat_or_serve():
    """DESIGN.md: nothing in data/, models/, fast/, train/ or evaluate/ imports from chat/ or serve/
    (generation primitives live in models/generate.py)."""
    bad = []
    for layer in ["config", "data", "models", "fast", "train", "evaluate"]:
        for f in sorted((SRC / layer).rglob("*.py")):
            bad += [f"{f.relative_to(SRC)}: {m}" for m in _imports(f)
                    if m.startswith(("tuneforge.chat", "tuneforge.serve"))]
    assert not bad
