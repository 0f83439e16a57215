"""portable_tokenizer_settings: what tokenizer_config.json says, so that transformers 4.x reads it."""

from __future__ import annotations

from tuneforge.models.load import portable_tokenizer_settings

HUGE = int(1e30)  # transformers' VERY_LARGE_INTEGER: "no limit set"


def test_a_class_both_versions_know_is_kept_and_a_5_only_one_replaced():
    for name in ("GPT2Tokenizer", "LlamaTokenizer", "LlamaTokenizerFast", "PreTrainedTokenizerFast"):
        assert portable_tokenizer_settings({"tokenizer_class": name})["tokenizer_class"] == name
    for name in ("TokenizersBackend", "SentencePieceBackend", "NoSuchTokenizer"):
        assert portable_tokenizer_settings({"tokenizer_class": name})["tokenizer_class"] == "PreTrainedTokenizerFast"
    remote = {"tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": ["a.B", None]}}
    assert portable_tokenizer_settings(remote)["tokenizer_class"] == "InternLM2Tokenizer"
    assert "tokenizer_class" not in portable_tokenizer_settings({})


def test_model_max_length_comes_from_the_context_when_unset_or_absurd():
    assert portable_tokenizer_settings({"model_max_length": HUGE}, 8192)["model_max_length"] == 8192
    assert portable_tokenizer_settings({}, 4096)["model_max_length"] == 4096
    assert portable_tokenizer_settings({"model_max_length": 2048}, 8192)["model_max_length"] == 2048
    assert portable_tokenizer_settings({"model_max_length": HUGE})["model_max_length"] == HUGE  # no context known


def test_list_extra_special_tokens_move_where_4x_reads_them_and_template_is_inlined():
    out = portable_tokenizer_settings({"extra_special_tokens": ["<a>", "<b>"], "is_local": True,
                                       "local_files_only": False}, chat_template="{{ x }}")
    assert out == {"additional_special_tokens": ["<a>", "<b>"], "chat_template": "{{ x }}"}
    kept = portable_tokenizer_settings({"chat_template": "mine"}, chat_template="other")
    assert kept["chat_template"] == "mine"
