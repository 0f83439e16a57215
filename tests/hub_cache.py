"""Datasets in a private HF cache, where `hf download --repo-type dataset NAME` leaves them, for
tests that load datasets by name with no network.

huggingface_hub's cache layout: HF_HUB_CACHE/datasets--ORG--NAME/refs/main holds the commit, and
snapshots/COMMIT/ the repository's files (links into blobs/ in a real download; plain files read
the same). The files are Parquet, written by `datasets` itself, named as the Hub names a
converted split (data/SPLIT-0000k-of-0000n.parquet), so `datasets` infers the splits as it would
from the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def alpaca(n: int, start: int = 0, tag: str = "") -> list[dict]:
    """N alpaca records, as tatsu-lab/alpaca's columns (instruction, input, output, text)."""
    return [{"instruction": f"{tag}question {i}", "input": "", "output": f"{tag}answer number {i}.",
             "text": ""} for i in range(start, start + n)]


def hub_snapshot(hub_cache: Path, name: str, splits: dict[str, list[list[dict] | bytes]],
                 readme: str | None = None, prefix: str = "data") -> Path:
    """Dataset NAME in HUB_CACHE: each split's shards (records, or raw bytes for a broken shard)
    as Parquet files; README.md when given (a dataset card, whose YAML may declare configs)."""
    import datasets

    repo = hub_cache / f"datasets--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for split, shards in splits.items():
        for k, shard in enumerate(shards):
            path = snapshot / prefix / f"{split}-{k:05d}-of-{len(shards):05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(shard, bytes):
                path.write_bytes(shard)
            else:
                datasets.Dataset.from_list(shard).to_parquet(str(path))
    if readme is not None:
        (snapshot / "README.md").write_text(readme)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def offline_env(home: Path) -> dict[str, str]:
    """The environment of a tuneforge process that must find datasets in HOME's caches only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
