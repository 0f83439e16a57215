"""The forgetting measure (evaluate/forgetting.py) on a tiny random model with a LoRA adapter."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.templates import get_template
from tuneforge.evaluate.forgetting import Answered, _encoded, measure_forgetting

ANSWERED = [Answered("Why is the sky blue?", "Light scatters off the air, blue the most.", True),
            Answered("写一首关于冬天的短诗。", "雪花飘落，大地一片白。", True),
            Answered("Tell me a short fable.", "A fox saw some grapes hanging high and", False),
            Answered("Hi", "Hello!", True)]


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def _perturb(model, scale: float) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def test_an_adapter_that_changes_nothing_scores_zero_and_full_agreement(lora_model, tokenizer):
    template = get_template("auto", tokenizer)
    fresh = measure_forgetting(lora_model, lora_model.disable_adapter, tokenizer, template, ANSWERED)
    assert (fresh.kl, fresh.top1_agreement) == (0.0, 1.0)  # LoRA's B starts at zero
    _perturb(lora_model, 0.5)
    with lora_model.disable_adapter():  # the adapter switched off on both sides
        off = measure_forgetting(lora_model, lora_model.disable_adapter, tokenizer, template, ANSWERED)
    assert (off.kl, off.top1_agreement) == (0.0, 1.0)
    assert fresh.tokens == off.tokens > 20


def test_kl_and_agreement_equal_each_answer_scored_alone(lora_model, tokenizer, tiny_model_dir):
    """Batched and padded, the figures are those of each sequence run alone against a separately
    loaded base, over exactly the answer tokens (the end-of-turn marker only where the answer finished)."""
    from transformers import AutoModelForCausalLM

    template = get_template("auto", tokenizer)
    _perturb(lora_model, 0.5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora_model.train()
    got = measure_forgetting(lora_model, base, tokenizer, template, ANSWERED, batch_size=3)
    assert lora_model.training and not base.training  # each left in the mode it was in
    lora_model.eval()

    kl, agree, tokens = 0.0, 0, 0
    for item in ANSWERED:
        ids, labels = _encoded(tokenizer, template, item, 1024)
        answer = tokenizer.decode([t for t in labels if t != -100])
        assert answer.startswith(item.answer) and answer.endswith("<|im_end|>") == item.finished
        positions = [t - 1 for t, lab in enumerate(labels) if lab != -100]
        x = torch.tensor([ids])
        with torch.no_grad():
            lt = torch.log_softmax(lora_model(input_ids=x).logits[0, positions], -1)
            lb = torch.log_softmax(base(input_ids=x).logits[0, positions], -1)
        kl += float(torch.nn.functional.kl_div(lb, lt, log_target=True, reduction="sum"))
        agree += int((lt.argmax(-1) == lb.argmax(-1)).sum())
        tokens += len(positions)
    assert got.tokens == tokens
    assert got.kl == pytest.approx(kl / tokens, rel=1e-4)
    assert got.top1_agreement == agree / tokens
    assert got.kl > 0.01 and got.top1_agreement < 1  # the perturbed adapter did move the model
