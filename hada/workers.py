"""Worker processes that end with the process that started them.

A pool worker busy with a long step (a training run) outlives a parent stopped by ``kill`` or a crash, and goes
on writing under ``data/`` unseen. On Linux each worker asks the kernel for SIGTERM when its parent dies; what it
had finished stays, and an interrupted run resumes from its last checkpoint next time.
"""

from __future__ import annotations

import signal
import sys

_PR_SET_PDEATHSIG = 1  # prctl option: the signal this process receives when its parent thread exits


def end_with_parent() -> bool:
    """Have this process receive SIGTERM when its parent exits; True where the platform allows it (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent is already gone (between fork and here): end now, as it would have
        os.kill(os.getpid(), signal.SIGTERM)
    return True
