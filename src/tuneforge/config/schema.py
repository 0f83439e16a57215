"""The typed config every command works from.

A config file sets plain top-level names; they are validated here into one ``Config``.
Field names follow XTuner's PART 1 / PART 2 variables so that a tutorial's edits carry over.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# XTuner's variable names that mean one of ours. The seed workflow edits these in a copied config.
ALIASES: dict[str, str] = {
    "alpaca_en_path": "data_files",
    "data_path": "data_files",
    "system": "SYSTEM",
}


DATA_FORMATS = ("auto", "alpaca", "conversation", "messages", "sharegpt", "swift")
# The experiment trackers report_to may name (train/trackers/ has one module for each).
TRACKERS = ("tensorboard", "wandb", "swanlab", "mlflow")
TrackerName = Literal["tensorboard", "wandb", "swanlab", "mlflow"]
# peft's LoRA family (docs/training.md#lora-variants says what each does and costs).
LoraVariant = Literal["lora", "dora", "rslora", "pissa", "olora", "loftq"]


def _check_format(v: str | None) -> str | None:
    """A record format by name, or an XTuner ``dataset_map_fn`` name (``alpaca_zh_map_fn``): its
    records are mapped as XTuner maps them (data/xtuner_maps.py says which ones it knows)."""
    if v is None or v in DATA_FORMATS or v.endswith("_map_fn"):
        return v
    raise ValueError(f"unknown data format {v!r}; expected one of {', '.join(DATA_FORMATS)} or an XTuner "
                     "dataset_map_fn name")


class DataSource(BaseModel):
    """One entry of ``data_files`` when it needs more than a path: mixing ratios, its own format,
    and for a dataset read through the ``datasets`` library (a Hub name ``org/name``,
    ``hf://org/name``, ``modelscope://org/name``, or a local dataset folder) which part of it."""

    model_config = ConfigDict(extra="forbid")

    path: str  # a file or folder; or a dataset name (a local path that exists wins: docs/data.md)
    repeat: int = Field(1, ge=1)  # use every sample this many times per epoch
    max_samples: int | None = Field(None, gt=0)  # take the first N samples of the file only
    format: str | None = None  # this file's format (None: the config's data_format)
    # A dataset's split (None: 'train'; slices as datasets writes them: 'train[:2000]'), its subset
    # (load_dataset's `name`, XTuner's `name=`), and the files to read from its repository
    # (load_dataset's `data_files`, e.g. 'data/en-*.parquet').
    split: str | None = None
    subset: str | None = None
    data_files: str | list[str] | None = None
    # Read the records lazily, as training needs them, instead of downloading and converting the
    # whole set first: for data larger than the disk. Needs max_steps (or max_samples): a stream
    # has no length to plan epochs by. Not kept in the token cache.
    streaming: bool = False

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str | None) -> str | None:
        return _check_format(v)

    @property
    def dataset_part(self) -> bool:
        """Whether the entry names a part of a dataset (a split, subset or repository files)."""
        return self.split is not None or self.subset is not None or self.data_files is not None


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # PART 1: model
    pretrained_model_name_or_path: str
    trust_remote_code: bool = False
    method: Literal["full", "lora", "qlora"] = "lora"
    lora_r: int = Field(64, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # A list names modules (a module is adapted when its name ends with one of them); a string is
    # 'all-linear' or, as in peft, a regex that must match a module's whole dotted name.
    lora_target_modules: str | list[str] = "all-linear"
    lora_variant: LoraVariant = "lora"
    lora_plus_ratio: float | None = Field(None, gt=0)  # LoRA+: the B matrices learn at ratio x lr
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # "auto": on a GPU, recompute as few layers as fit memory_budget_gib (measured at start);
    # on a CPU, none. True recomputes every layer, False none.
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    memory_budget_gib: float | None = Field(None, gt=0)  # None: the GPU's memory, less 5%
    fast_path: bool = True  # fused LoRA/norm/MLP, chunked cross-entropy, varlen attention (GPU)

    # PART 1: objective. 'sft' learns the answers; the others learn from pairs of a chosen and a
    # rejected answer (docs/preference.md): DPO against a reference (the model before training),
    # ORPO and SimPO without one.
    objective: Literal["sft", "dpo", "orpo", "simpo"] = "sft"
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] | None = None  # None: sigmoid (objective='dpo' only)
    beta: float | None = None  # None: 0.1 for dpo, 2.0 for simpo (not for sft or orpo)
    simpo_gamma: float | None = None  # SimPO's target reward margin; None: 0.5
    orpo_lambda: float | None = None  # ORPO's weight of the odds-ratio term; None: 0.1
    # The identity job as pairs (docs/preference.md#the-identity-job): data_files hold identity
    # conversations, as for SFT, and the run makes the pairs itself from them, the base model's own
    # answers and the shipped general prompts (work_dir/pairs.jsonl).
    identity_pairs: bool = False
    # With identity_pairs: the first sft_steps of max_steps are SFT on data_files (with replay, as
    # the SFT preset trains), the rest the preference objective from those weights.
    sft_steps: int | None = Field(None, gt=0)
    sft_lr: float | None = Field(None, gt=0)  # the SFT stage's learning rate (None: lr)

    # PART 1: data
    data_files: str | list[str | DataSource]
    data_format: str = "auto"  # see DATA_FORMATS; or an XTuner dataset_map_fn name
    prompt_template: str = "auto"
    SYSTEM: str = ""
    max_length: int = Field(2048, gt=8)
    pack_to_max_length: bool = True
    use_varlen_attn: bool = False  # accepted from XTuner configs; packed samples never see each other
    # Mix the base model's own answers to the 314 shipped general prompts into training, so that
    # identity data does not take over every answer (see data/replay.py).
    replay_general: bool = True
    replay_repeat: int = Field(2, ge=1)
    replay_max_new_tokens: int = Field(48, gt=0)
    skip_bad_lines: bool = False  # count and skip malformed records instead of stopping
    long_samples: Literal["truncate", "drop"] = "truncate"  # past max_length; counted either way

    # PART 1: schedule
    batch_size: int = Field(1, gt=0)
    accumulative_counts: int = Field(1, gt=0)
    max_epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    optim_type: Literal["AdamW", "AdamW8bit"] = "AdamW"
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    max_norm: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)

    # PART 1: save and evaluate
    save_steps: int = Field(500, gt=0)
    save_total_limit: int = Field(2, ge=-1)
    save_last: bool = True  # a checkpoint at the final step even when save_steps does not divide it
    evaluation_freq: int = Field(500, gt=0)
    evaluation_inputs: list[str] = Field(default_factory=list)
    evaluation_max_new_tokens: int = Field(128, gt=0)
    identity_guard: bool = True  # also ask general questions at each evaluation; warn on leaks
    # Experiment trackers that get every record train_log.jsonl gets (docs/tracking.md). None: the
    # default, decided when training starts: TensorBoard where it is installed, else none.
    report_to: list[TrackerName] | None = None
    seed: int = 0

    # The file this config was read from (set by load_config): relative data paths that do not
    # exist from the working directory are looked up beside it, and train keeps a copy of it.
    config_file: str | None = None

    @field_validator("data_format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        return _check_format(v)

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, v: object) -> object:
        """A name or a list of names, as HF's report_to takes them; 'none' (or []) for no tracker."""
        if v is None:
            return None
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, list | tuple):
            return v  # not a list: pydantic's own message says what was expected
        out: list[str] = []
        for name in names:
            if name == "none":
                continue
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}; report_to takes any of {', '.join(TRACKERS)} "
                                 "(or 'none')")
            if name not in out:
                out.append(name)
        return out

    @field_validator("data_files")
    @classmethod
    def _non_empty(cls, v: str | list[str | DataSource]) -> str | list[str | DataSource]:
        if not v:
            raise ValueError("needs at least one data file")
        return v

    @model_validator(mode="after")
    def _streams_end(self) -> Config:
        """A streamed source is read as far as the run trains: max_steps (or its max_samples) says how far."""
        for src in self.data_sources:
            if src.streaming and self.max_steps is None and src.max_samples is None:
                raise ValueError(f"data_files {src.path!r} is streamed (streaming=True), which needs max_steps "
                                 "(a stream has no length to plan epochs by); set max_steps, or max_samples on "
                                 "the entry to train epochs over its first N records")
        return self

    @model_validator(mode="after")
    def _lora_targets(self) -> Config:
        if self.method != "full" and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; use 'all-linear' or a list of module names")
        if isinstance(self.lora_target_modules, str):
            try:
                re.compile(self.lora_target_modules)
            except re.error as err:
                raise ValueError(f"lora_target_modules {self.lora_target_modules!r} is not a valid regex ({err}); "
                                 "a string is a regex over whole module names, a list names modules") from None
        return self

    @model_validator(mode="after")
    def _lora_family(self) -> Config:
        """Variants and LoRA+ apply to adapters, and some need the base weights a certain way."""
        variant = self.lora_variant
        if self.method == "full" and (variant != "lora" or self.lora_plus_ratio is not None):
            key = "lora_plus_ratio" if variant == "lora" else f"lora_variant={variant!r}"
            raise ValueError(f"{key} applies to method='lora' or 'qlora', and method is 'full'; "
                             f"remove {key.split('=')[0]} or change method")
        if variant == "pissa" and self.method == "qlora":
            # peft computes PiSSA from the full-precision weights and refuses 4-bit ones
            raise ValueError("lora_variant='pissa' needs the base weights unquantized (peft takes the SVD of "
                             "the full-precision weights and cannot start from 4-bit ones); use method='lora', "
                             "or lora_variant='loftq' (or 'olora') with qlora")
        if variant == "loftq" and self.method != "qlora":
            raise ValueError("lora_variant='loftq' starts the adapters so that they make up for the 4-bit "
                             "quantization error: it needs method='qlora'")
        if self.objective == "dpo" and variant in ("pissa", "olora", "loftq"):
            # the reference is the model with its adapters off, which these variants have changed
            raise ValueError(f"objective='dpo' compares with the model with its adapters off, and under "
                             f"lora_variant={variant!r} that is not the base model (the variant moved part of "
                             "each weight into the adapter); use lora_variant='lora', 'dora' or 'rslora'")
        return self

    @model_validator(mode="after")
    def _objective_settings(self) -> Config:
        """A preference setting that the chosen objective does not read is a mistake, not a no-op."""
        owners = {"dpo_loss": ("dpo",), "beta": ("dpo", "simpo"), "simpo_gamma": ("simpo",),
                  "orpo_lambda": ("orpo",)}
        for key, objectives in owners.items():
            if getattr(self, key) is not None and self.objective not in objectives:
                which = " or ".join(f"'{o}'" for o in objectives)
                hint = " (ORPO's weight is orpo_lambda)" if key == "beta" and self.objective == "orpo" else ""
                raise ValueError(f"{key} applies to objective={which} only, and objective is "
                                 f"'{self.objective}'{hint}; remove {key} or change objective")
        for key in ("beta", "orpo_lambda"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0 (got {getattr(self, key)}); try 0.1")
        if self.objective != "sft" and self.data_format != "auto" and not self.identity_pairs:
            raise ValueError(f"data_format={self.data_format!r}: preference pairs are detected by their keys "
                             "(docs/preference.md lists the formats); remove data_format")
        if self.simpo_gamma is not None and self.simpo_gamma < 0:
            raise ValueError(f"simpo_gamma must be >= 0 (got {self.simpo_gamma}); try 0.5")
        return self._stages()

    def _stages(self) -> Config:
        if self.identity_pairs and self.objective == "sft":
            raise ValueError("identity_pairs makes preference pairs, and objective is 'sft'; "
                             "set objective='orpo' (or 'dpo', 'simpo')")
        if self.sft_steps is None:
            if self.sft_lr is not None:
                raise ValueError("sft_lr is the SFT stage's learning rate and there is no SFT stage; "
                                 "set sft_steps or remove sft_lr")
            return self
        if not self.identity_pairs:
            raise ValueError("sft_steps trains SFT on data_files' conversations first, so it needs "
                             "identity_pairs=True (the pairs are then made from the same file)")
        if self.objective == "dpo":  # measured: identity 3% / 47% (docs/preference.md#the-identity-job)
            raise ValueError("sft_steps with objective='dpo': DPO's reference is the model with its adapters "
                             "off, the model before the SFT stage, and pulls the identity back out; "
                             "use objective='orpo'")
        if self.max_steps is None or self.sft_steps >= self.max_steps:
            raise ValueError(f"sft_steps={self.sft_steps} counts within max_steps (now {self.max_steps}); "
                             "set max_steps above it: the steps after sft_steps train the preference objective")
        return self

    @property
    def preference(self) -> bool:
        """Trained on pairs of answers rather than on answers."""
        return self.objective != "sft"

    @property
    def data_sources(self) -> list[DataSource]:
        items = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)
        return [DataSource(path=i) if isinstance(i, str) else i for i in items]


FIELD_NAMES: tuple[str, ...] = tuple(Config.model_fields)
