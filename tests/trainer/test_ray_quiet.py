"""The worker set-up hook that keeps Ray Train's placement-group cleaner from flooding the log."""

from __future__ import annotations

import importlib
import logging

from fuseserve.trainer.job import PLACEMENT_GROUP_CLEANER_LOGGER, RAY_RUNTIME_ENV


def test_the_hook_named_in_the_runtime_env_silences_only_the_cleaner(caplog):
    module, _, name = RAY_RUNTIME_ENV["worker_process_setup_hook"].rpartition(".")
    hook = getattr(importlib.import_module(module), name)  # what a Ray worker resolves
    cleaner = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    before = cleaner.level
    try:
        hook()
        with caplog.at_level(logging.WARNING):
            cleaner.warning("Failed to query Ray Train Controller actor state.")
            cleaner.error("placement group cleanup failed")
            logging.getLogger("ray.train").warning("other Ray Train warnings still show")
        shown = [r.getMessage() for r in caplog.records]
        assert shown == ["placement group cleanup failed", "other Ray Train warnings still show"]
    finally:
        cleaner.setLevel(before)


def test_the_logger_name_is_ray_trains_own():
    """Ray renaming the module would make the hook silently useless: fail here instead."""
    cleaner = importlib.import_module(PLACEMENT_GROUP_CLEANER_LOGGER)
    assert cleaner.logger.name == PLACEMENT_GROUP_CLEANER_LOGGER
