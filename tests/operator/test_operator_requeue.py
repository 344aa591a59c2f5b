"""When the next pass over a QueueConsumer is due, as a pure function of the last passes (the
operator's tests through kopf cover the daemon that waits for it)."""

from __future__ import annotations

from luaq.operator.reconcile import requeue_after
from luaq.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(resync_seconds=60.0, autoscale_seconds=10.0)


def test_a_pass_that_went_through_waits_for_the_resync_or_the_autoscalers_next_read() -> None:
    assert requeue_after(0, False, SETTINGS) == 60.0
    assert requeue_after(0, True, SETTINGS) == 10.0


def test_failed_passes_back_off_up_to_a_minute_autoscaled_or_not() -> None:
    for autoscaled in (False, True):
        waits = [requeue_after(failures, autoscaled, SETTINGS) for failures in range(1, 9)]
        assert waits == [1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 60.0, 60.0]
