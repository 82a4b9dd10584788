"""The worker loop shared by every concern."""

from __future__ import annotations

from orchestratord.worker import Worker
from tests.support.daemon import holds, wait_for


class Patient(Worker):
    """A worker with nothing to do for an hour, as the dispatcher once the hourly cap is reached."""

    name = "patient"
    stall_after = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def step(self) -> float:
        self.steps += 1
        return 3600.0


def test_a_worker_waiting_a_long_time_is_not_taken_for_hung() -> None:
    w = Patient()
    w.start()
    try:
        wait_for(lambda: w.steps, 5, "the first step")
        holds(w.fresh, 1.0, "a waiting worker keeps its heartbeat (else the watchdog restarts the service)")
        assert w.steps == 1, "and it still waits: no extra step"
        w.wake()
        wait_for(lambda: w.steps == 2, 5, "a wake ends the wait")
    finally:
        w.stop()
        assert w.join(5), "a stop ends the wait"
