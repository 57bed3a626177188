"""A test hook that kills the node at a named point, so crash recovery is tested where it matters.

Layer: runtime (node, standard library). ``MEDSEC_EDGE_NODE_FAULT=POINT[:N]`` makes the node send
itself SIGKILL the N-th time (default 1st) it reaches POINT; unset (always, in production) it is
one dictionary lookup. Points: ``receive`` (an object is in memory, not yet spooled: the sender
gets no answer), ``spooled`` (on disk, the success status not yet sent), ``processed`` (the
output is in outgoing/, the received copy not yet removed), ``forward`` (the PACS answered
success, the outgoing copy not yet removed). A kill from outside lands anywhere; these land
exactly on the boundaries of the spool's steps.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["FAULT_ENV", "POINTS", "reached"]

FAULT_ENV = "MEDSEC_EDGE_NODE_FAULT"
POINTS = ("receive", "spooled", "processed", "forward")

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    point, _, count = value.partition(":")
    if point not in POINTS:
        raise ValueError(f"{FAULT_ENV}={value!r}: the point is one of {', '.join(POINTS)}")
    return point, int(count or 1)


def reached(point: str) -> None:
    """SIGKILL this process if the hook is armed for ``point`` and this is its N-th time."""
    armed = _armed()
    if armed is None or armed[0] != point:
        return
    with _lock:
        _hits[point] = _hits.get(point, 0) + 1
        if _hits[point] == armed[1]:
            os.kill(os.getpid(), signal.SIGKILL)
