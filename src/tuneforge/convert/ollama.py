"""``tuneforge convert ollama``: a folder Ollama imports with ``ollama create NAME -f OUT/Modelfile``.

It holds the GGUF (``convert.gguf``) and a Modelfile whose TEMPLATE renders the chat template the
model was trained with (``ollama_template``), whose stop parameters are that template's
end-of-turn tokens, and whose SYSTEM is the system prompt it was trained with, if any. Without a
SYSTEM line the TEMPLATE's own default system prompt applies (SmolLM2's, Qwen2.5's), as it did
in training with ``SYSTEM = ''``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.convert import gguf_vocab
from tuneforge.convert.gguf import Report, open_source, outtype, write_gguf
from tuneforge.convert.ollama_template import ollama_template
from tuneforge.data.templates import TEMPLATE_FILE, Template
from tuneforge.errors import UserError
from tuneforge.files import atomic_directory

GGUF_NAME = "model.gguf"
MODELFILE = "Modelfile"


@dataclass
class OllamaReport:
    folder: Path
    gguf: Report
    notes: list[str]

    def summary(self) -> str:
        name = self.folder.resolve().name
        return (f"{self.gguf.summary()}\n[tuneforge] Ollama: ollama create {name} -f {self.folder / MODELFILE}"
                f" && ollama run {name}")


def recorded_system(folders: list[Path]) -> str:
    """The SYSTEM a model was trained with, where its template file records one."""
    import json

    for folder in folders:
        path = folder / TEMPLATE_FILE
        if path.is_file():
            system = json.loads(path.read_text(encoding="utf-8")).get("system")
            if isinstance(system, str):
                return system
    return ""


def _quoted(keyword: str, text: str) -> str:
    if '"""' in text:
        raise UserError(f'the {keyword} text contains """, which a Modelfile cannot hold')
    return f'{keyword} """{text}"""'


def _stops(template: Template, tokenizer: Any) -> list[str]:
    vocab = tokenizer.get_vocab()
    stops = [w for w in template.stop_words if w in vocab]
    if not stops and tokenizer.eos_token:
        stops = [tokenizer.eos_token]
    return stops


def _render_with(template: Template, tokenizer: Any) -> Any:
    def render(chat: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(chat, chat_template=template.chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


def modelfile(template: Template, tokenizer: Any, system: str, source_name: str) -> tuple[str, list[str]]:
    """The Modelfile's text, and notes for the user."""
    adds_bos, _ = gguf_vocab.adds_special(tokenizer)
    bos = tokenizer.bos_token if adds_bos and tokenizer.bos_token else ""
    note = (f"tuneforge: the chat template '{template.name}' that {source_name} was trained with"
            + (f"; Ollama adds {bos} itself when it tokenizes" if bos else ""))
    go, shape = ollama_template(_render_with(template, tokenizer), bos, note.replace("*/", "* /"))
    notes = []
    if shape.trims:
        notes.append("the chat template strips spaces around message contents and Go templates cannot; "
                     "contents that start or end with whitespace render with it in Ollama")
    lines = [f"# Written by tuneforge from {source_name}.",
             f"# ollama create NAME -f {MODELFILE} && ollama run NAME",
             f"FROM ./{GGUF_NAME}", _quoted("TEMPLATE", go)]
    if system:
        lines.append(_quoted("SYSTEM", system))
    lines += [f'PARAMETER stop "{w}"' for w in _stops(template, tokenizer)]
    return "\n".join(lines) + "\n", notes


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' is a file; give a folder for the GGUF and its Modelfile")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"'{out}' exists and is not empty; pass --force to replace it")


def convert_ollama(model_dir: str | Path, out: str | Path, quant: str = "q8_0",
                   adapter: str | Path | None = None, system: str | None = None, force: bool = False,
                   trust_remote_code: bool | None = None, progress: bool = True) -> OllamaReport:
    """``tuneforge convert ollama``: MODEL_DIR (merged, or a base with ADAPTER) -> OUT/."""
    out = Path(out)
    outtype(quant)
    _check_out(out, force)
    with open_source(model_dir, adapter, trust_remote_code) as source:
        if source.template is None:
            raise UserError(f"'{model_dir}' has no chat template (a base model?): Ollama needs one to "
                            "chat; `tuneforge convert gguf` writes its GGUF for completion use")
        chosen = recorded_system(source.folders) if system is None else system
        text, notes = modelfile(source.template, source.tokenizer, chosen, source.name)  # fails fast
        with atomic_directory(out, replace=True) as tmp:
            report = write_gguf(source, tmp / GGUF_NAME, quant, progress=progress)
            (tmp / MODELFILE).write_text(text, encoding="utf-8")
    report.path = out / GGUF_NAME
    return OllamaReport(out, report, notes + report.notes)
