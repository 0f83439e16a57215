"""XTuner 0.x's dataset map functions (``dataset_map_fn=alpaca_zh_map_fn`` in a config), as our own
pure functions.

XTuner calls its map function on every raw record of the dataset and trains the record it returns,
``{"conversation": [{"system"?, "input", "output", ...}, ...]}``, which tuneforge reads as its
``conversation`` format. Each function here returns exactly what XTuner's returns, quirks included
(the ``instruction\\ninput`` join with its trailing newline when ``input`` is empty, several user
messages run together with no separator, the turns XTuner skips), so a config written for XTuner
trains the same text. Where XTuner would fail with a KeyError or TypeError (a missing or ill-typed
field) or train the literal ``None``, ``apply_map`` refuses the record with one line.

An empty ``conversation`` (alpaca's ``<nooutput>`` records, a chat with no answer) is a record XTuner
drops without a word (``process_hf_dataset`` filters them out): skip it, do not report it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge.errors import UserError

# XTuner's SYSTEM_TEMPLATE texts (xtuner/utils/templates.py), kept verbatim so records match: the map
# functions put them in each record's first turn as its system prompt. 'alpaca' is in no record
# (alpaca_map_fn sets no system); XTuner configs pass it as SYSTEM for the evaluation chats.
SYSTEM_TEXTS = {
    "alpaca": ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n"),
    "arxiv_gentile": ("If you are an expert in writing papers, please generate "
                      "a good paper title for this paper based on other authors' "
                      "descriptions of their abstracts.\n"),
    "colorist": ("You are a professional color designer. Please provide the "
                 "corresponding colors based on the description of Human.\n"),
    "coder": ("You are a professional programer. Please provide the "
              "corresponding code based on the description of Human.\n"),
    "lawyer": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
    "medical": "如果你是一名医生，请根据患者的描述回答医学问题。\n",
    "sql": ("If you are an expert in SQL, please generate a good SQL Query "
            "for Question based on the CREATE TABLE statement.\n"),
}


class FieldError(UserError):
    """A field a map function reads is missing, or not of the type XTuner's code needs there."""

    def __init__(self, field: str, value: Any = None, expected: type | None = None):
        self.field = field
        self.detail = "" if expected is None else f" as {_NAMES[expected]}, got {_kind(value)}"
        super().__init__(f"needs field '{field}'{self.detail}")


class RecordError(UserError):
    """A record XTuner's map function would stop on (NotImplementedError), other than a field."""


_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
          float: "a number", type(None): "null"}


def _kind(value: Any) -> str:
    return _NAMES.get(type(value), type(value).__name__)


def _get(record: dict, key: str, field: str | None = None, kind: type = str) -> Any:
    """RECORD[KEY], which must be a KIND (XTuner formats, concatenates or iterates it as one)."""
    if key not in record:
        raise FieldError(field or key)
    value = record[key]
    if not isinstance(value, kind):
        raise FieldError(field or key, value, kind)
    return value


def _turn(text: str, output: str, system: str | None = None) -> dict:
    """One XTuner turn; the system key only where XTuner's function writes one."""
    turn = {"input": text, "output": output}
    return turn if system is None else {"system": system, **turn}


def _one(record: dict, question: str, answer: str, system: str | None = None) -> dict:
    """The single-turn record most of XTuner's functions build: two fields, maybe a system text."""
    text = _get(record, question)
    return {"conversation": [_turn(text, _get(record, answer), system)]}


def _joined(record: dict, first: str, second: str, answer: str, system: str | None = None) -> dict:
    """``f"{first}\\n{second}"`` as the input, always joined: an empty SECOND leaves a trailing
    newline, as in XTuner (alpaca's "Give three tips.\\n")."""
    text = f"{_get(record, first)}\n{_get(record, second)}"
    return {"conversation": [_turn(text, _get(record, answer), system)]}


def alpaca_map_fn(record: dict) -> dict:
    """tatsu-lab/alpaca: instruction, input, output; ``<nooutput>`` answers are dropped; no system."""
    if record.get("output") == "<nooutput>":
        return {"conversation": []}
    return _joined(record, "instruction", "input", "output")


def alpaca_zh_map_fn(record: dict) -> dict:
    """silk-road/alpaca-data-gpt4-chinese: instruction_zh, input_zh, output_zh; no system."""
    return _joined(record, "instruction_zh", "input_zh", "output_zh")


def arxiv_map_fn(record: dict) -> dict:
    """arXiv abstracts -> titles."""
    return _one(record, "abstract", "title", SYSTEM_TEXTS["arxiv_gentile"])


def code_alpaca_map_fn(record: dict) -> dict:
    """HuggingFaceH4/CodeAlpaca_20K: prompt, completion."""
    return _one(record, "prompt", "completion", SYSTEM_TEXTS["coder"])


def colors_map_fn(record: dict) -> dict:
    """burkelibbey/colors: the description after its first ':' (stripped; none: ''), the color."""
    description = _get(record, "description").partition(":")[2].strip()
    return {"conversation": [_turn(description, _get(record, "color"), SYSTEM_TEXTS["colorist"])]}


def crime_kg_assitant_map_fn(record: dict) -> dict:
    """CrimeKgAssitant (XTuner's spelling): input, output."""
    return _one(record, "input", "output", SYSTEM_TEXTS["lawyer"])


def default_map_fn(record: dict) -> dict:
    """input, output; no system."""
    return _one(record, "input", "output")


def law_reference_map_fn(record: dict) -> dict:
    """Lawyer LLaMA's law reference data: question, answer."""
    return _one(record, "question", "answer", SYSTEM_TEXTS["lawyer"])


def medical_map_fn(record: dict) -> dict:
    """shibing624/medical: instruction, input, output."""
    return _joined(record, "instruction", "input", "output", SYSTEM_TEXTS["medical"])


def openorca_map_fn(record: dict) -> dict:
    """Open-Orca/OpenOrca: system_prompt (often ''), question, response."""
    system = _get(record, "system_prompt")
    return _one(record, "question", "response", system)


def sql_map_fn(record: dict) -> dict:
    """b-mc2/sql-create-context: context (the CREATE TABLE), question, answer."""
    return _joined(record, "context", "question", "answer", SYSTEM_TEXTS["sql"])


def stack_exchange_map_fn(record: dict) -> dict:
    """ArmelR/stack-exchange-instruction: question, response; no system."""
    return _one(record, "question", "response")


def tiny_codes_map_fn(record: dict) -> dict:
    """nampdn-ai/tiny-codes: prompt, response."""
    return _one(record, "prompt", "response", SYSTEM_TEXTS["coder"])


def pretrain_map_fn(record: dict) -> dict:
    """Plain text, all of it trained: empty input, the stripped text as output, and no EOS token
    after it (XTuner's pretrain configs also set no template_map_fn, so no chat template either)."""
    return {"conversation": [{"input": "", "output": _get(record, "text").strip(),
                              "need_eos_token": False}]}


def completion_map_fn(record: dict) -> dict:
    """Like pretrain_map_fn, but the EOS token is kept (and trained)."""
    return {"conversation": [{"input": "", "output": _get(record, "text").strip()}]}


_OASST1_TAGS = ("Human:", "Assistant:")


def oasst1_map_fn(record: dict) -> dict:
    """timdettmers/openassistant-guanaco: ``text`` as ``### Human: ... ### Assistant: ...``.

    As XTuner: the text is cut at every ``###``; pieces that start with ``Human:`` or ``Assistant:``
    are kept in order (stripped), any other piece is dropped (so a ``###`` inside a message cuts off
    the rest of it); an odd last piece is dropped; the rest pair up as (input, output) whichever
    speaker each came from.
    """
    texts = []
    for piece in _get(record, "text").strip().split("###"):
        piece = piece.strip()
        tag = next((t for t in _OASST1_TAGS if piece.startswith(t)), None)
        if tag is not None:
            texts.append(piece[len(tag):].strip())
    if len(texts) % 2:
        texts.pop()
    return {"conversation": [_turn(q, a) for q, a in zip(texts[::2], texts[1::2], strict=True)]}


def _chat(record: dict, key: str, role_key: str, skip: str) -> list[tuple[str, dict, Any]]:
    """(field, message, role) of RECORD[KEY]'s messages after the leading SKIP ones, which XTuner
    drops unread (only their role is looked at)."""
    chat = []
    for i, msg in enumerate(_get(record, key, kind=list)):
        field = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise FieldError(field, msg, dict)
        role = _get(msg, role_key, f"{field}.{role_key}", kind=object)
        if chat or role != skip:
            chat.append((field, msg, role))
    return chat


def _unknown_role(field: str, role: Any, name: str, roles: str) -> RecordError:
    return RecordError(f"{field}: {role!r} is not a role XTuner's {name} reads ({roles}); XTuner "
                       "stops on it (NotImplementedError); remove the message or the record")


def _xtuner_loss(msg: dict) -> bool:
    """XTuner's reading of an assistant message's ``loss``: ``str(loss).lower() == 'true'``; absent:
    true. So ``false``/``"False"`` -> False, and ``null`` or ``1`` -> False too."""
    return str(msg.get("loss", "True")).lower() == "true"


def openai_map_fn(record: dict) -> dict:
    """OpenAI ``messages``, one turn per assistant message.

    As XTuner: leading assistant messages are skipped; the user messages before an answer are
    concatenated with no separator; a system message replaces the pending system text (the last one
    before an answer wins) and is cleared after each answer, so later turns carry ``system: ''``;
    trailing user messages with no answer are dropped; any other role stops the record.
    """
    system = text = ""
    conversation = []
    for field, msg, role in _chat(record, "messages", "role", skip="assistant"):
        content = _get(msg, "content", f"{field}.content") if role in _OPENAI_ROLES else None
        if role == "system":
            system = content
        elif role == "user":
            text += content
        elif role == "assistant":
            conversation.append({"system": system, "input": text, "output": content,
                                 "output_with_loss": _xtuner_loss(msg)})
            system = text = ""
        else:
            raise _unknown_role(f"{field}.role", role, "openai_map_fn", "system, user, assistant")
    return {"conversation": conversation}


_OPENAI_ROLES = ("system", "user", "assistant")


def wizardlm_map_fn(record: dict) -> dict:
    """WizardLM evol-instruct in ShareGPT form: ``conversations`` of ``{"from", "value"}``.

    As XTuner: leading ``gpt`` messages are skipped; ``human`` values before an answer are
    concatenated with no separator; trailing ``human`` messages are dropped; ``system`` or any other
    speaker stops the record; no system prompt.
    """
    text = ""
    conversation = []
    for field, msg, who in _chat(record, "conversations", "from", skip="gpt"):
        if who == "human":
            text += _get(msg, "value", f"{field}.value")
        elif who == "gpt":
            conversation.append(_turn(text, _get(msg, "value", f"{field}.value")))
            text = ""
        else:
            raise _unknown_role(f"{field}.from", who, "wizardlm_map_fn", "human, gpt")
    return {"conversation": conversation}


MAP_FNS: dict[str, Callable[[dict], dict]] = {fn.__name__: fn for fn in (
    alpaca_map_fn, alpaca_zh_map_fn, arxiv_map_fn, code_alpaca_map_fn, colors_map_fn,
    completion_map_fn, crime_kg_assitant_map_fn, default_map_fn, law_reference_map_fn,
    medical_map_fn, oasst1_map_fn, openai_map_fn, openorca_map_fn, pretrain_map_fn, sql_map_fn,
    stack_exchange_map_fn, tiny_codes_map_fn, wizardlm_map_fn)}

_IMAGES = ("image-text data: XTuner puts an <image> placeholder in the user turns for the pictures a "
           "vision encoder sees; tuneforge trains text-only models, the placeholders would be learned "
           "as literal text, and the questions are about the pictures, so the text alone is no SFT "
           "data; train it with XTuner's LLaVA pipeline")
_PAIRS = ("preference pairs (a prompt, a chosen and a rejected answer) for XTuner's DPO trainer: train "
          "them with objective='dpo' (or 'orpo', 'simpo') and no dataset_map_fn; tuneforge reads "
          '{"prompt", "chosen", "rejected"} records and the other pair formats in docs/preference.md as they are')

REFUSED: dict[str, str] = {
    "llava_map_fn": _IMAGES,
    "llava_image_only_map_fn": _IMAGES,
    "mimicit_map_fn": _IMAGES + " (MIMIC-IT: several images per record, named by image_ids)",
    "dpo_map_fn": _PAIRS,
    "ultrafeedback_binarized_map_fn": _PAIRS,
    "msagent_react_map_fn": (
        "ReAct agent data (MSAgent-Bench): XTuner rewrites each tool call into Thought/Action/Action "
        "Input text and puts the tool's result in a later turn as a system text with no user input "
        "(parsing string records with eval), a turn shape tuneforge's conversation reader does not "
        "take; convert the data to OpenAI messages with tool_calls and tool messages, which "
        "tuneforge reads and renders with the model's own tool format"),
}
REFUSED["msagent_map_fn"] = REFUSED["msagent_react_map_fn"]  # its file's name


def check_map(name: str) -> str:
    """NAME as MAP_FNS spells it (a dotted path such as ``xtuner.dataset.map_fns.alpaca_map_fn`` is
    taken by its last part), or a UserError: refused (with why and what to do), or unknown."""
    short = name.rsplit(".", 1)[-1]
    if short in MAP_FNS:
        return short
    if short in REFUSED:
        raise UserError(f"dataset_map_fn={short}: {REFUSED[short]}")
    raise UserError(f"dataset_map_fn={name}: not a map function tuneforge knows; it runs XTuner's "
                    f"{', '.join(sorted(MAP_FNS))}, or None for records already in a format it reads "
                    "(XTuner conversation, alpaca, OpenAI messages, ShareGPT)")


def apply_map(name: str, record: dict, where: str) -> dict:
    """XTuner's map function NAME on one raw RECORD (found at WHERE, "FILE:LINE"): its
    ``{"conversation": [...]}``. An empty conversation is a record XTuner drops silently."""
    fn = MAP_FNS[check_map(name)]
    short = fn.__name__
    if not isinstance(record, dict):
        raise UserError(f"{where}: {short} needs a JSON object per record, got {_kind(record)}")
    try:
        return fn(record)
    except FieldError as err:
        raise UserError(f"{where}: {short} needs field '{err.field}'{err.detail}") from None
    except RecordError as err:
        raise UserError(f"{where}: {short}: {err}") from None
