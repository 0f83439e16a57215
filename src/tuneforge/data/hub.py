"""Datasets by name, read through the ``datasets`` library: Hub names (``org/name``,
``hf://org/name``), ``modelscope://org/name``, and folders that ``datasets`` wrote or reads.

Each becomes a ``DatasetRecords``, whose rows go through the same format detection, token cache
and errors as a file's lines, named ``NAME[split]:ROW`` (ROW as ``dataset[ROW]`` indexes it).

Offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, or a Hub that does not answer) a name is
looked up in the HF caches only: the Hub cache that ``hf download --repo-type dataset NAME``
fills (``HF_HUB_CACHE``), then the Arrow cache of an earlier ``load_dataset(NAME)``
(``HF_DATASETS_CACHE``). A name in neither is one line saying where it looked and how to make it
available, at once: the Hub is asked whether it answers before ``datasets`` gets to retry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DataSource
from tuneforge.errors import UserError

HF_PREFIXES = ("hf://datasets/", "hf://")  # the first is how datasets and huggingface_hub write it
MS_PREFIX = "modelscope://"
NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hub repository id: org/name
PATH_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")  # a missing file, not a name
PROBE_SECONDS = 3.0  # how long the Hub may take to answer at all before it counts as unreachable
BATCH = 1000  # rows converted from Arrow at a time


@dataclass(eq=False)
class DatasetRecords:
    """The rows of one split of a dataset, as records."""

    label: str  # "org/name[train]"; a record is "org/name[train]:ROW"
    data: Any  # a datasets.Dataset or IterableDataset (or ModelScope's wrapper of one)
    streaming: bool
    identity: str | None  # what identifies the rows for the token cache; None: not cached

    @property
    def kind(self) -> str:
        return "dataset, streamed" if self.streaming else "dataset"

    def __str__(self) -> str:
        return self.label

    def records(self) -> Iterator[tuple[str, Any]]:
        for i, record in enumerate(self._rows()):
            yield f"{self.label}:{i}", record

    def _rows(self) -> Iterator[Any]:
        if self.streaming or not hasattr(self.data, "iter"):
            yield from self.data  # one at a time: a stream is read only as far as it is used
            return
        for batch in self.data.iter(batch_size=BATCH):  # columns of BATCH rows: far faster than row by row
            keys = list(batch)
            for values in zip(*batch.values(), strict=True):
                yield dict(zip(keys, values, strict=True))


def dataset_name(entry: str) -> tuple[str, str] | None:
    """("hf" or "modelscope", NAME) when a data_files ENTRY that is no local path names a dataset."""
    if entry.startswith(MS_PREFIX):
        return "modelscope", entry[len(MS_PREFIX):]
    for prefix in HF_PREFIXES:
        if entry.startswith(prefix):
            return "hf", entry[len(prefix):]
    if NAME.fullmatch(entry) and not entry.lower().endswith(PATH_SUFFIXES):
        return "hf", entry
    return None


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise UserError("reading a dataset by name needs the datasets library: pip install datasets") from err
    return datasets


def _first_line(err: BaseException) -> str:
    """ERR's message, first line; with the error that caused it where that says more (datasets
    wraps a broken file's error in "An error occurred while generating the dataset")."""
    def line(e: BaseException) -> str:
        return (str(e).strip() or type(e).__name__).splitlines()[0]

    root = err
    for _ in range(8):  # a chain, not a loop: a few links at most
        if root.__cause__ is None:
            break
        root = root.__cause__
    return line(err) if root is err else f"{line(err)}: {type(root).__name__}: {line(root)}"


def _identity(data: Any, label: str, src: DataSource) -> str | None:
    """The rows' identity for the token cache: the Arrow files datasets keeps them in (written once,
    under a folder named by a hash of the data files) and which part of them was read."""
    files = getattr(data, "cache_files", None)
    if not files:
        return None  # in memory only: nothing stable to key on
    stats = []
    for f in files:
        st = os.stat(f["filename"])
        stats.append((f["filename"], st.st_size, st.st_mtime_ns))
    return repr((label, src.subset, src.data_files, sorted(stats)))


def _records(data: Any, label: str, src: DataSource) -> DatasetRecords:
    return DatasetRecords(label, data, src.streaming, None if src.streaming else _identity(data, label, src))


def _load(load: Any, label: str, hint: str = "") -> Any:
    """LOAD(), with whatever datasets raises (an unknown split or subset, a missing file) as one line."""
    try:
        return load()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets' own message says what was wrong
        raise UserError(f"{label}: {_first_line(err)}{hint}") from err


# ---------------------------------------------------------------- local folders


def saved_dataset(path: Path) -> bool:
    """Whether PATH is a folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def open_local(path: Path, src: DataSource) -> DatasetRecords:
    """A local folder read as a dataset: one that ``save_to_disk`` wrote, or a dataset repository
    (``hf download --local-dir``, a README's configs) when the entry names a split or subset."""
    datasets = _datasets()
    split = src.split or "train"
    label = f"{path}[{split}]"
    if not saved_dataset(path):
        data = _load(lambda: datasets.load_dataset(str(path), src.subset, split=split, streaming=src.streaming,
                                                   data_files=src.data_files), label)
        return _records(data, label, src)
    if src.subset is not None or src.data_files is not None:
        raise UserError(f"{path}: a folder written by save_to_disk has no subsets or repository files; "
                        "remove subset/data_files from its data_files entry")
    saved = _load(lambda: datasets.load_from_disk(str(path)), str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(f"{path}: no split {split!r}; it has {', '.join(map(repr, saved))}: set split")
        saved = saved[split]
    elif src.split is not None and src.split != "train":
        raise UserError(f"{path}: a single split written by save_to_disk; remove split={src.split!r}")
    data = saved.to_iterable_dataset() if src.streaming else saved
    return _records(data, label, src)


# ---------------------------------------------------------------- the Hub


def _offline_setting() -> str | None:
    """Which environment variable turns the Hub off, if one does (datasets and huggingface_hub
    read them at import: their flags are what holds)."""
    import datasets.config
    import huggingface_hub.constants as hub

    if datasets.config.HF_HUB_OFFLINE or hub.HF_HUB_OFFLINE:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE"):
                return f"offline: {var}={os.environ[var]}"
        return "offline mode is on"
    return None


def answers(url: str) -> bool:
    """Whether URL's server answers at all (any HTTP status) within PROBE_SECONDS; proxies as set
    in the environment. Without this, datasets retries an unreachable Hub for half a minute."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return True  # a status code is an answer
    except (OSError, ValueError):  # URLError, timeouts, refused connections, a malformed endpoint
        return False
    return True


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode for one attempt: they read HF_HUB_OFFLINE once,
    at import, into these flags, and check the flags before each request."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _hub_snapshot(name: str) -> Path | None:
    """The Hub cache's copy of dataset NAME (what ``hf download --repo-type dataset`` wrote)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError), or an unreadable one
        return None


def _arrow_cache(name: str) -> Path:
    """Where datasets keeps the Arrow copy of NAME after ``load_dataset(NAME)`` (its layout:
    ``org___name``, the last part in snake case)."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    org, _, rest = name.partition("/")
    return Path(datasets.config.HF_DATASETS_CACHE) / f"{org}___{camelcase_to_snakecase(rest)}"


def not_found(name: str, looked: list[Path], why: str) -> UserError:
    """The one line for a dataset name that is neither a local path nor in the HF caches."""
    import huggingface_hub.constants as hub

    paths = ", ".join(str(p.absolute()) for p in looked)
    hub_dir = Path(hub.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    return UserError(
        f"dataset '{name}' not found: no local path {paths}, and not in the HF cache (no {hub_dir}, no "
        f"{_arrow_cache(name)}); the Hub is not asked ({why}); to make it available, run "
        f"`hf download --repo-type dataset {name}` where there is network and copy that HF cache to "
        f"{hub.HF_HUB_CACHE} (or set HF_HOME to it), or save it with "
        f"`python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('DIR')\"` and set data_files to DIR")


def _from_caches(name: str, src: DataSource, label: str, looked: list[Path], why: str) -> Any:
    """NAME from the HF caches alone: the Hub cache's snapshot, read as a local dataset folder;
    else datasets' Arrow cache, which load_dataset itself falls back to offline."""
    datasets = _datasets()
    args = dict(split=src.split or "train", streaming=src.streaming, data_files=src.data_files)
    with _offline():
        snapshot = _hub_snapshot(name)
        if snapshot is not None:
            return _load(lambda: datasets.load_dataset(str(snapshot), src.subset, **args), label,
                         f" (read from the Hub cache, {snapshot}; {why})")
        if not _arrow_cache(name).is_dir():
            raise not_found(name, looked, why)
        return _load(lambda: datasets.load_dataset(name, src.subset, **args), label,
                     f" (datasets' cache, {_arrow_cache(name)}; {why})")


def open_hub(name: str, src: DataSource, looked: list[Path]) -> DatasetRecords:
    """Hub dataset NAME's split as records: downloaded (or found in the caches) by datasets when
    the Hub answers; from the HF caches alone when it is off or does not answer."""
    datasets = _datasets()
    import huggingface_hub.constants as hub

    label = f"{name}[{src.split or 'train'}]"
    why = _offline_setting()
    if why is None and not answers(hub.ENDPOINT):
        why = f"{hub.ENDPOINT} does not answer"
    if why is not None:
        return _records(_from_caches(name, src, label, looked, why), label, src)
    data = _load(lambda: datasets.load_dataset(name, src.subset, split=src.split or "train",
                                               streaming=src.streaming, data_files=src.data_files), label,
                 f" (nor is it a local path: {', '.join(str(p.absolute()) for p in looked)})")
    return _records(data, label, src)


# ---------------------------------------------------------------- ModelScope


def open_modelscope(name: str, src: DataSource) -> DatasetRecords:
    """ModelScope dataset NAME through the modelscope package (which hands back datasets' objects)."""
    label = f"{MS_PREFIX}{name}[{src.split or 'train'}]"
    fetch = (f"download it where there is network (`modelscope download --dataset {name} --local_dir DIR`) "
             "and set data_files to DIR")
    if importlib.util.find_spec("modelscope") is None:
        raise UserError(f"data_files '{MS_PREFIX}{name}' needs the modelscope package: pip install modelscope "
                        f"(or {fetch})")
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    url = domain if "://" in domain else f"https://{domain}"
    if not answers(url):
        raise UserError(f"dataset '{MS_PREFIX}{name}': ModelScope ({url}) does not answer; {fetch}")
    from modelscope.msdatasets import MsDataset

    loaded = _load(lambda: MsDataset.load(name, subset_name=src.subset, split=src.split or "train",
                                          data_files=src.data_files, use_streaming=src.streaming), label)
    data = loaded.to_hf_dataset() if hasattr(loaded, "to_hf_dataset") and not src.streaming else loaded
    return _records(data, label, src)


def open_dataset(src: DataSource, looked: list[Path]) -> DatasetRecords | None:
    """SRC's dataset when its path names one (LOOKED: the local paths already tried), else None."""
    named = dataset_name(src.path)
    if named is None:
        return None
    kind, name = named
    if not NAME.fullmatch(name):
        raise UserError(f"data_files '{src.path}': expected a dataset name like org/name after the prefix")
    return open_modelscope(name, src) if kind == "modelscope" else open_hub(name, src, looked)
