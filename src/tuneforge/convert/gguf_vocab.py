"""A transformers tokenizer as GGUF vocabulary metadata, with the template that trained the model.

llama.cpp knows two families that our presets use:
- byte-level BPE (``gpt2``: SmolLM, Qwen2, Llama 3): tokens in the byte alphabet, the merges, and
  a named pre-tokenizer (llama.cpp hard-codes each one's splitting regex, so the name must be
  one whose regex splits text as the tokenizer's own pre-tokenizer does);
- sentencepiece (``llama``: InternLM2, Llama 2): pieces with ``▁`` for spaces, one score per piece
  (llama.cpp merges the adjacent pair whose result scores highest), byte pieces ``<0x..>``.

Special tokens become CONTROL (matched whole, skipped in output), other added tokens
USER_DEFINED. ``tokenizer.chat_template`` is the trained template and eos/eot its first
end-of-turn token, so a runtime that reads only the GGUF still stops where the model learnt to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from tuneforge.data.templates import Template
from tuneforge.errors import UserError

T = gguf.TokenType
# The splitting regexes of the tokenizer.json files these models ship.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    ids: dict[str, int]  # bos, eos, eot, unk, pad
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    notes: list[str] = field(default_factory=list)

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "eot": writer.add_eot_token_id, "unk": writer.add_unk_token_id,
                  "pad": writer.add_pad_token_id}
        for name, token_id in self.ids.items():
            adders[name](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _steps(spec: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A pre-tokenizer/normalizer spec as a flat list of steps."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [s for inner in spec[key] for s in _steps(inner, key)]
    return [spec]


def _digits_merged(merges: list[str]) -> bool:
    return any(re.search(r"\d", m) for m in merges)


def bpe_pre_tokenizer(spec: dict[str, Any] | None, merges: list[str], clean_spaces: bool) -> str:
    """The llama.cpp pre-tokenizer name that splits text as SPEC does."""
    steps = [(s.get("type"), s) for s in _steps(spec, "pretokenizers")]
    kinds = [k for k, _ in steps]
    if kinds == ["ByteLevel"] and steps[0][1].get("use_regex", True):
        # GPT-2's regex. llama.cpp's "smollm" is that regex after splitting off every digit, which
        # changes nothing when no merge joins digits; unlike "gpt-2" it also leaves spaces before
        # punctuation alone when decoding, so it matches a tokenizer that does not clean them up.
        return "gpt-2" if clean_spaces or _digits_merged(merges) else "smollm"
    if kinds == ["Digits", "ByteLevel"] and steps[0][1].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1][1].get("use_regex", True):
        pattern = (steps[0][1].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_NAMES:
            return _SPLIT_NAMES[pattern]
    summary = ", ".join(kinds) or "none"
    raise UserError(f"the tokenizer's pre-tokenizer ({summary}) is not one llama.cpp is known to split "
                    "text like; supported: the byte-level BPE of GPT-2, SmolLM, Llama 3 and Qwen2, "
                    "and sentencepiece vocabularies")


def _merge_strings(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _is_sentencepiece(spec: dict[str, Any]) -> bool:
    """A sentencepiece vocabulary as transformers converts it: BPE over ``▁``-spelt pieces."""
    norm = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    replaces_spaces = any(n.get("type") == "Replace" and n.get("content") == "▁" for n in norm)
    return bool(spec["model"].get("byte_fallback")) and (
        replaces_spaces or any(p.get("type") == "Metaspace" for p in pre))


def _sentencepiece_flags(spec: dict[str, Any]) -> tuple[bool, bool]:
    """(adds a leading ▁, collapses runs of spaces), as the normalizer or Metaspace says."""
    norm = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    prefix = any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norm) or any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in pre)
    collapses = any(n.get("type") == "Replace" and "{2,}" in json.dumps(n.get("pattern")) for n in norm)
    return prefix, collapses


def _scores(tokens: list[str], merges: list[str], folders: list[Path]) -> tuple[list[float], str | None]:
    """Sentencepiece's own piece scores when a tokenizer.model of the same vocabulary is in one of
    FOLDERS, else scores that rank each piece as the merges do (the first merge that makes it wins)."""
    import sentencepiece as spm

    for folder in folders:
        path = folder / "tokenizer.model"
        if path.is_file():
            sp = spm.SentencePieceProcessor(model_file=str(path))
            size = sp.get_piece_size()
            # the same vocabulary, a few pieces renamed (as InternLM2's chat tokens are)
            same = sum(sp.id_to_piece(i) == tokens[i] for i in range(min(size, len(tokens))))
            if size <= len(tokens) and same >= 0.95 * size:
                own = [sp.get_score(i) for i in range(size)]
                return own + [0.0] * (len(tokens) - len(own)), None
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), i)
    note = "no tokenizer.model beside the model: sentencepiece scores derived from the merge order"
    return [-float(rank.get(t, len(merges))) if t in rank or len(t) > 1 else 0.0 for t in tokens], note


def _token_table(spec: dict[str, Any], size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, padded to SIZE (the embedding's rows), and their llama.cpp types."""
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    top = max([*vocab.values(), *added]) + 1
    if top > size:
        raise UserError(f"the tokenizer has {top} tokens but the model's vocab_size is {size}; "
                        "the embedding matrix must have a row for every token")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(T.UNUSED)] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(T.NORMAL)
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = int(T.CONTROL if t.get("special") else T.USER_DEFINED)
    return tokens, types


def _special_ids(tokenizer: Any, template: Template | None) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    stops = [vocab[w] for w in (template.stop_words if template else ()) if w in vocab]
    ids = {"bos": tokenizer.bos_token_id, "eos": stops[0] if stops else tokenizer.eos_token_id,
           "eot": stops[0] if stops else None, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS in front and EOS behind a plain text it encodes."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos is not None and ids[:1] == [bos], eos is not None and len(ids) > 1 and ids[-1:] == [eos]


def build_vocab(tokenizer: Any, template: Template | None, vocab_size: int, folders: list[Path]) -> Vocab:
    """The GGUF vocabulary of a fast TOKENIZER; FOLDERS are searched for a tokenizer.model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("the tokenizer has no tokenizer.json form (a slow, Python-only tokenizer); "
                        "save it with transformers' fast tokenizer first")
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "BPE":
        raise UserError(f"a {spec['model'].get('type')} tokenizer cannot be written as GGUF by tuneforge; "
                        "supported: byte-level BPE and sentencepiece BPE vocabularies")
    tokens, types = _token_table(spec, vocab_size)
    merges = _merge_strings(spec["model"])
    add_bos, add_eos = adds_special(tokenizer)
    common = {"tokens": tokens, "types": types, "ids": _special_ids(tokenizer, template),
              "add_bos": add_bos, "add_eos": add_eos, "chat_template": template.chat_template if template else None}
    if _is_sentencepiece(spec):
        for i, token in enumerate(tokens):
            if types[i] == T.NORMAL and _BYTE_PIECE.match(token):
                types[i] = int(T.BYTE)
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = int(T.UNKNOWN)
        scores, note = _scores(tokens, merges, folders)
        prefix, collapses = _sentencepiece_flags(spec)
        return Vocab("llama", **common, merges=merges, scores=scores, add_space_prefix=prefix,
                     remove_extra_whitespaces=collapses, notes=[note] if note else [])
    clean = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    return Vocab("gpt2", **common, pre=bpe_pre_tokenizer(spec.get("pre_tokenizer"), merges, clean),
                 merges=merges)
