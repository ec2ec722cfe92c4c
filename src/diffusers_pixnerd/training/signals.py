# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM (`kill`, a cluster's time limit) end it after the
current step, with a checkpoint (`TrainingRun.end_step`)."""

import logging
import signal
import threading

import torch

logger = logging.getLogger(__name__)


class StopSignals:
    r"""
    Handlers for SIGINT and SIGTERM that ask the run to stop after the current step; a second SIGINT stops at once.
    Installed only in the main thread (signal handlers cannot be set elsewhere); `restore` puts back the ones from
    before.

    Args:
        accelerator (`accelerate.Accelerator`):
            The run's accelerator: the processes agree on stopping (`requested`), its local main process logs.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: int | None = None  # the signal number, once one arrived (on any process, after `requested`)
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._install()

    def _install(self):
        def request_stop(signum, frame):
            self.received = signum
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
            if self.accelerator.is_local_main_process:
                logger.warning(
                    "%s received: stopping after this step with a checkpoint (Ctrl-C again to stop at once).",
                    signal.Signals(signum).name,
                )

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, request_stop)
            # A run in this process that died by an exception left its handler: put back the one from before it.
            previous = getattr(previous, "previous_handlers", {}).get(signum, previous)
            self._previous[signum] = previous
        request_stop.previous_handlers = self._previous

    def restore(self):
        """Puts back the handlers from before the run (once the run ends, or stops on an error)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self) -> bool:
        """Whether any process got a stop signal (all processes stop at the same step). Every process must call it."""
        flag = self.received or 0
        if self.accelerator.num_processes > 1:
            flag = int(self.accelerator.reduce(torch.tensor(flag, device=self.accelerator.device), "max").item())
            self.received = self.received or (flag or None)
        return bool(flag)
