"""DataLoader workers ignore Ctrl-C.

A terminal's SIGINT reaches every process of its group, workers included; each would die with its
own KeyboardInterrupt traceback while the main process is still stopping the run cleanly (saving a
checkpoint at the step boundary). The main process shuts its workers down itself when it stops.
"""

from __future__ import annotations

import signal


def ignore_interrupt(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: SIGINT is the main process's business."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
