"""MLflow tracking as a user of the bundles expects it: one run per training, resumable, with provenance.

MONAI's :class:`~monai.handlers.MLFlowHandler` does the logging; :class:`GuideGenMLFlowHandler` adds what a
training run of these bundles needs on top of it:

- **one run across a kill-and-resume**: the run id is written beside the checkpoints; a trainer resumed from a
  checkpoint continues that run, and steps it logged before the interruption are not logged again (the redone
  iterations would otherwise give each of those steps two values);
- **provenance tags** (git commit, stage, bundle version, dataset and class map, see :func:`provenance_tags`);
- **validation metrics** of the stage's evaluator, logged per trainer epoch into the same run;
- **the final model as an MLflow Model** (pytorch flavour, registered in the model registry).

``--tracking mlflow`` appends MONAI's own handlers to ``train#handlers`` and ``validate#handlers``; with the bundle's
handler already logging to the same tracking URI and experiment they would log every metric a second time.
:func:`drop_duplicate_trackers` removes them (the trainer does it for its handlers, the evaluator configs for theirs).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

from custom_components.data.io import file_digest, json_digest

__all__ = [
    "GuideGenMLFlowHandler",
    "drop_duplicate_trackers",
    "keep_mlflow_telemetry_off",
    "provenance_tags",
    "model_requirements",
]

logger = logging.getLogger(__name__)

RUN_RECORD_NAME = "checkpoint_mlflow_run.json"  # "checkpoint" prefix: packaging leaves it out with the checkpoints


def keep_mlflow_telemetry_off() -> None:
    """Turn MLflow's usage telemetry off for this process unless the user decided (``MLFLOW_DISABLE_TELEMETRY`` or
    ``DO_NOT_TRACK`` set).

    MLflow 3 reports API usage to its maintainers' server by default. Training runs here log medical-imaging
    experiments, often on machines without network access or under data-protection rules, so nothing is sent unless a
    user opts in with ``MLFLOW_DISABLE_TELEMETRY=false``. MLflow reads the variable at each tracked call, so setting
    it before the first call of a run is enough.
    """
    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ and "DO_NOT_TRACK" not in os.environ:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def _git(bundle_root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(bundle_root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def provenance_tags(bundle_root: str | os.PathLike, stage: str, datalist: str | os.PathLike | None, class_map: Any) -> dict[str, str]:
    """The tags that say what a training run was made from, so a logged model can be traced back to its inputs.

    Args:
        bundle_root: the bundle folder (its ``configs/metadata.json`` gives the version; the git checkout it sits
            in, if any, the commit).
        stage: ``tcss``, ``autoencoder`` or ``ldm``.
        datalist: the datalist file trained on.
        class_map: its :class:`~custom_components.data.class_map.ClassMap`.

    Returns:
        ``mlflow.source.git.commit`` (the tag MLflow's UI shows) and ``guidegen.*`` tags; the commit is
        ``unknown`` for a bundle outside a git checkout (e.g. downloaded), and ``guidegen.git_dirty`` says whether
        tracked files differed from it.
    """
    root = Path(bundle_root)
    meta_file = root / "configs" / "metadata.json"
    version = json.loads(meta_file.read_text()).get("version", "unknown") if meta_file.is_file() else "unknown"
    commit = _git(root, "rev-parse", "HEAD") or "unknown"
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no") if commit != "unknown" else None
    tags = {
        "mlflow.source.git.commit": commit,
        "guidegen.git_commit": commit,
        "guidegen.git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        "guidegen.stage": str(stage),
        "guidegen.bundle": root.name,
        "guidegen.bundle_version": str(version),
        "guidegen.class_map": str(getattr(class_map, "name", class_map)),
        "guidegen.num_classes": str(getattr(class_map, "num_classes", "")),
    }
    raw = getattr(class_map, "raw", None)
    if raw is not None:
        tags["guidegen.class_map_sha256"] = json_digest(raw)
    if datalist is not None and Path(datalist).is_file():
        content = json.loads(Path(datalist).read_text())
        tags.update({
            "guidegen.dataset": str(Path(datalist).resolve()),
            "guidegen.dataset_name": str(content.get("name", Path(datalist).parent.name)),
            "guidegen.dataset_sha256": file_digest(datalist),
            "guidegen.dataset_cases": f"{len(content.get('training', []))} training, {len(content.get('validation', []))} validation",
        })
    return tags


def model_requirements(bundle_root: str | os.PathLike) -> list[str]:
    """Pinned pip requirements of a logged model: the bundle's own ``metadata.json`` versions.

    Given explicitly, so MLflow does not infer them by loading the model in a subprocess (slow, and it may reach
    for a package index).
    """
    meta_file = Path(bundle_root) / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    pins = {"torch": meta.get("pytorch_version"), "monai": meta.get("monai_version"), "numpy": meta.get("numpy_version")}
    pins.update(meta.get("required_packages_version", {}))
    return [f"{name}=={value}" if value else name for name, value in pins.items() if name != "mlflow"]


def _tracking_uri_of(handler: MLFlowHandler) -> str:
    return str(handler.client.tracking_uri)


def drop_duplicate_trackers(
    handlers: Sequence[Any] | None, tracking_uri: str | None = None, experiment_name: str | None = None
) -> list[Any]:
    """Handlers without the MONAI MLflow handlers that would log into a run the bundle's own handler logs.

    ``--tracking mlflow`` appends MONAI's MLFlowHandler to the trainer's and the evaluator's handler lists; on the
    same tracking URI and experiment it finds the bundle's run and logs every loss (and validation metric) again.
    A handler logging somewhere else (another URI or experiment) is a separate record and stays.

    Args:
        handlers: a handler list (None: none).
        tracking_uri, experiment_name: where the bundle's handler logs; default: the first
            :class:`GuideGenMLFlowHandler` in ``handlers``, which also takes over the dropped handlers' artifacts
            (``--tracking`` logs the executed config that way). A set ``MLFLOW_TRACKING_URI`` environment variable
            wins over ``tracking_uri``, as it does in MONAI's MLFlowHandler, so the comparison is made with the URI
            the handlers will really log to.

    Returns:
        the list without those handlers.
    """
    handlers = [h for h in (handlers or []) if h is not None]
    keeper = next((h for h in handlers if isinstance(h, GuideGenMLFlowHandler)), None)
    if tracking_uri is None:
        if keeper is None:
            return handlers
        uri, experiment = _tracking_uri_of(keeper), keeper.experiment_name
    else:
        # MONAI's MLFlowHandler lets MLFLOW_TRACKING_URI override its tracking_uri argument: compare with the same URI
        uri, experiment = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri, experiment_name
    kept = []
    for handler in handlers:
        duplicate = (
            isinstance(handler, MLFlowHandler)
            and not isinstance(handler, GuideGenMLFlowHandler)
            and _tracking_uri_of(handler) == uri
            and handler.experiment_name == experiment
        )
        if not duplicate:
            kept.append(handler)
            continue
        logger.info("MLflow: the bundle's handler already logs to %s (experiment %s); not adding a second one", uri, experiment)
        if keeper is not None:
            keeper.artifacts = tuple(dict.fromkeys([*keeper.artifacts, *(a for a in handler.artifacts if a)]))
    return kept


class GuideGenMLFlowHandler(MLFlowHandler):
    """MONAI's MLFlowHandler for a GuideGen training run: resumable, with provenance, validation and the model.

    Args:
        tags: run tags set at the start (:func:`provenance_tags`).
        validator: the stage's evaluator (run by a ``ValidationHandler``); its ``state.metrics`` are logged at each of
            its epochs, with the trainer's epoch as step (MONAI's evaluator takes the trainer's epoch as its own).
        model: the weights to log as an MLflow Model at the end: a module or an
            :class:`~custom_components.engines.InferenceWeights` (its info goes into the model's metadata).
        registered_model_name: register the logged model under this name (None: log it without registering).
        run_record: file holding the run id, beside the checkpoints, so that a resumed trainer continues the run.
        pip_requirements: the logged model's requirements (default: torch and monai as installed).
        kwargs: :class:`~monai.handlers.MLFlowHandler`'s arguments.
    """

    def __init__(
        self,
        tags: Mapping[str, Any] | None = None,
        validator: Engine | None = None,
        model: Any = None,
        registered_model_name: str | None = None,
        run_record: str | os.PathLike | None = None,
        pip_requirements: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        keep_mlflow_telemetry_off()
        super().__init__(**kwargs)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.validator = validator
        self.model = model
        self.registered_model_name = registered_model_name
        self.run_record = Path(run_record) if run_record is not None else None
        self.pip_requirements = list(pip_requirements) if pip_requirements is not None else None
        self._logged_until: dict[str, int] = {}
        self._logged_params: dict[str, str] = {}

    def attach(self, engine: Engine) -> None:
        # before MONAI's own COMPLETED handlers, which end the run (close_on_complete)
        if self.model is not None and not engine.has_event_handler(self.log_model, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.log_model)
        super().attach(engine)
        if self.validator is not None and not self.validator.has_event_handler(self.log_validation, Events.EPOCH_COMPLETED):
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.log_validation)

    # -- the run ---------------------------------------------------------------------------------------------------

    def _recorded_run(self, engine: Engine) -> Any:
        """The run of the interrupted training when ``engine`` was resumed from a checkpoint (None otherwise)."""
        if self.run_record is None or not engine.state.iteration or not self.run_record.is_file():
            return None
        try:
            record = json.loads(self.run_record.read_text())
            run = self.client.get_run(record["run_id"])
        except Exception as err:  # a missing run, an unreadable record or another tracking server
            logger.warning("MLflow: cannot continue the run recorded in %s (%s); starting a new run", self.run_record, err)
            return None
        if run.info.experiment_id != self.experiment.experiment_id or run.info.lifecycle_stage != "active":
            logger.warning("MLflow: run %s of %s is not an active run of experiment %s; starting a new run",
                           run.info.run_id, self.run_record, self.experiment_name)
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        logger.info("MLflow: resumed training continues run %s", run.info.run_id)
        return self.client.get_run(run.info.run_id)

    def start(self, engine: Engine) -> None:
        """Continue the recorded run when resuming, else create a new one (never adopt another unfinished run, as
        MONAI's handler would); then parameters, tags, and which steps are already logged."""
        if self.cur_run is None:
            self._set_experiment()
            self.cur_run = self._recorded_run(engine)
            if self.cur_run is None:
                name = self.run_name or None
                self.cur_run = self.client.create_run(experiment_id=self.experiment.experiment_id, run_name=name)
            if self.run_record is not None:
                self.run_record.parent.mkdir(parents=True, exist_ok=True)
                self.run_record.write_text(json.dumps({"run_id": self.cur_run.info.run_id,
                                                       "experiment_id": self.experiment.experiment_id}))
            run_id = self.cur_run.info.run_id
            logged = self.client.get_run(run_id).data
            self._logged_params = dict(logged.params)
            self._logged_until = {key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in logged.metrics}
            if self.tags:
                from mlflow.entities import RunTag

                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self.tags.items()])
        super().start(engine)

    def _log_params(self, params: dict[str, Any]) -> None:
        """Log only parameters the run does not have: MLflow refuses to change a logged value, and a resumed run
        logs its settings again (a changed one, e.g. a larger ``max_epochs``, is kept as a ``resumed.*`` tag)."""
        fresh, changed = {}, {}
        for key, value in params.items():
            text = str(value)
            if key not in self._logged_params:
                fresh[key] = text
            elif self._logged_params[key] != text:
                changed[key] = text
        if fresh:
            super()._log_params(fresh)
            self._logged_params.update(fresh)
        if changed and self.cur_run is not None:
            from mlflow.entities import RunTag

            self.client.log_batch(self.cur_run.info.run_id, tags=[RunTag(f"resumed.{k}", v) for k, v in changed.items()])

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log each metric at most once per step: the iterations a resumed trainer redoes (after its last checkpoint)
        were logged before the interruption, and MLflow cannot replace a logged value."""
        step = int(step or 0)
        fresh = {k: v for k, v in flatten_dict(metrics).items() if step > self._logged_until.get(k, -1)}
        if fresh:
            super()._log_metrics(fresh, step=step)
            for key in fresh:
                self._logged_until[key] = step

    # -- validation and the model ----------------------------------------------------------------------------------

    def log_validation(self, validator: Engine) -> None:
        """Log the evaluator's metrics at the trainer's epoch (the evaluator runs one epoch numbered like it)."""
        if self.cur_run is not None and validator.state.metrics:
            self._log_metrics(dict(validator.state.metrics), step=validator.state.epoch)

    def _network_and_info(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        network, info = self.model, {}
        if hasattr(network, "network") and hasattr(network, "info"):  # InferenceWeights
            network, info = network.network, dict(network.info.state_dict())
        if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            network = network.module
        return network, info

    def log_model(self, engine: Engine) -> None:
        """Log the final weights as an MLflow Model (pytorch flavour) and register it.

        The module is pickled (cloudpickle) with the ``custom_components`` package as its code, so
        ``mlflow.pytorch.load_model`` rebuilds it without the guidegen install; the checkpoint info (stage, class
        map, architecture) is the model's metadata. The weights are copied to the CPU, so the model loads without
        a GPU.
        """
        if self.cur_run is None:
            return
        import mlflow
        import yaml

        network, info = self._network_and_info()
        cpu_network = copy.deepcopy(network).cpu().eval()
        metadata = yaml.safe_load(yaml.safe_dump(info, default_flow_style=None)) if info else None
        package = Path(__file__).resolve().parents[1]
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.client.tracking_uri)
        try:
            with mlflow.start_run(run_id=self.cur_run.info.run_id):
                mlflow.pytorch.log_model(
                    cpu_network,
                    name="model",
                    serialization_format="pickle",  # pt2 needs an input example per stage; pickle keeps the module
                    code_paths=[str(package)],
                    pip_requirements=self.pip_requirements or [f"torch=={torch.__version__.split('+')[0]}", "monai"],
                    metadata=metadata,
                    registered_model_name=self.registered_model_name,
                )
        finally:
            mlflow.set_tracking_uri(previous)
            # the fluent run ended the run; the trainer's run stays the handler's until MONAI closes it
            self.client.update_run(self.cur_run.info.run_id, status="RUNNING")
