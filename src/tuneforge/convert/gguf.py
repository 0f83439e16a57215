"""``tuneforge convert gguf``: a model folder (or a base plus an adapter) as one GGUF file.

The file is written with the ``gguf`` library that llama.cpp maintains, so llama.cpp, Ollama and
LM Studio read it. It carries the weights (architecture and row order: ``gguf_arch``), the
tokenizer (``gguf_vocab``) and the chat template the model was trained with, with its end-of-turn
token as eos/eot. Tensors are written one at a time, so memory holds one tensor beside the
source; the file appears under its name only once it is complete.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from tuneforge.convert import gguf_arch
from tuneforge.convert.gguf_vocab import build_vocab
from tuneforge.data.templates import Template, load_template, template_for
from tuneforge.errors import UserError
from tuneforge.files import atomic_write

Q = gguf.GGMLQuantizationType
# --outtype -> the type of every 2-D weight (1-D tensors, norms and biases, stay F32 as
# llama.cpp keeps them), and the file type llama.cpp reports.
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_FLOAT = {Q.F32: np.float32, Q.F16: np.float16}
# Below 8 bits the output layer is what suffers most; llama.cpp's own quantizer keeps it wider
# (Q6_K, which the gguf library cannot make), so it is written as Q8_0 here.
_LOW_BITS = {Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0}
_OUTPUT_NAMES = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"}
_EMBEDDING = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"


def outtype(name: str) -> tuple[Q, gguf.LlamaFileType]:
    """--outtype NAME, or a UserError that says which tool makes the types we cannot."""
    key = name.lower()
    if key in OUTTYPES:
        return OUTTYPES[key]
    if key.startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq", "tq")):
        raise UserError(f"--outtype {name}: the gguf Python library cannot make {name.upper()} "
                        "(k-quants and i-quants are made by llama.cpp); write --outtype f16 here, then "
                        f"run llama.cpp's `llama-quantize OUT-f16.gguf OUT-{name.upper()}.gguf {name.upper()}`")
    raise UserError(f"--outtype {name}: expected one of {', '.join(OUTTYPES)}")


@dataclass
class Source:
    """Everything a GGUF is made of: the config, the weights by HF name, tokenizer, template."""

    config: dict[str, Any]
    tokenizer: Any
    template: Template | None  # None: a model with no chat template (a base model)
    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], torch.Tensor]
    folders: list[Path]  # searched for a sentencepiece tokenizer.model
    name: str
    base: str | None = None


@dataclass
class Report:
    path: Path
    seconds: float
    types: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = self.path.stat().st_size / 2**20
        kinds = ", ".join(f"{n} {t}" for t, n in self.types.most_common())
        return f"wrote {self.path} ({size:.1f} MiB; tensors: {kinds}) in {self.seconds:.1f}s"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from err


@contextmanager
def _weights(model_dir: Path) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]]:
    """(shapes, loader) over the folder's safetensors (opened lazily) or .bin shards (mmapped)."""
    from safetensors import safe_open

    from tuneforge.models.internlm2 import weight_files

    where: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    with ExitStack() as stack:
        for path in weight_files(model_dir):
            if path.suffix == ".safetensors":
                handle = stack.enter_context(safe_open(str(path), "pt"))
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    where[name], shapes[name] = handle, tuple(handle.get_slice(name).get_shape())
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    where[name], shapes[name] = state, tuple(tensor.shape)

        def load(name: str) -> torch.Tensor:
            holder = where[name]
            return holder[name] if isinstance(holder, dict) else holder.get_tensor(name)

        yield shapes, load


def _template(folder: Path, tokenizer: Any) -> Template | None:
    """The template saved with the model, else the tokenizer's own, else None (a base model:
    its GGUF has no chat template)."""
    try:
        return template_for(folder, tokenizer, None)
    except UserError:
        return None


@contextmanager
def open_folder(model_dir: str | Path) -> Iterator[Source]:
    """A merged (or any plain HF) model folder as a Source."""
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import resolve_model

    try:
        path = resolve_model(str(model_dir))
    except UserError as err:
        if Path(model_dir).is_dir():
            raise
        raise UserError(f"'{model_dir}' is not a model folder (no such folder, and no model of that "
                        "name in the HF cache); give the folder `convert merge` wrote") from err
    config = _read_json(path / "config.json")
    gguf_arch.architecture_of(config)  # an unsupported model fails before anything is read
    tokenizer = load_tokenizer(path)
    template = _template(path, tokenizer)
    merge = path / "tuneforge_merge.json"
    base = _read_json(merge).get("base") if merge.is_file() else None
    with _weights(path) as (shapes, load):
        yield Source(config, tokenizer, template, shapes, load, [path, *_base_folder(base)],
                     path.resolve().name, base)


def _base_folder(base: str | None) -> list[Path]:
    """The merge's base model folder, where a merged sentencepiece model's tokenizer.model is.
    Not the bundled model: its vocabulary is BPE, and resolving it may convert its weights."""
    from tuneforge.models.resolve import BUNDLED_MODEL, resolve_model

    if not base or base == BUNDLED_MODEL:
        return []
    try:
        return [resolve_model(base)]
    except UserError:
        return []


@contextmanager
def open_merged(base: str, adapter: str | Path, trust_remote_code: bool | None = None) -> Iterator[Source]:
    """BASE with the PEFT ADAPTER merged in memory (fp32, as `convert merge` merges)."""
    from tuneforge.models.adapters import attach_adapter
    from tuneforge.models.load import load_model, load_tokenizer, remote_code_allowed
    from tuneforge.models.resolve import resolve_model

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter '{adapter}' is not a PEFT adapter directory (no adapter_config.json)")
    base_path = resolve_model(base)
    trust = remote_code_allowed(trust_remote_code, adapter, base_path)
    model = load_model(base_path, torch.device("cpu"), torch.float32, trust_remote_code=trust)
    config = model.config.to_dict()
    gguf_arch.architecture_of(config)
    model = attach_adapter(model, adapter, base_path).merge_and_unload()
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tokenizer else base_path, trust)
    template = load_template(adapter) or _template(base_path, tokenizer)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    yield Source(config, tokenizer, template, {k: tuple(v.shape) for k, v in state.items()},
                 state.__getitem__, [adapter, base_path], adapter.resolve().name, base)


def open_source(model_dir: str | Path, adapter: str | Path | None,
                trust_remote_code: bool | None = None) -> Any:
    """The context manager that yields MODEL_DIR's Source, merged with ADAPTER if given."""
    if adapter:
        return open_merged(str(model_dir), adapter, trust_remote_code)
    return open_folder(model_dir)


def _tensor_type(name: str, shape: tuple[int, ...], wanted: Q, tied: bool) -> Q:
    if len(shape) == 1:
        return Q.F32
    if wanted in _LOW_BITS and (name in _OUTPUT_NAMES or (tied and name == _EMBEDDING)):
        wanted = Q.Q8_0
    if wanted in _FLOAT or wanted == Q.BF16:
        return wanted
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16  # a row must be whole blocks


def _encode(tensor: torch.Tensor, kind: Q, name: str) -> np.ndarray:
    data = tensor.contiguous().numpy()
    if kind in _FLOAT:
        out = data.astype(_FLOAT[kind])
        if kind == Q.F16 and not np.isfinite(out).all():
            raise UserError(f"tensor {name} has values beyond float16's range (±65504); "
                            "use --outtype bf16 or f32")
        return out
    return gguf.quants.quantize(data, kind)


def _declare(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], kind: Q) -> None:
    if kind in _FLOAT:
        dtype = np.dtype(_FLOAT[kind])
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        return
    stored = gguf.quant_shape_to_byte_shape(shape, kind)
    writer.add_tensor_info(name, stored, np.dtype(np.uint8), int(np.prod(stored)), raw_dtype=kind)


def _write_general(writer: gguf.GGUFWriter, source: Source, file_type: gguf.LlamaFileType) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if source.base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, source.base)


def _items(source: Source) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(GGUF name, shape, producer) for every tensor of the file."""
    config, out = source.config, []
    for item in gguf_arch.plan(config, source.shapes):
        out.append((item.name, item.shape,
                    lambda item=item: gguf_arch.produce(item, source.load, config)))
    for name, tensor in gguf_arch.rope_tensors(config).items():
        out.append((name, tuple(tensor.shape), lambda tensor=tensor: tensor))
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UserError(f"'{out}' is a folder; give the GGUF file's path (e.g. {out / 'model.gguf'})")
    if out.exists() and not force:
        raise UserError(f"'{out}' exists; pass --force to overwrite it")


def write_gguf(source: Source, out: str | Path, outtype_name: str = "f16", force: bool = False,
               progress: bool = True) -> Report:
    """SOURCE -> OUT (one GGUF file), 2-D weights in OUTTYPE_NAME."""
    from tqdm import tqdm

    out = Path(out)
    wanted, file_type = outtype(outtype_name)
    _check_out(out, force)
    started = time.perf_counter()
    config = source.config
    arch = gguf_arch.architecture_of(config)
    vocab = build_vocab(source.tokenizer, source.template, int(config["vocab_size"]), source.folders)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    _write_general(writer, source, file_type)
    report = Report(out, 0.0, notes=gguf_arch.write_hyperparameters(
        writer, config, config.get("max_position_embeddings")) + vocab.notes)
    vocab.write(writer)
    tied = bool(config.get("tie_word_embeddings"))
    items = [(name, shape, make, _tensor_type(name, shape, wanted, tied))
             for name, shape, make in _items(source)]
    for name, shape, _, kind in items:
        _declare(writer, name, shape, kind)
        report.types[kind.name] += 1
    # GGUFWriter opens the file by name; it writes the temporary file atomic_write made,
    # which replaces OUT only when every tensor is in.
    with atomic_write(out, "wb", durable=True) as handle:
        writer.write_header_to_file(Path(handle.name))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, _, make, kind in tqdm(items, desc=f"writing {out.name}", unit="tensor",
                                        disable=not progress):
            writer.write_tensor_data(_encode(make(), kind, name))
        writer.close()
    report.seconds = time.perf_counter() - started
    return report


def convert_gguf(model_dir: str | Path, out: str | Path, outtype_name: str = "f16",
                 adapter: str | Path | None = None, force: bool = False,
                 trust_remote_code: bool | None = None, progress: bool = True) -> Report:
    """``tuneforge convert gguf``: MODEL_DIR (merged, or a base with ADAPTER) -> OUT."""
    outtype(outtype_name)  # a bad type or an existing file fails before the model loads
    _check_out(Path(out), force)
    with open_source(model_dir, adapter, trust_remote_code) as source:
        return write_gguf(source, out, outtype_name, force=force, progress=progress)

