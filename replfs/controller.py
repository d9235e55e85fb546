"""What the two roles share: the replication state that the status file shows.

``state`` is one of "replicating", "degraded" (primary only), "failed-over"
and "stopped"; ``last_error`` the last failure in words (or None);
``checkpoints`` how many completed.  Each role adds its own fields.
"""

from __future__ import annotations

import os


class Controller:
    role = ""

    def __init__(self) -> None:
        self.state = "replicating"
        self.last_error: str | None = None
        self.checkpoints = 0

    @property
    def peer_connected(self) -> bool:
        raise NotImplementedError

    def status(self) -> dict:
        return {
            "role": self.role,
            "state": self.state,
            "pid": os.getpid(),
            "peer_connected": self.peer_connected,
            "checkpoints": self.checkpoints,
            "last_error": self.last_error,
        }
