"""Assemble and run the Ray Train job: ``TorchTrainer`` over ``train_loop`` with the run's configs.

Covers connecting to Ray (``RAY_ADDRESS`` or a local ``ray.init()``), ScalingConfig (workers, GPU
or CPU, CPUs per worker), RunConfig (storage path, name, FailureConfig, CheckpointConfig), running
``fit()``, and copying the final Hugging Face model out of the last checkpoint (``export_dir``).
A local Ray runs without its dashboard, so the State API that Ray Train's placement-group
cleaner polls every second is absent; ``quiet_state_api_polling`` (a worker set-up hook) keeps
that cleaner's once-a-second warning out of the job's log.
A run started again with the same ``storage_path`` and ``name`` resumes from its latest
checkpoint (same step, same data position).

Leaves out: what a worker does (``recipe``).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from fuseserve.trainer.config import TrainConfig

log = logging.getLogger(__name__)


#: Ray Train's detached placement-group cleaner, which polls the State API once a second and warns
#: on every failed poll (thousands of identical lines per run without a dashboard).
PLACEMENT_GROUP_CLEANER_LOGGER = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner"
)


#: The cleaner's monitoring thread; with two local Ray instances on one machine its State API
#: client cannot pick one and the thread dies with a 30-line traceback.
PLACEMENT_GROUP_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def quiet_state_api_polling() -> None:
    """Worker process set-up hook: show only errors from Ray Train's placement-group cleaner, and
    its monitoring thread's death as one line instead of a traceback."""
    cleaner = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    cleaner.setLevel(logging.ERROR)
    previous = threading.excepthook

    def one_line_for_the_cleaner(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name == PLACEMENT_GROUP_CLEANER_THREAD:
            cleaner.error("Ray Train's placement-group cleaner stopped: %s", args.exc_value)
            return
        previous(args)

    threading.excepthook = one_line_for_the_cleaner


#: The runtime environment of a Ray started by ``run_training``.
RAY_RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.{quiet_state_api_polling.__name__}"}


@dataclass(frozen=True)
class TrainResult:
    metrics: dict
    checkpoint_dir: str | None
    model_dir: str | None


def run_training(cfg: TrainConfig) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fuseserve.trainer.recipe import train_loop

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env=RAY_RUNTIME_ENV,
        )
    Path(cfg.storage_path).mkdir(parents=True, exist_ok=True)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    checkpoint_dir = result.checkpoint.path if result.checkpoint else None
    model_dir = None
    if cfg.export_dir and result.checkpoint is not None:
        with result.checkpoint.as_directory() as local:
            target = Path(cfg.export_dir)
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(Path(local) / "model", target)
            model_dir = str(target)
        log.info("final model exported to %s", model_dir)
    return TrainResult(dict(result.metrics or {}), checkpoint_dir, model_dir)
