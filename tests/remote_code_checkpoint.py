"""A tiny checkpoint that needs its own code (``trust_remote_code``), as many Hub models do.

Its code is a Llama whose forward, like InternLM2's original code, builds a plain causal mask
over the whole row (so packed samples see each other) and takes no ``logits_to_keep``.
"""

from __future__ import annotations

import json
from pathlib import Path

MODELING = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM
{extra_import}

class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        if attention_mask is None and input_ids is not None:
            attention_mask = torch.ones_like(input_ids)  # one causal block per row, whatever the positions
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=past_key_values,
                               inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **kwargs)
'''


def make_remote_code_model(out: Path, tokenizer_dir: Path, needs_package: str | None = None) -> Path:
    """A 2-layer random model in OUT whose class lives in OUT/modeling_tiny_remote.py; the
    tokenizer is copied from TOKENIZER_DIR. NEEDS_PACKAGE: the code imports it (to test a
    missing dependency)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "configuration_tiny_remote.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyRemoteConfig(LlamaConfig):\n"
        "    model_type = 'tiny_remote'\n")
    extra = f"import {needs_package}  # noqa" if needs_package else ""
    (out / "modeling_tiny_remote.py").write_text(MODELING.format(extra_import=extra))
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
