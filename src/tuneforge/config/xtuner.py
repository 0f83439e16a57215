"""Read an XTuner 0.x config file without xtuner, mmengine or any of its imports.

The file is parsed with ``ast`` and its top-level assignments are evaluated symbolically:
imported names become ``Ref``s ("xtuner.utils.PROMPT_TEMPLATE.internlm2_chat"), ``dict(...)``
becomes a dict and calls of anything else become ``Call``s. Then the settings XTuner would use
(the PART 1 variables, the model's ``lora`` and ``quantization_config``, the dataset, the
optimizer, the schedulers, the evaluation and checkpoint hooks, the visualizer's backends) are mapped onto tuneforge's
names, and the reader says which it took and which it ignored. A DPO or ORPO model with XTuner's
preference dataset becomes tuneforge's preference objective. What it cannot map faithfully
(another dataset map function, sequence parallelism, a reward model) is refused with a clear line.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config.schema import TRACKERS
from tuneforge.errors import UserError

XTUNER_MODULES = ("xtuner", "mmengine")


@dataclass(frozen=True)
class Ref:
    """An imported name, or an attribute of one: never imported, only named."""

    path: str

    @property
    def last(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Call:
    func: Any
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Unknown:
    source: str


@dataclass
class Report:
    taken: dict[str, Any] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # setting -> why
    verbatim: set[str] = field(default_factory=set)  # taken values already written out

    def overridden(self, options: dict[str, Any], aliases: dict[str, str]) -> Report:
        """The report with --cfg-options' values where they replace what the config set."""
        named = {aliases.get(k, k): v for k, v in options.items()}
        taken = {k: named.get(aliases.get(k, k), v) for k, v in self.taken.items()}
        marked = {k: f"{_short(v)} (--cfg-options)" for k, v in taken.items() if aliases.get(k, k) in named}
        return Report({k: marked.get(k, v) for k, v in taken.items()}, dict(self.ignored), set(marked))

    def lines(self) -> list[str]:
        out = ["XTuner config: took " + ", ".join(f"{k}={v if k in self.verbatim else _short(v)}"
                                                  for k, v in self.taken.items())]
        if self.ignored:
            out.append("XTuner config: ignored " + "; ".join(f"{k} ({why})" for k, why in self.ignored.items()))
        return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_xtuner_config(source: str) -> bool:
    """True when the file imports xtuner or mmengine (an XTuner config, not a tuneforge one)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in XTUNER_MODULES:
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in XTUNER_MODULES for a in node.names):
            return True
    return False


# ---------------------------------------------------------------- symbolic evaluation

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class _Evaluator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.env: dict[str, Any] = {}

    def run(self, tree: ast.Module) -> dict[str, Any]:
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.env[(a.asname or a.name).split(".")[0]] = Ref(a.asname and a.name or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    self.env[a.asname or a.name] = Ref(f"{node.module}.{a.name}")
            elif isinstance(node, ast.Assign):
                value = self.eval(node.value)
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.env[target.id] = value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                self.env[node.target.id] = self.eval(node.value)
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                op = _BINOPS.get(type(node.op))
                try:
                    self.env[node.target.id] = op(self.env[node.target.id], self.eval(node.value))
                except Exception:  # noqa: BLE001 - anything that is not plain arithmetic
                    self.env[node.target.id] = Unknown(ast.get_source_segment(self.source, node) or "")
        return self.env

    def eval(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.env.get(node.id, Unknown(node.id))
        if isinstance(node, ast.Attribute):
            base = self.eval(node.value)
            return Ref(f"{base.path}.{node.attr}") if isinstance(base, Ref) else Unknown(
                ast.get_source_segment(self.source, node) or node.attr)
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            items = [self.eval(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values, strict=True) if k is not None}
        if isinstance(node, ast.Call):
            func = self.eval(node.func)
            kwargs = {kw.arg: self.eval(kw.value) for kw in node.keywords if kw.arg}
            if isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
                return kwargs
            return Call(func, kwargs)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self.eval(node.left), self.eval(node.right)
            try:
                return _BINOPS[type(node.op)](left, right)
            except Exception:  # noqa: BLE001
                return Unknown(ast.get_source_segment(self.source, node) or "")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = self.eval(node.operand)
            return -value if isinstance(value, int | float) else Unknown("-" + repr(value))
        return Unknown(ast.get_source_segment(self.source, node) or type(node).__name__)


# ---------------------------------------------------------------- mapping onto tuneforge

# PART 1 names tuneforge reads as they are (aliases resolve later, in load.py)
PLAIN = ("pretrained_model_name_or_path", "trust_remote_code", "use_varlen_attn", "data_files",
         "alpaca_en_path", "data_path", "max_length", "pack_to_max_length", "batch_size",
         "accumulative_counts", "max_epochs", "lr", "betas", "weight_decay", "max_norm", "warmup_ratio",
         "save_steps", "save_total_limit", "evaluation_freq", "evaluation_inputs", "SYSTEM", "system",
         "lora_r", "lora_alpha", "lora_dropout", "seed")
# Top-level names that only drive XTuner's own machinery
MACHINERY = {
    "tokenizer": "tuneforge loads the model's tokenizer itself", "train_dataloader": "read for its dataset",
    "sampler": "tuneforge shuffles per epoch from seed", "dataloader_num_workers": "not needed",
    "env_cfg": "XTuner runtime", "visualizer": "read for report_to", "vis_backends": "read for report_to",
    "log_level": "XTuner runtime",
    "load_from": "use --resume", "resume": "use --resume", "log_processor": "XTuner runtime",
    "train_cfg": "read for max_epochs/max_iters", "optim_wrapper": "read for the optimizer",
    "param_scheduler": "read for warmup", "custom_hooks": "read for evaluation",
    "default_hooks": "read for checkpoints", "randomness": "read for seed",
    "model": "read for the objective and LoRA/QLoRA", "sequence_parallel_size": "1 is the only value tuneforge runs",
    # the DPO configs' PART 1 names, read where model= and train_dataset= use them
    "dpo_loss_type": "read for model.loss_type", "loss_beta": "read for model.beta",
    "label_smoothing": "read for model.label_smoothing", "max_packed_length": "read for the dataset",
}
TEMPLATES = {"internlm2_chat", "qwen_chat", "llama3_chat", "chatml", "default"}
OPTIMIZERS = {"AdamW": "AdamW", "AdamW8bit": "AdamW8bit", "PagedAdamW8bit": "AdamW8bit"}
# mmengine's visualizer backends (and SwanLab's own for mmengine) and the tracker each one is
VIS_BACKENDS = {"TensorboardVisBackend": "tensorboard", "WandbVisBackend": "wandb", "MLflowVisBackend": "mlflow",
                "MLFlowVisBackend": "mlflow", "SwanLabVisBackend": "swanlab", "SwanlabVisBackend": "swanlab"}


def _type_name(d: Any) -> str:
    """The class or function a typed dict names: by reference, by call, or as a string
    (mmengine's registries take ``type='LinearLR'`` too)."""
    t = d.get("type") if isinstance(d, dict) else None
    if isinstance(t, Ref):
        return t.last
    if isinstance(t, Call) and isinstance(t.func, Ref):
        return t.func.last
    if isinstance(t, str):
        return t.rsplit(".", 1)[-1]
    return ""


def _sub(d: Any, key: str) -> dict:
    """D[KEY] when it is a dict, else {} (configs leave out what they do not use)."""
    value = d.get(key) if isinstance(d, dict) else None
    return value if isinstance(value, dict) else {}


def _walk_dicts(value: Any) -> list[dict]:
    out = []
    if isinstance(value, dict):
        out.append(value)
        for v in value.values():
            out += _walk_dicts(v)
    elif isinstance(value, list | tuple):
        for v in value:
            out += _walk_dicts(v)
    return out


def _template(value: Any, report: Report, key: str) -> str | None:
    if isinstance(value, Ref) and "PROMPT_TEMPLATE" in value.path:
        if value.last in TEMPLATES:
            return value.last
        report.ignored[key] = f"PROMPT_TEMPLATE.{value.last} is not shipped; the tokenizer's own chat template is used"
        return None
    if isinstance(value, str):
        return value
    return None


# XTuner adapts every linear layer but ones named lm_head or output_layer (find_all_linear_names).
# InternLM2 calls its head 'output', so XTuner adapts it; tuneforge loads InternLM2 as Llama, where
# the head is lm_head and peft's 'all-linear' would leave it out. The same layers by Llama's names:
INTERNLM2_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "lm_head"]


def _is_internlm2(model: Any, config_path: Path) -> bool:
    """Whether MODEL (a folder or Hub name) is InternLM2, from its config.json where it is here."""
    if not isinstance(model, str):
        return False
    for folder in (Path(model), config_path.parent / model):
        try:
            text = (folder / "config.json").read_text()
        except OSError:
            continue
        return '"internlm2"' in text or "InternLM2ForCausalLM" in text
    return "internlm2" in model.lower()


@dataclass
class _Mapping:
    """The settings taken from one XTuner config so far, and the report of what was and was not."""

    path: Path  # the config file, named in refusals
    out: dict[str, Any] = field(default_factory=dict)
    report: Report = field(default_factory=Report)

    def take(self, key: str, value: Any) -> None:
        if isinstance(value, Ref | Call | Unknown):
            self.report.ignored[key] = f"{_short(value)} is not a plain value"
            return
        self.out[key] = value
        self.report.taken[key] = value

    def take_from(self, d: dict, names: dict[str, str]) -> None:
        """Take d[src] as tuneforge's dst for each src -> dst that D sets."""
        for src, dst in names.items():
            if src in d:
                self.take(dst, d[src])

    def optimizer(self, kind: Any, where: str) -> None:
        """optim_type from KIND, set at WHERE; only the optimizers tuneforge trains with pass."""
        name = kind.last if isinstance(kind, Ref) else kind if isinstance(kind, str) else _short(kind)
        if name not in OPTIMIZERS:
            raise UserError(f"{self.path}: {where} = {name}: tuneforge trains with AdamW or AdamW8bit; "
                            "set optim_type = AdamW")
        self.take("optim_type", OPTIMIZERS[name])


def _map_part1(m: _Mapping, env: dict[str, Any]) -> None:
    """The PART 1 variables: plain values, the prompt template, the optimizer, sequence parallelism."""
    for key in PLAIN:
        if key in env:
            m.take(key, env[key])
    if isinstance(env.get("SYSTEM"), Ref):
        m.report.ignored["SYSTEM"] = f"{env['SYSTEM'].path.split('.', 2)[-1]} is XTuner's text; set SYSTEM to the text itself"
    if "prompt_template" in env:
        name = _template(env["prompt_template"], m.report, "prompt_template")
        if name:
            m.take("prompt_template", name)
    if "optim_type" in env:
        m.optimizer(env["optim_type"], "optim_type")
    sp = env.get("sequence_parallel_size", 1)
    if sp not in (1, None):
        raise UserError(f"{m.path}: sequence_parallel_size = {sp}: sequence parallelism is not supported; "
                        "set it to 1 (several GPUs train data parallel with NPROC_PER_NODE)")


def _map_model(m: _Mapping, env: dict[str, Any]) -> None:
    """model = dict(type=SupervisedFinetune (or DPO, ORPO), llm=dict(... quantization_config=...), lora=dict(...))"""
    model = _sub(env, "model")
    llm = _sub(model, "llm")
    _map_objective(m, model)
    m.take_from(llm, {"pretrained_model_name_or_path": "pretrained_model_name_or_path",
                      "trust_remote_code": "trust_remote_code"})
    quant = llm.get("quantization_config")
    lora = model.get("lora")
    if isinstance(quant, dict) and quant.get("load_in_8bit"):
        raise UserError(f"{m.path}: quantization_config load_in_8bit: tuneforge trains 4-bit QLoRA; "
                        "use load_in_4bit=True")
    four_bit = isinstance(quant, dict) and quant.get("load_in_4bit")
    if isinstance(lora, dict):
        m.take("method", "qlora" if four_bit else "lora")
        m.take_from(lora, {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                           "target_modules": "lora_target_modules"})
        _map_lora_variant(m, lora)
        if "target_modules" not in lora and _is_internlm2(m.out.get("pretrained_model_name_or_path"), m.path):
            m.take("lora_target_modules", INTERNLM2_ALL_LINEAR)
    elif model:
        m.take("method", "full")
    if four_bit:
        m.take_from(quant, {"bnb_4bit_quant_type": "bnb_4bit_quant_type",
                            "bnb_4bit_use_double_quant": "bnb_4bit_use_double_quant"})
    if "torch_dtype" in llm:
        m.report.ignored["torch_dtype"] = "tuneforge picks bf16 where the GPU has it (fp32 master weights on CPU)"


# ---------------------------------------------------------------- preference training

# DPO's losses tuneforge trains, each as XTuner's DPO computes it (xtuner/model/dpo.py): sigmoid and
# hinge on summed log-probabilities, ipo on per-token averages
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
XTUNER_DPO_LOSSES = DPO_LOSSES + ("kto_pair", "sppo_hard", "nca_pair", "robust")


def _map_objective(m: _Mapping, model: dict) -> None:
    """model=dict(type=DPO, loss_type=..., beta=..., label_smoothing=...) or dict(type=ORPO, beta=...):
    the preference objective; SupervisedFinetune (or no type) stays SFT."""
    kind = _type_name(model)
    if kind == "RewardModel":
        raise UserError(f"{m.path}: model = dict(type=RewardModel): tuneforge does not train reward models; "
                        "train the policy directly on the pairs with model=dict(type=DPO) or dict(type=ORPO)")
    if kind == "DPO":
        _map_dpo(m, model)
    elif kind == "ORPO":
        m.take("objective", "orpo")
        # ORPO's beta weighs the odds-ratio term against the chosen answer's NLL
        # (loss = nll - beta * log sigmoid(log odds ratio), xtuner/model/orpo.py): tuneforge's orpo_lambda
        m.take_from(model, {"beta": "orpo_lambda"})


def _map_dpo(m: _Mapping, model: dict) -> None:
    m.take("objective", "dpo")
    loss = model.get("loss_type", "sigmoid")  # DPO's default in XTuner
    if loss not in DPO_LOSSES:
        other = f"{loss!r} (one of XTuner's {', '.join(XTUNER_DPO_LOSSES[3:])})" \
            if loss in XTUNER_DPO_LOSSES else _short(loss)
        # XTuner's robust loss without label smoothing is the sigmoid loss term for term
        hint = " ('robust' with label_smoothing = 0 is 'sigmoid')" if loss == "robust" else ""
        raise UserError(f"{m.path}: model.loss_type (dpo_loss_type) = {other}: tuneforge trains the DPO losses "
                        f"{', '.join(repr(x) for x in DPO_LOSSES)}; set dpo_loss_type to one of them{hint}")
    m.take("dpo_loss", loss)
    m.take_from(model, {"beta": "beta"})
    smoothing = model.get("label_smoothing", 0.0)
    if smoothing not in (0, 0.0):
        # training without it would quietly change the loss XTuner's sigmoid (or robust) loss computes
        raise UserError(f"{m.path}: model.label_smoothing = {_short(smoothing)}: tuneforge's DPO losses have no "
                        "label smoothing; set label_smoothing = 0.0")
    ref = _sub(model, "ref_llm")
    ref_path = ref.get("pretrained_model_name_or_path")
    if ref and "lora" not in model and ref_path != _sub(model, "llm").get("pretrained_model_name_or_path"):
        # with LoRA XTuner itself ignores ref_llm and uses the model with its adapters off
        raise UserError(f"{m.path}: model.ref_llm = {_short(ref_path)}: tuneforge's DPO reference is the model "
                        "before training (pretrained_model_name_or_path); remove ref_llm")


def _map_lora_variant(m: _Mapping, lora: dict) -> None:
    """peft's LoraConfig switches an XTuner config may pass on: use_dora, use_rslora and the
    initialisations tuneforge runs (init_lora_weights='pissa', 'olora', 'loftq')."""
    init = lora.get("init_lora_weights")
    chosen = [v for v, on in (("dora", lora.get("use_dora")), ("rslora", lora.get("use_rslora")),
                              (init, init in ("pissa", "olora", "loftq"))) if on is True]
    if len(chosen) > 1:
        raise UserError(f"{m.path}: lora sets {' and '.join(chosen)}; tuneforge trains one lora_variant at a "
                        "time: keep one")
    if chosen:
        m.take("lora_variant", chosen[0])
    elif isinstance(init, str):
        m.report.ignored["lora.init_lora_weights"] = f"{init!r}: tuneforge starts LoRA as peft's default does"


def _find_datasets(env: dict[str, Any], kind: str = "process_hf_dataset") -> list[dict]:
    """The KIND dicts the train dataloader reads, in order (several under a ConcatDataset, as
    ``datasets=[...]`` or ``datasets_cfg=dict(...)``); else the first top-level one."""
    found = [d for d in _walk_dicts(env.get("train_dataloader", {})) if _type_name(d) == kind]
    found = found or [d for v in env.values() for d in _walk_dicts(v) if _type_name(d) == kind][:1]
    return found


# load_dataset's builders for local files: path='json' reads data_files; any other path is a
# dataset (a Hub name such as XTuner's default 'tatsu-lab/alpaca', or a local folder or file)
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
# load_dataset's keyword arguments that choose a part of a dataset, and the data_files entry keys
DATASET_PARTS = {"name": "subset", "split": "split", "data_files": "data_files", "streaming": "streaming"}


def _one_value(files: Any) -> Any:
    """data_files as load_dataset takes them: dict(train=...) with one split is its value."""
    return list(files.values())[0] if isinstance(files, dict) and len(files) == 1 else files


def _dataset_entry(m: _Mapping, path: str, inner: dict, ds: dict) -> str | dict:
    """load_dataset(path=NAME, name=..., split=..., data_files=..., streaming=...) as a data_files
    entry: the name alone, or {'path': NAME, 'subset': ..., ...} when it chooses a part. The split
    is load_dataset's, else process_hf_dataset's own (XTuner's default: 'train')."""
    given = {**({"split": ds["split"]} if "split" in ds else {}), **inner}
    entry: dict[str, Any] = {"path": path}
    for key, ours in DATASET_PARTS.items():
        value = _one_value(given.get(key))
        if value is None:
            continue
        if isinstance(value, Ref | Call | Unknown | dict):
            m.report.ignored[f"load_dataset {key}"] = f"{_short(value)} is not a plain value"
        else:
            entry[ours] = value
    return entry if len(entry) > 1 else path


def _dataset_files(m: _Mapping, ds: dict) -> Any:
    """dataset=dict(type=load_dataset, path=..., data_files=...): the files, a dataset (its name,
    or an entry naming its part), or None."""
    inner = _sub(ds, "dataset")
    path = inner.get("path")
    if isinstance(path, str) and path not in PACKAGED_BUILDERS:
        return _dataset_entry(m, path, inner, ds)
    return _one_value(inner.get("data_files"))


def _data_format(m: _Mapping, ds: dict) -> str | None:
    """The format of a dataset's records: its dataset_map_fn by name (data/xtuner_maps.py maps
    each record as that function does, or refuses it with the reason), or None for "auto"."""
    map_fn = ds.get("dataset_map_fn")
    if isinstance(map_fn, Ref):
        return map_fn.last
    if map_fn is None and "dataset_map_fn" in ds:
        return "auto"
    if "dataset_map_fn" in ds:  # a lambda or a function defined in the config
        raise UserError(f"{m.path}: dataset_map_fn = {_short(map_fn)}: only XTuner's own map functions "
                        "are read; convert the data to alpaca, conversation, messages or ShareGPT records "
                        "and set dataset_map_fn=None")
    return None


def _data_sources(m: _Mapping, datasets: list[dict]) -> list[dict]:
    """One data_files entry per file of each dataset, with that dataset's format."""
    sources = []
    for ds in datasets:
        files, fmt = _dataset_files(m, ds), _data_format(m, ds)
        if files is None:
            raise UserError(f"{m.path}: a dataset of the ConcatDataset names no data files "
                            "(dataset=dict(type=load_dataset, path=... or data_files=...))")
        for f in files if isinstance(files, list | tuple) else [files]:
            entry = f if isinstance(f, dict) else {"path": f}
            sources.append({**entry, **({"format": fmt} if fmt and fmt != "auto" else {})})
    return sources


def _map_dataset(m: _Mapping, env: dict[str, Any]) -> None:
    """The dataset: dict(type=process_hf_dataset, dataset=dict(type=load_dataset, ...), ...), or
    several of them concatenated; packing, length and template from the first. Or XTuner's
    preference dataset (build_preference_dataset)."""
    datasets = _find_datasets(env)
    if not datasets:
        pairs = _find_datasets(env, "build_preference_dataset")
        if pairs:
            _map_pairs_dataset(m, pairs[0])
        elif m.out.get("objective", "sft") != "sft":
            raise UserError(f"{m.path}: model is XTuner's {m.out['objective'].upper()}, but no "
                            "train_dataset = dict(type=build_preference_dataset, ...) was found; "
                            "give the pairs as XTuner's DPO configs do")
        return
    ds = datasets[0]
    if len(datasets) == 1:
        files, fmt = _dataset_files(m, ds), _data_format(m, ds)
        if files is not None:
            m.take("data_files", [files] if isinstance(files, dict) else files)
        if fmt is not None:
            m.take("data_format", fmt)
    else:
        m.take("data_files", _data_sources(m, datasets))
        for key in ("max_length", "pack_to_max_length"):
            if len({repr(d.get(key)) for d in datasets}) > 1:
                m.report.ignored[f"{key} of the later datasets"] = "one value for all data; the first dataset's is used"
    if "data_files" in m.out:
        for alias in ("alpaca_en_path", "data_path"):
            if alias in m.out and m.out[alias] != m.out.get("data_files"):
                del m.out[alias], m.report.taken[alias]
                m.report.ignored[alias] = "the dataset's data_files are used"
    tmpl = ds.get("template_map_fn")
    if isinstance(tmpl, dict) and "template" in tmpl:
        name = _template(tmpl["template"], m.report, "template_map_fn.template")
        if name:
            m.take("prompt_template", name)
    m.take_from(ds, {"max_length": "max_length", "pack_to_max_length": "pack_to_max_length"})
    if ds.get("shuffle_before_pack") is False:
        m.report.ignored["shuffle_before_pack"] = "tuneforge packs longest-first and shuffles rows per epoch"


# XTuner's preference map functions (xtuner/dataset/preference_dataset.py) whose records tuneforge's
# pair reader takes as they are: orpo_dpo_mix_40k_map_fn keeps chosen's turns before its last
# answer as the prompt and each side's last answer, which is what the reader makes of two whole
# conversations (TRL's implicit prompt), also beside a `prompt` string as those datasets carry it
PAIR_MAP_FNS = ("orpo_dpo_mix_40k_map_fn",)
# XTuner's build_preference_dataset packs pairs into rows of this many tokens under use_varlen_attn
XTUNER_MAX_PACKED_LENGTH = 16384


def _pairs_format(m: _Mapping, ds: dict) -> None:
    """The preference dataset's dataset_map_fn: None or one whose records the pair reader detects."""
    map_fn = ds.get("dataset_map_fn")
    name = map_fn.last if isinstance(map_fn, Ref) else map_fn
    if map_fn is None or name in PAIR_MAP_FNS:
        return
    if name == "intel_orca_dpo_map_fn":
        raise UserError(f"{m.path}: dataset_map_fn = intel_orca_dpo_map_fn: rename each record's 'question' to "
                        "'instruction' (LLaMA-Factory's pairs, which keep 'system'; docs/preference.md) and set "
                        "dataset_map_fn=None")
    raise UserError(f"{m.path}: dataset_map_fn = {_short(name)}: tuneforge reads orpo_dpo_mix_40k_map_fn's "
                    "records and the pair formats of docs/preference.md as they are; convert the data to one "
                    "of them and set dataset_map_fn=None")


def _pairs_files(m: _Mapping, ds: dict) -> Any:
    """dataset=dict(type=load_dataset, path=NAME) or dict(type=load_jsonl_dataset, data_files=[...]
    or data_dir=FOLDER, suffix=...): the data_files tuneforge reads."""
    inner = _sub(ds, "dataset")
    if isinstance(inner.get("data_dir"), str):
        if inner.get("suffix") not in (None, ".jsonl"):
            m.report.ignored["load_jsonl_dataset suffix"] = "tuneforge reads every data file of data_dir"
        return inner["data_dir"]
    files = _dataset_files(m, {"dataset": inner})
    if files is None:
        raise UserError(f"{m.path}: train_dataset names no data (dataset=dict(type=load_dataset, path=...) or "
                        "dict(type=load_jsonl_dataset, data_files=[...]))")
    return files


def _pairs_length(m: _Mapping, ds: dict) -> None:
    """XTuner cuts each side of a pair to max_length, and packs pairs into rows of max_packed_length
    only under use_varlen_attn (else one pair a sample); tuneforge's max_length holds a pair's two
    sides together, so it is the row XTuner trains on."""
    side = ds.get("max_length", m.out.get("max_length"))
    varlen = ds.get("use_varlen_attn", m.out.get("use_varlen_attn", False))
    if not isinstance(side, int) or not isinstance(varlen, bool):
        m.report.ignored["train_dataset.max_length"] = f"{_short(side)} is not a plain value"
        return
    row = ds.get("max_packed_length", XTUNER_MAX_PACKED_LENGTH) if varlen else 2 * side
    m.take("max_length", row)
    m.take("pack_to_max_length", varlen)
    m.report.ignored["max_length per side"] = (
        f"XTuner cuts chosen and rejected to {side} tokens each; tuneforge fits both sides into "
        f"max_length={row}, the longer cut first")


def _map_pairs_dataset(m: _Mapping, ds: dict) -> None:
    """train_dataset = dict(type=build_preference_dataset, dataset=..., dataset_map_fn=..., is_dpo=True,
    is_reward=False, max_length=..., max_packed_length=..., use_varlen_attn=...)."""
    # is_reference: POEM's reference-answer records, which XTuner builds for reward models only
    for key in ("is_reward", "is_reference"):
        if ds.get(key) is True:
            raise UserError(f"{m.path}: train_dataset {key}=True: tuneforge does not train reward models; train "
                            f"the policy on the pairs with is_dpo=True, {key}=False and model=dict(type=DPO)")
    if ds.get("is_dpo") is False:
        raise UserError(f"{m.path}: train_dataset is_dpo=False: XTuner trains preference pairs with is_dpo=True; "
                        "set is_dpo=True")
    if m.out.get("objective", "sft") == "sft":
        raise UserError(f"{m.path}: train_dataset is XTuner's preference dataset (build_preference_dataset), "
                        "but model is not dict(type=DPO) or dict(type=ORPO); set model's type to DPO or ORPO")
    files = _pairs_files(m, ds)
    m.take("data_files", [files] if isinstance(files, dict) else files)
    _pairs_format(m, ds)
    _pairs_length(m, ds)
    if ds.get("shuffle_before_pack") is False:
        m.report.ignored["shuffle_before_pack"] = "tuneforge packs longest-first and shuffles rows per epoch"


def _map_pair_rendering(m: _Mapping, env: dict[str, Any]) -> None:
    """XTuner renders preference pairs with the tokenizer's own chat template and no system text:
    its prompt_template and SYSTEM only format EvaluateChatHook's questions. tuneforge's apply to
    training too, so a preference config keeps tuneforge's defaults (the tokenizer's template)."""
    if m.out.get("objective", "sft") == "sft":
        return
    for key in ("prompt_template", "SYSTEM"):
        if key in m.out or key in m.report.ignored:  # SYSTEM_TEMPLATE.x's line would ask for the text
            m.out.pop(key, None), m.report.taken.pop(key, None)
            m.report.ignored[key] = "XTuner renders pairs with the tokenizer's chat template and no system " \
                                    "text (it formats EvaluateChatHook only); tuneforge does the same"


def _map_optimizer(m: _Mapping, env: dict[str, Any]) -> None:
    """optim_wrapper: the optimizer, clipping, accumulation."""
    wrapper = _sub(env, "optim_wrapper")
    opt = _sub(wrapper, "optimizer")
    m.take_from(opt, {"lr": "lr", "betas": "betas", "weight_decay": "weight_decay"})
    if "type" in opt:
        m.optimizer(opt["type"], "optim_wrapper.optimizer.type")
    m.take_from(_sub(wrapper, "clip_grad"), {"max_norm": "max_norm"})
    m.take_from(wrapper, {"accumulative_counts": "accumulative_counts"})
    if "dtype" in wrapper or "loss_scale" in wrapper:
        m.report.ignored["optim_wrapper.dtype/loss_scale"] = "bf16 needs no loss scaling"


def _map_schedule(m: _Mapping, env: dict[str, Any]) -> None:
    """train_cfg, and param_scheduler: LinearLR warmup over `end` epochs (or iterations), then cosine."""
    epochs = m.out.get("max_epochs")
    train_cfg = _sub(env, "train_cfg")
    m.take_from(train_cfg, {"max_epochs": "max_epochs", "max_iters": "max_steps"})
    epochs = train_cfg.get("max_epochs", epochs)
    for sched in env.get("param_scheduler") or []:
        if not isinstance(sched, dict):
            continue
        if _type_name(sched) == "LinearLR" and isinstance(sched.get("end"), int | float):
            if sched.get("by_epoch", True) and epochs:
                m.take("warmup_ratio", round(sched["end"] / epochs, 6))
            else:
                m.report.ignored["param_scheduler.LinearLR"] = "warmup given in iterations; set warmup_ratio"
        elif _type_name(sched) == "CosineAnnealingLR" and sched.get("eta_min", 0):
            m.report.ignored["CosineAnnealingLR.eta_min"] = "tuneforge decays to 0"


def _map_hooks(m: _Mapping, env: dict[str, Any]) -> None:
    """custom_hooks' EvaluateChatHook and default_hooks' checkpoint."""
    for hook in env.get("custom_hooks") or []:
        if isinstance(hook, dict) and _type_name(hook) == "EvaluateChatHook":
            plain = {k: v for k, v in hook.items() if not isinstance(v, Ref)}  # SYSTEM_TEMPLATE.x: see above
            m.take_from(plain, {"every_n_iters": "evaluation_freq", "evaluation_inputs": "evaluation_inputs",
                                "system": "SYSTEM"})
    m.take_from(_sub(_sub(env, "default_hooks"), "checkpoint"),
                {"interval": "save_steps", "max_keep_ckpts": "save_total_limit", "save_last": "save_last"})


def _map_visualizer(m: _Mapping, env: dict[str, Any]) -> None:
    """visualizer = dict(type=Visualizer, vis_backends=[dict(type=TensorboardVisBackend), ...]): the
    backends become report_to; LocalVisBackend's scalars file is what train_log.jsonl holds."""
    if "visualizer" not in env:
        return
    vis = env["visualizer"]
    if not isinstance(vis, dict):
        why = "None" if vis is None else f"{_short(vis)} is not a dict(type=Visualizer, vis_backends=[...])"
        m.report.ignored["visualizer"] = f"{why}: report_to keeps tuneforge's default (TensorBoard where installed)"
        return
    backends = vis.get("vis_backends") or []
    if isinstance(backends, dict):  # one backend, not in a list
        backends = [backends]
    names: list[str] = []
    for backend in backends if isinstance(backends, list | tuple) else []:
        kind = _type_name(backend)
        if kind == "LocalVisBackend":
            continue
        tracker = VIS_BACKENDS.get(kind)
        if tracker is None:
            m.report.ignored[f"vis_backends {kind or _short(backend)}"] = \
                f"not a tracker tuneforge reports to ({', '.join(TRACKERS)})"
            continue
        if tracker not in names:
            names.append(tracker)
        options = sorted(k for k in backend if k != "type")
        if options:
            m.report.ignored[f"{kind} {', '.join(options)}"] = "set through the tool's environment variables"
    m.take("report_to", names)


def _map_runtime(m: _Mapping, env: dict[str, Any]) -> None:
    """randomness' seed, and a line for each other top-level name tuneforge does not use."""
    seed = _sub(env, "randomness").get("seed")
    if isinstance(seed, int):
        m.take("seed", seed)
    for key, value in env.items():
        if key in m.out or key in m.report.ignored or key in PLAIN or isinstance(value, Ref) \
                or key in ("prompt_template", "optim_type") or _type_name(value):
            continue  # taken, imported, or a typed dict read above (the dataset, the model...)
        reason = MACHINERY.get(key, "not a tuneforge setting")
        if not reason.startswith("read for"):
            m.report.ignored[key] = reason


# In this order: a later section overrides what an earlier one took (the dataset's max_length
# over PART 1's), the report lists settings in the order first taken, and the last one reports
# what no section read.
_SECTIONS = (_map_part1, _map_model, _map_dataset, _map_optimizer, _map_schedule, _map_hooks, _map_pair_rendering,
             _map_visualizer, _map_runtime)


def map_settings(env: dict[str, Any], path: Path) -> tuple[dict[str, Any], Report]:
    """tuneforge's settings from the evaluated top level ENV of the XTuner config at PATH, and
    the report of what was taken and ignored; what cannot be mapped faithfully raises UserError."""
    m = _Mapping(path)
    for section in _SECTIONS:
        section(m, env)
    return m.out, m.report


def read_xtuner_config(path: Path) -> tuple[dict[str, Any], Report]:
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise UserError(f"{path}:{err.lineno}: invalid Python in config: {err.msg}") from err
    env = _Evaluator(source).run(tree)
    return map_settings(env, path)
