"""MLflow: a SQLite store in WORK_DIR/mlruns unless MLFLOW_TRACKING_URI names another."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from tuneforge.train.trackers.base import Opened, RunInfo, Status, plain_config, scalars, texts

STATUSES = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
MAX_PARAM_LENGTH = 6000  # MLflow refuses longer parameter values


class MLflow:
    # MLflow 3 refuses its old file store (./mlruns folders) by default; SQLite needs these two.
    requires = ("mlflow", "sqlalchemy", "alembic")
    purges = False

    def open(self, run: RunInfo) -> Opened:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            store = (run.work_dir / "mlruns").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        with warnings.catch_warnings():  # SQLAlchemy's deprecation notes about MLflow's own tables
            warnings.simplefilter("ignore")
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tuneforge")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else \
                self.client.create_experiment(name, artifact_location=artifacts)
        self.run_id = None
        if run.run_id:
            try:
                self.client.update_run(run.run_id, status="RUNNING")
                self.run_id = run.run_id
            except MlflowException:  # the store was moved or emptied: a new run
                pass
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=run.work_dir.name).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:MAX_PARAM_LENGTH])
                                                       for k, v in plain_config(run.config).items()])
        return Opened(self.run_id, f"run {self.run_id} in {uri}; view: mlflow ui --backend-store-uri {uri} "
                                   "(the UI needs the full `pip install mlflow`)")

    def write(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = record.get("step")
        if step is None:
            return
        when = int(1000 * record.get("time", time.time()))
        metrics = [Metric(k, v, when, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        for key, text in texts(record).items():  # a text file per record: eval/step_000010.txt
            self.client.log_text(self.run_id, text + "\n", f"{key}/step_{step:06d}.txt")

    def close(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, STATUSES[status])
