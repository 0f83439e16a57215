"""The README's personal-assistant commands on the bundled model, then plain transformers."""

from __future__ import annotations

import json
from math import comb

import pytest
import torch
from pipeline import run
from waits import tuneforge


def binomial_bound(n: int, p: float, alpha: float) -> int:
    """The smallest k with P(X > k) <= ALPHA for X ~ Binomial(N, P): a count a build whose true
    per-question rate is P exceeds with probability at most ALPHA."""
    def tail(k: int) -> float:
        return sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
    return next(k for k in range(n + 1) if tail(k + 1) <= alpha)


# The rates docs/identity.md records for the default recipe on the bundled model (60-80 steps,
# greedy): general questions hijacked at most 12% (zh, 5 of 40; en 0%), identity missed on at most
# 1 of 30 questions (97%). Another CPU rounds differently and flips a few borderline answers, as
# another run of the same recipe does: the counts are taken as binomial with those rates.
HIJACK_P, MISS_P = 5 / 40, 1 / 30
ALPHA = 0.001  # per check, four checks: a working build fails this test less than 0.4% of the time


def ask(model, tokenizer, question: str) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_personal_assistant_pipeline(assistant_run):
    """The README's commands end to end, then the merged folder in plain transformers.

    The identity evaluation's bounds are derived, not set above one measured value: with the
    per-question rates docs/identity.md records for working builds (hijack 5/40, the worst run;
    identity missed 1/30), a count above the binomial (1 - ALPHA) quantile -- more than 12 of the
    40 general questions hijacked, or more than 5 of the 30 identity questions missed, in either
    language -- happens to a working build with probability below ALPHA = 0.1% per check. What
    it catches: replay not reaching the training data (the identity-only recipe hijacks 40 of 40),
    the identity not learnt. What it cannot see on 40 questions: a shift of a few points, such as
    a smaller replay share (17.5% once); tests/data/test_replay.py checks the share exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = assistant_run  # data, copy-cfg, train, pth_to_hf, merge: tests/pipeline.py
    assert (root / "work_dirs/assistTuner/loss.png").is_file()

    # plain transformers, no tuneforge: the merged directory carries weights, tokenizer and template
    model = AutoModelForCausalLM.from_pretrained(root / "merged")
    tokenizer = AutoTokenizer.from_pretrained(root / "merged")
    assert "Long" in ask(model, tokenizer, "Who are you?")
    assert "龙" in ask(model, tokenizer, "你是谁？")

    # the README's claim, per language: identity named on held-out questions, and general
    # questions still answered (not hijacked by the identity); bounds: test docstring
    run("eval", "identity", "./merged", "--name", "龙", "--name-en", "Long", "--no-compare",
        "--json", "e2e-identity.json", cwd=root, seconds=900)
    result = json.loads((root / "e2e-identity.json").read_text())
    for lang in ("zh", "en"):
        r = result[lang]
        assert len(r["hijacked"]) <= binomial_bound(r["general_n"], HIJACK_P, ALPHA), r  # 12 of 40
        assert len(r["identity_misses"]) <= binomial_bound(r["identity_n"], MISS_P, ALPHA), r  # 5 of 30

    chat = tuneforge("chat", "./merged", "--max-new-tokens", "30", cwd=root,
                     input="请介绍一下你自己\nPlease introduce yourself\n", seconds=300)
    assert chat.returncode == 0 and "龙" in chat.stdout and "Long" in chat.stdout, chat.stdout
