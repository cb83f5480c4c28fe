"""The worker set-up hook that keeps Ray Train's placement-group cleaner from flooding the log."""

from __future__ import annotations

import importlib
import logging
import threading

from fuseserve.trainer.job import (
    PLACEMENT_GROUP_CLEANER_LOGGER,
    PLACEMENT_GROUP_CLEANER_THREAD,
    RAY_RUNTIME_ENV,
    quiet_state_api_polling,
)


def test_the_hook_named_in_the_runtime_env_silences_only_the_cleaner(caplog):
    module, _, name = RAY_RUNTIME_ENV["worker_process_setup_hook"].rpartition(".")
    hook = getattr(importlib.import_module(module), name)  # what a Ray worker resolves
    cleaner = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    before, excepthook = cleaner.level, threading.excepthook
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
        threading.excepthook = excepthook


def test_the_logger_name_is_ray_trains_own():
    """Ray renaming the module would make the hook silently useless: fail here instead."""
    cleaner = importlib.import_module(PLACEMENT_GROUP_CLEANER_LOGGER)
    assert cleaner.logger.name == PLACEMENT_GROUP_CLEANER_LOGGER


def test_the_cleaners_dying_thread_is_one_line_and_other_threads_keep_their_traceback(caplog):
    cleaner = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    before, excepthook = cleaner.level, threading.excepthook
    seen: list[str] = []
    threading.excepthook = lambda args: seen.append(args.thread.name)  # the hook before ours
    try:
        quiet_state_api_polling()

        def fail() -> None:
            raise ConnectionError("Found multiple active Ray instances")

        with caplog.at_level(logging.ERROR):
            for name in (PLACEMENT_GROUP_CLEANER_THREAD, "someone-else"):
                thread = threading.Thread(target=fail, name=name)
                thread.start()
                thread.join()
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [
            "Ray Train's placement-group cleaner stopped: Found multiple active Ray instances"
        ]
        assert seen == ["someone-else"]  # any other thread's death goes to the previous hook
    finally:
        cleaner.setLevel(before)
        threading.excepthook = excepthook
