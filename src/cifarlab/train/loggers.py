"""Experiment trackers as callbacks: TensorBoard and MLflow (both optional extras)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifarlab.errors import UserError
from cifarlab.train.callbacks import Callback

__all__ = ["MLflowLogger", "TensorBoardLogger", "mlflow_uri", "require"]

# Tracking URI schemes MLflow's stores understand (the SQL ones through SQLAlchemy dialects).
_MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql", "oracle")

_SCALARS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


def require(package: str, extra: str, feature: str) -> Any:
    """Import an optional dependency, or a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"{feature} needs the optional dependency: pip install 'cifarlab[{extra}]'") from None


class TensorBoardLogger(Callback):
    """Per-epoch scalars to `<run>/tensorboard` (extra `tensorboard`)."""

    order = 110
    state_required = False

    def __init__(self, log_dir: Path | str) -> None:
        require("tensorboard", "tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = self.trainer.history[-1]
        for key in _SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.writer.close()


def _flat_params(recipe: Any) -> dict[str, str]:
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in recipe.to_dict().items()}


def mlflow_uri(value: str | None, runs_root: Path | str) -> str:
    """The tracking URI `--mlflow [VALUE]` means: None, `<runs root>/mlruns`; a plain path, that folder (as a
    file:// URI, absolute); a URI, itself once its scheme is one MLflow stores in (else a one-line error)."""
    if value is None:
        return (Path(runs_root).resolve() / "mlruns").as_uri()
    scheme = value.split("://", 1)[0].split("+", 1)[0].lower() if "://" in value else ""
    if not scheme and value != "databricks":
        return Path(value).expanduser().resolve().as_uri()
    if value != "databricks" and scheme not in _MLFLOW_SCHEMES:
        raise UserError(
            f"--mlflow {value}: MLflow cannot store in a {scheme}:// location; give a folder, or a file://, "
            "sqlite:///, postgresql://, mysql:// or http(s):// tracking URI"
        )
    return value


class MLflowLogger(Callback):
    """Logs the recipe as parameters and every epoch's metrics to MLflow (extra `mlflow`).

    `tracking_uri` None: a local file store, `<runs root>/mlruns` (browse it with `mlflow ui --backend-store-uri
    <that folder>`; MLflow 3 needs MLFLOW_ALLOW_FILE_STORE=true for it, which this sets); any MLflow tracking URI
    otherwise (e.g. `sqlite:///mlflow.db` with the full `mlflow` package, or a tracking server's http URL).
    The MLflow run id is checkpointed, so a resumed cifarlab run continues the same MLflow run.
    """

    order = 110
    state_required = False

    def __init__(
        self,
        run_dir: Path | str,
        tracking_uri: str | None = None,
        experiment: str = "cifarlab",
        quiet: bool = False,
    ) -> None:
        self.mlflow = require("mlflow", "mlflow", "the MLflow logger (--mlflow)")
        self.quiet = quiet
        self.run_dir = Path(run_dir)
        self.tracking_uri = mlflow_uri(tracking_uri, self.run_dir.resolve().parent)
        if self.tracking_uri.startswith("file:"):
            # MLflow 3 keeps the file store only behind this opt-in; a local folder needs no database server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.experiment = experiment
        self.run_id: str | None = None

    def _client(self) -> Any:
        return self.mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)

    @contextlib.contextmanager
    def _said(self) -> Iterator[None]:
        """MLflow's own INFO lines (a new SQL store: "Creating initial MLflow database tables...") are not shown
        under --quiet; its warnings and errors still are. The level is put back afterwards."""
        if not self.quiet:
            yield
            return
        logger = logging.getLogger("mlflow")
        level = logger.level
        logger.setLevel(max(level, logging.WARNING))
        try:
            yield
        finally:
            logger.setLevel(level)

    def _ensure_run(self) -> str:
        with self._said():
            return self._start_run()

    def _start_run(self) -> str:
        if self.run_id is None:
            client = self._client()
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(self.experiment)
            run = client.create_run(exp_id, run_name=self.run_dir.name, tags={"cifarlab.run_dir": str(self.run_dir)})
            self.run_id = run.info.run_id
            for key, value in _flat_params(self.trainer.recipe).items():
                client.log_param(self.run_id, key, value[:500])
        return self.run_id

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._ensure_run()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        run_id = self._ensure_run()
        row = self.trainer.history[-1]
        with self._said():
            client = self._client()
            for key in _SCALARS:
                if row.get(key) is not None:
                    client.log_metric(run_id, key, float(row[key]), step=row["epoch"])

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.run_id is not None:
            with self._said():
                self._client().set_terminated(self.run_id)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")
