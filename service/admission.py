"""Which waiting requests join the running batch: a pure policy, unit-tested on its own
(tests/test_admission.py), used by the scheduler's batch loop between generation steps.

Requests carry a compatibility key from their engine (rows with different keys cannot share a step;
None everywhere means every row can share with every other, as VoxCPM's per-row time grids allow).
Arrival order is kept; a request whose key differs from the running batch's is never starved: once it
has waited `drain_after_s`, nothing new joins the batch, which then empties and switches to its key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence


@dataclass(frozen=True)
class Waiting:
    key: Hashable
    waited_s: float


def choose_admissions(waiting: Sequence[Waiting], running_key: Optional[Hashable], running: int, capacity: int,
                      drain_after_s: float) -> list[int]:
    """Indices into `waiting` (oldest first) of the requests to admit now.

    running_key: the key of the rows running now (ignored when running == 0); capacity: rows per step.
    """
    free = capacity - running
    if free <= 0 or not waiting:
        return []
    key = running_key if running else waiting[0].key
    blocked = [w for w in waiting if w.key != key]
    if running and blocked and blocked[0].waited_s >= drain_after_s:
        return []  # drain: the oldest other-key request has waited long enough; its turn is next
    return [i for i, w in enumerate(waiting) if w.key == key][:free]
