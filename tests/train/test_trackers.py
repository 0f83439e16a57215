"""report_to: each tracker's run, read back with that tool's own reader, holds what train_log.jsonl
holds (the loss series step for step, the evaluation answers as text, the config), also after a
run that failed and one resumed from a checkpoint behind its log."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import tiny_config

from tuneforge.data.selfcog import write_self_cognition
from tuneforge.errors import UserError
from tuneforge.train import recipe as recipe_module
from tuneforge.train import trackers
from tuneforge.train.options import RunOptions
from tuneforge.train.recipe import Recipe, train

QUESTIONS = ["你是谁？", "Who made you?"]
LR = 5e-3
# Settings that would send a run elsewhere than the work dir (online, another store): not in tests.
ELSEWHERE = ("WANDB_MODE", "WANDB_API_KEY", "SWANLAB_MODE", "SWANLAB_API_KEY", "MLFLOW_TRACKING_URI")


def installed(name: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in trackers.TRACKERS[name].requires)


@dataclass
class Seen:
    """What a tool shows of a run: the loss per step, the evaluation text per step, the config's lr."""

    loss: list[tuple[int, float]] = field(default_factory=list)
    evals: dict[int, str] = field(default_factory=dict)
    lr: float | None = None
    status: str | None = None  # how the tool marks the run's end, where it keeps one


def jsonl(work: Path) -> list[dict]:
    return [json.loads(x) for x in (work / "train_log.jsonl").read_text(encoding="utf-8").splitlines() if x]


# ---------------------------------------------------------------- each tool's own reader

def read_tensorboard(work: Path) -> Seen:
    """Through the accumulator the TensorBoard server itself loads runs with (purges included)."""
    from tensorboard.backend.event_processing import tag_types
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(work / "tensorboard"), size_guidance={tag_types.TENSORS: 0})  # 0: keep all
    acc.Reload()
    seen = Seen()
    seen.loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
    for e in acc.Tensors("eval/text_summary") if "eval/text_summary" in acc.Tags()["tensors"] else []:
        seen.evals[e.step] = "".join(x.decode() for x in tensor_util.make_ndarray(e.tensor_proto).ravel())
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    seen.lr = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams["lr"].number_value
    return seen


def read_wandb(work: Path) -> Seen:
    """The offline run files (.wandb), record by record as wandb's own protobuf messages. wandb
    0.30 and later have no Python reader of that file any more; SwanLab's converter ships one of
    W&B's format (the LevelDB log with W&B's header), so neither reader is ours."""
    pytest.importorskip("swanlab", reason="reads .wandb files with SwanLab's reader of W&B's format")
    from swanlab.converter.wb.wbdatastore import WBDataStoreReader
    from wandb.proto import wandb_internal_pb2

    seen = Seen()
    for file in sorted((work / "wandb").glob("offline-run-*/run-*.wandb")):  # the names start with the time
        with WBDataStoreReader() as reader:
            reader.open(file)
            while (data := reader.scan()) is not None:
                record = wandb_internal_pb2.Record.FromString(data)
                kind = record.WhichOneof("record_type")
                if kind == "run" and seen.lr is None:
                    seen.lr = {u.key: json.loads(u.value_json) for u in record.run.config.update}.get("lr")
                elif kind == "exit":
                    seen.status = "finished" if record.exit.exit_code == 0 else "failed"
                elif kind == "history":
                    row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    if "loss" in row:
                        seen.loss.append((row["_step"], row["loss"]))
                    if "eval/path" in row:  # the answers' table, a file beside the run's
                        table = json.loads((file.parent / "files" / row["eval/path"]).read_text(encoding="utf-8"))
                        seen.evals[row["_step"]] = "\n".join(f"{q}\n{a}" for q, a in table["data"])
    return seen


def read_mlflow(work: Path) -> Seen:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(work / 'mlruns' / 'mlflow.db').resolve()}"
    # not mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI, which later runs would follow
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        [run] = mlflow.search_runs(experiment_names=["tuneforge"], output_format="list")
    client = MlflowClient(uri)
    seen = Seen(lr=float(run.data.params["lr"]), status=run.info.status.lower())
    seen.loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    for art in client.list_artifacts(run.info.run_id, "eval"):
        step = int(re.search(r"step_(\d+)", art.path).group(1))
        seen.evals[step] = client.download_artifacts(run.info.run_id, art.path, str(work / "mlflow-read"))
        seen.evals[step] = Path(seen.evals[step]).read_text(encoding="utf-8")
    return seen


def read_swanlab(work: Path) -> Seen:
    """The offline run files (.swanlab) through SwanLab's own record reader and messages."""
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    seen = Seen()
    for file in sorted((work / "swanlog").glob("run-*/run-*.swanlab")):  # the names start with the time
        config = file.parent / "files" / "config.yaml"
        if seen.lr is None and config.is_file():
            seen.lr = yaml.safe_load(config.read_text(encoding="utf-8"))["lr"]["value"]
        reader = DataStoreReader()
        reader.open(file)
        try:
            while (data := reader.scan()) is not None:
                record = Record.FromString(data)
                kind = record.WhichOneof("record_type")
                if kind == "scalar" and record.scalar.key == "loss":
                    seen.loss.append((record.scalar.step, record.scalar.value.number))
                elif kind == "media" and record.media.key == "eval":
                    texts = [(file.parent / "media" / "text" / i.filename).read_text(encoding="utf-8")
                             for i in record.media.value.items]
                    seen.evals[record.media.step] = "\n".join(texts)
                elif kind == "finish":
                    seen.status = Record.DESCRIPTOR.fields_by_name["finish"].message_type.fields_by_name[
                        "state"].enum_type.values_by_number[record.finish.state].name
        finally:
            reader.close()
    return seen


READERS = {"tensorboard": read_tensorboard, "wandb": read_wandb, "mlflow": read_mlflow, "swanlab": read_swanlab}
# how each tool marks a run that finished, and one that failed (TensorBoard keeps no such mark)
ENDS = {"tensorboard": (None, None), "wandb": ("finished", "failed"), "mlflow": ("finished", "failed"),
        "swanlab": ("RUN_STATE_FINISHED", "RUN_STATE_CRASHED")}


def read(name: str, work: Path) -> Seen:
    if not installed(name):
        pytest.skip(f"{name} is not installed (pip install 'tuneforge[{name}]')")
    return READERS[name](work)


# ---------------------------------------------------------------- runs shared by the tests below

@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        for name in ELSEWHERE:
            mp.delenv(name, raising=False)
        yield


def tracked_config(model: Path, data: Path):
    """6 steps with every installed tracker, evaluating at steps 0, 3 and 6, a checkpoint at 3 and 6."""
    return tiny_config(model, data, max_steps=6, save_steps=3, lr=LR, evaluation_inputs=QUESTIONS,
                       evaluation_freq=3, evaluation_max_new_tokens=4,
                       report_to=[n for n in trackers.TRACKERS if installed(n)])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "assistant.jsonl"
    write_self_cognition(out, "龙", "Long")
    return out


@pytest.fixture(scope="module")
def straight(tiny_model_dir, data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("straight") / "w"
    train(tracked_config(tiny_model_dir, data), work, RunOptions(progress=False))
    return work


@pytest.fixture(scope="module")
def resumed(tiny_model_dir, data, tmp_path_factory) -> tuple[Path, Path]:
    """A run that fails in step 5 (its log and trackers have steps 1-4, its checkpoint step 3),
    then resumed: it trains steps 4-6 again. Returns the work dir as the failure left it (a copy)
    and after the resume."""
    work = tmp_path_factory.mktemp("resumed") / "w"
    cfg = tracked_config(tiny_model_dir, data)
    step = Recipe.step

    def failing(self, i):
        if i == 4:
            raise RuntimeError("the machine fell over")
        return step(self, i)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Recipe, "step", failing)
        with pytest.raises(RuntimeError, match="fell over"):
            train(cfg, work, RunOptions(progress=False))
    failed = work.parent / "failed"
    shutil.copytree(work, failed)
    train(cfg, work, RunOptions(resume=True, progress=False))
    return failed, work


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("name", list(READERS))
def test_each_tracker_holds_the_loss_series_the_evaluations_and_the_config_of_train_log(straight, name):
    log = jsonl(straight)
    seen = read(name, straight)
    expected = [(r["step"], r["loss"]) for r in log if "loss" in r]
    assert [s for s, _ in seen.loss] == [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in seen.loss] == pytest.approx([v for _, v in expected], rel=1e-6)  # TensorBoard: float32
    evals = {r["step"]: r["eval"] for r in log if "eval" in r}
    assert sorted(seen.evals) == sorted(evals) == [0, 3, 6]
    for step, answers in evals.items():
        for a in answers:
            assert a["question"] in seen.evals[step] and a["answer"].strip() in seen.evals[step]
    assert seen.lr == pytest.approx(LR)
    assert seen.status == ENDS[name][0]


def test_tensorboard_also_has_the_other_per_step_numbers(straight):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(acc.Tags()["tensors"])


@pytest.mark.parametrize("name", list(READERS))
def test_a_failed_run_keeps_what_it_logged_and_a_resumed_one_logs_each_step_once(resumed, name):
    failed, work = resumed
    before = read(name, failed)  # closed and flushed when the run failed
    assert [s for s, _ in before.loss] == [1, 2, 3, 4]
    assert before.status == ENDS[name][1]
    log = jsonl(work)
    expected = [(r["step"], r["loss"]) for r in log if "loss" in r]
    after = read(name, work)
    # no step twice, none out of order; TensorBoard holds the resumed run's step 4, the others the
    # first run's, which the same seed and data make the same number on a CPU
    assert [s for s, _ in after.loss] == [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in after.loss] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert sorted(after.evals) == [0, 3, 6]
    assert after.status == ENDS[name][0]


@pytest.mark.parametrize(("name", "folders"), [("wandb", "wandb/offline-run-*"), ("swanlab", "swanlog/run-*")])
def test_offline_a_resumed_run_is_a_second_folder_of_the_same_run(resumed, name, folders):
    """`wandb sync` / `swanlab sync` of both folders upload one run, in order."""
    if not installed(name):
        pytest.skip(f"{name} is not installed")
    _, work = resumed
    kept = json.loads((work / "trackers.json").read_text())[name]
    attempts = sorted(work.glob(folders))
    assert len(attempts) == 2 and {p.name.rsplit("-", 1)[1] for p in attempts} == {kept}


def test_the_preference_and_gpu_numbers_reach_the_tracker_as_the_log_has_them(tmp_path):
    """What a CPU SFT run does not log: a DPO step's margin and accuracy, a GPU's peak memory."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from tuneforge.train.trackers.log import TrackedLog

    log = TrackedLog(tmp_path / "train_log.jsonl", ["tensorboard"], print)
    log.open({"lr": 1e-6, "objective": "dpo"}, 0)
    step = {"step": 1, "loss": 0.69, "lr": 1e-6, "grad_norm": 2.5, "tokens": 512, "tokens_per_s": 900.0,
            "reward_chosen": 0.1, "reward_rejected": -0.2, "margin": 0.3, "accuracy": 0.75, "peak_gib": 21.4}
    log.write(step)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for key, value in step.items():
        if key != "step":
            [event] = acc.Tensors(key)
            assert event.step == 1 and float(tensor_util.make_ndarray(event.tensor_proto)) == pytest.approx(value)


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning_and_training_goes_on(tiny_model_dir, data,
                                                                                    tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from tuneforge.train.trackers.tensorboard import TensorBoard

    write = TensorBoard.write

    def full_disk(self, record):
        if record.get("step") == 3:
            raise OSError(28, "No space left on device")
        write(self, record)

    monkeypatch.setattr(TensorBoard, "write", full_disk)
    work = tmp_path / "w"
    train(tiny_config(tiny_model_dir, data, max_steps=4, save_steps=4, report_to=["tensorboard"]), work,
          RunOptions(progress=False))
    assert ("warning: tensorboard failed (OSError: [Errno 28] No space left on device); it gets nothing more, "
            "train_log.jsonl has every record") in capsys.readouterr().out
    assert [s for s, _ in read_tensorboard(work).loss] == [1, 2]  # what it had got, flushed
    assert [r["step"] for r in jsonl(work) if "loss" in r] == [1, 2, 3, 4]


def test_a_tracker_that_is_not_installed_is_one_line_with_the_install_command(tiny_model_dir, data, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as when it is not installed
    loaded = []
    monkeypatch.setattr(recipe_module, "load_model", lambda *a, **k: loaded.append(a))
    cfg = tiny_config(tiny_model_dir, data, report_to=["wandb"])
    with pytest.raises(UserError, match=re.escape("report_to names wandb, but wandb is not installed; install it "
                                                  "with pip install 'tuneforge[wandb]'")):
        train(cfg, tmp_path / "w", RunOptions(progress=False))
    assert not loaded  # before the model loads


def test_the_train_command_stops_on_a_missing_tracker_before_any_rank_starts(tiny_model_dir, data, tmp_path,
                                                                            monkeypatch, capsys):
    from tuneforge.cli import main

    monkeypatch.setitem(sys.modules, "swanlab", None)
    config = tmp_path / "cfg.py"
    config.write_text(f"pretrained_model_name_or_path = {str(tiny_model_dir)!r}\ndata_files = {str(data)!r}\n"
                      "report_to = ['swanlab']\n")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tuneforge: error: report_to names swanlab, but swanlab is not installed; install it with "
                   "pip install 'tuneforge[swanlab]' (or remove swanlab from report_to)"]
    assert not (tmp_path / "w").exists()


def test_by_default_tensorboard_reports_where_it_is_installed(monkeypatch):
    pytest.importorskip("tensorboard")
    assert trackers.chosen(None) == ["tensorboard"]
    assert trackers.chosen(["wandb"]) == ["wandb"] and trackers.chosen([]) == []
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as when it is not installed
    assert trackers.chosen(None) == []  # decided when asked, not when tuneforge was imported
