"""What a training step minimises, picked once in ``Recipe.setup()``: the SFT loss, or one of
the preference losses. The loop asks an objective three things and never which one it has:

- ``units(rows)``: what the step's loss is a mean over (labelled tokens; pairs), counted over all
  micro-batches of all ranks, so accumulation and data parallelism give one big batch's gradient;
- ``loss(model, batch, fast)``: the micro-batch's loss summed over its units;
- ``metrics()``: what to log beside the loss, summed since the last call.

The reference model costs no memory: with adapters it is the same model with the adapters off
(peft's ``disable_adapter``), for a full fine-tune its log-probabilities are computed once, before
any update, and kept beside the run (``reference_logps.npy`` in the work dir), so a resumed run
still compares against the model it started from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tuneforge.config.schema import Config
from tuneforge.data.batching import collate, labelled, model_inputs, pairs_in, varlen_arguments
from tuneforge.data.encode import IGNORE
from tuneforge.data.pack import Row
from tuneforge.fast.cross_entropy import linear_token_logps
from tuneforge.fast.path import FastPath, causal_lm, head_for_linear_ce
from tuneforge.models import probe
from tuneforge.train import parallel, preference
from tuneforge.train.loss import loss_sum

REFERENCE_FILE = "reference_logps.npy"
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}
DEFAULT_SIMPO_GAMMA = 0.5
DEFAULT_ORPO_LAMBDA = 0.1


class SFT:
    """Next-token cross-entropy of the labelled tokens, a mean over all of them."""

    def units(self, rows: list[Row]) -> int:
        return labelled(rows)

    def loss(self, model: Any, batch: dict[str, Any], fast: FastPath | None) -> torch.Tensor:
        return loss_sum(model, batch, fast)

    def metrics(self) -> dict[str, float]:
        return {}

    def prepare(self, model: Any, rows: Any, run: ReferenceRun) -> None:
        pass


class ReferenceRun:
    """Where and how to compute reference log-probabilities ahead of training."""

    def __init__(self, work_dir: Path, device: torch.device, amp: torch.dtype | None, pad_id: int,
                 ranks: parallel.Ranks, say: Callable[[str], None], progress: bool, key: str) -> None:
        self.work_dir, self.device, self.amp, self.pad_id = work_dir, device, amp, pad_id
        self.ranks, self.say, self.progress, self.key = ranks, say, progress, key


def answer_logps(model: Any, batch: dict[str, Any], fast: FastPath | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities and token counts of every answer in BATCH, each (pairs, 2).
    The vocabulary projection runs only where some row has a label (the answers)."""
    fast = fast or FastPath()
    targets = batch["labels"][:, 1:]
    seq = batch["sequence_ids"][:, 1:]
    extra = varlen_arguments(batch) if fast.varlen else {}
    if fast.linear_ce:  # decoder, then the head in chunks: 2k-token answers' logits are GBs at 92k words
        hidden = causal_lm(model).get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                                use_cache=False, **extra).last_hidden_state
        trained = targets != IGNORE
        head = head_for_linear_ce(model)
        h = hidden[:, :-1][trained]
        logps = linear_token_logps(h, head.weight, targets[trained], head.low_rank(h))
        return preference.sequence_sums(logps, seq[trained], 2 * batch["pairs"])
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)
    if probe.accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = keep
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                   **extra).logits
    if "logits_to_keep" not in extra:
        logits = logits[:, :-1][:, keep]
    t, s = targets[:, keep], seq[:, keep]
    trained = t != IGNORE
    return preference.sequence_logps(logits[trained], t[trained], s[trained], 2 * batch["pairs"])


def adapters_off(model: Any) -> contextlib.AbstractContextManager:
    """MODEL as it was before training: peft's adapters switched off for the block."""
    return model.disable_adapter()


class Preference:
    """DPO, ORPO or SimPO on pairs; a mean over pairs."""

    def __init__(self, cfg: Config) -> None:
        self.kind = cfg.objective
        self.dpo_loss = cfg.dpo_loss or "sigmoid"
        self.beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA.get(self.kind, 0.0)
        self.gamma = cfg.simpo_gamma if cfg.simpo_gamma is not None else DEFAULT_SIMPO_GAMMA
        self.lam = cfg.orpo_lambda if cfg.orpo_lambda is not None else DEFAULT_ORPO_LAMBDA
        self.needs_reference = self.kind == "dpo"
        self.reference_ahead = self.needs_reference and cfg.method == "full"
        self._sums: torch.Tensor | None = None  # chosen reward, rejected reward, correct, pairs
        self.table: torch.Tensor | None = None  # a full fine-tune's reference, per pair number

    def describe(self) -> str:
        if self.kind == "dpo":
            ref = "computed once before training" if self.reference_ahead else "the model with its adapters off"
            return f"DPO ({self.dpo_loss}, beta {self.beta}); reference: {ref}"
        if self.kind == "simpo":
            return f"SimPO (beta {self.beta}, gamma {self.gamma}); no reference"
        return f"ORPO (lambda {self.lam}); no reference"

    def units(self, rows: list[Row]) -> int:
        return pairs_in(rows)

    def losses(self, policy: torch.Tensor, reference: torch.Tensor | None,
               counts: torch.Tensor) -> preference.PairLosses:
        if self.kind == "dpo":
            return preference.dpo(policy, reference, counts, self.beta, self.dpo_loss)
        if self.kind == "simpo":
            return preference.simpo(policy, counts, self.beta, self.gamma)
        return preference.orpo(policy, counts, self.lam)

    def reference(self, model: Any, batch: dict[str, Any], fast: FastPath | None) -> torch.Tensor | None:
        if not self.needs_reference:
            return None
        if self.table is not None:
            self.table = self.table.to(batch["pair_ids"].device)  # once: then it stays there
            return self.table[batch["pair_ids"]]
        with torch.no_grad(), adapters_off(model):
            return answer_logps(model, batch, fast)[0]

    def loss(self, model: Any, batch: dict[str, Any], fast: FastPath | None) -> torch.Tensor:
        reference = self.reference(model, batch, fast)
        policy, counts = answer_logps(model, batch, fast)
        out = self.losses(policy, reference, counts)
        sums = torch.stack([out.chosen.sum(), out.rejected.sum(), (out.chosen > out.rejected).sum().float(),
                            policy.new_tensor(float(len(out.loss)))]).detach()
        self._sums = sums if self._sums is None else self._sums + sums
        return out.loss.sum()

    def metrics(self) -> dict[str, float]:
        """Summed over this rank's micro-batches since the last call (the caller adds up ranks)."""
        if self._sums is None:
            return {}
        c, r, correct, n = self._sums.tolist()
        self._sums = None
        return {"reward_chosen": c, "reward_rejected": r, "correct": correct, "pairs": n}

    def prepare(self, model: Any, rows: Any, run: ReferenceRun) -> None:
        """A full fine-tune's reference log-probabilities, before any update: from the work dir
        when this run computed them already (a resume), else now, every rank its share of rows."""
        if not self.reference_ahead:
            return
        path = run.work_dir / REFERENCE_FILE
        key_file = path.with_suffix(".json")
        if path.is_file() and key_file.is_file() and json.loads(key_file.read_text()).get("key") == run.key:
            table = np.load(path)
            run.say(f"reference log-probabilities of {len(table)} pairs from {path}")
        else:
            table = reference_logps(model, rows, run)
            if run.ranks.main:
                np.save(path, table)
                key_file.write_text(json.dumps({"key": run.key}))
            parallel.barrier(run.ranks)
            run.say(f"reference log-probabilities of {len(table)} pairs computed -> {path}")
        self.table = torch.from_numpy(table).float()


def reference_logps(model: Any, rows: Any, run: ReferenceRun) -> np.ndarray:
    """Per used pair, the model's summed log-probabilities of (chosen, rejected); every rank
    computes its share of the rows and the shares are summed."""
    out = torch.zeros(rows.pairs(), 2, dtype=torch.float64)
    mine = range(run.ranks.rank, len(rows), run.ranks.world)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        for i in tqdm(mine, desc="reference", unit="row", disable=not (run.progress and run.ranks.main)):
            row = rows[i]
            batch = model_inputs({**collate([row], run.pad_id)}, False, run.device)
            logps, _ = answer_logps(model, batch, None)
            out[rows.groups[i]] = logps.double().cpu()
    model.train(was_training)
    return parallel.sum_tensor(out, run.ranks).numpy()


def reference_key(model_path: Path, dtype: torch.dtype, rows: Any) -> str:
    """What the cached reference depends on: the base model, its dtype and the rows' tokens."""
    h = hashlib.sha256(json.dumps([str(model_path), str(dtype), len(rows)]).encode())
    for arr in (rows.store_of, rows.index_of, rows.lengths):
        h.update(np.ascontiguousarray(arr).tobytes())
    for g in rows.groups:
        h.update(np.asarray(g, dtype=np.int64).tobytes())
    for store in rows.stores:
        h.update(np.ascontiguousarray(store.input_ids).tobytes())
        h.update(np.ascontiguousarray(store.labels).tobytes())
    return h.hexdigest()[:32]


def objective_for(cfg: Config) -> SFT | Preference:
    return SFT() if cfg.objective == "sft" else Preference(cfg)
