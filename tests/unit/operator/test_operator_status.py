"""Conditions in the API convention, the Events they cause, and reading a result from a pod."""

from __future__ import annotations

import datetime as dt

import pytest

from optrun.api.v1alpha1 import OptimizationRunStatus
from optrun.operator import status
from tests.unit.operator.helpers import NOW, result_message


def test_last_transition_time_moves_only_when_the_status_moves() -> None:
    st = OptimizationRunStatus()
    status.set_condition(st, "Scheduled", "False", "Unschedulable", "no GPU", now=NOW, generation=1)
    later = NOW + dt.timedelta(seconds=30)
    status.set_condition(st, "Scheduled", "False", "Unschedulable", "still no GPU", now=later, generation=2)
    (c,) = st.conditions
    assert c.last_transition_time == "2026-01-02T03:04:05Z"
    assert (c.message, c.observed_generation) == ("still no GPU", 2)
    status.set_condition(st, "Scheduled", "True", "Scheduled", "on gpu-node-0", now=later, generation=2)
    assert st.conditions[0].last_transition_time == "2026-01-02T03:04:35Z"
    assert status.since(st, "Scheduled", later + dt.timedelta(seconds=5)) == 5.0


def test_conditions_keep_a_fixed_order_whatever_order_they_are_set_in() -> None:
    st = OptimizationRunStatus()
    for type_ in ("Complete", "Scheduled", "Failed", "Running"):
        status.set_condition(st, type_, "True", "X", "", now=NOW, generation=1)
    assert [c.type for c in st.conditions] == ["Scheduled", "Running", "Complete", "Failed"]


def test_each_changed_condition_emits_one_event_warnings_for_bad_news() -> None:
    old = OptimizationRunStatus()
    status.set_condition(old, "Scheduled", "Unknown", "PodCreated", "", now=NOW, generation=1)
    new = old.model_copy(deep=True)
    status.set_condition(new, "Scheduled", "False", "Unschedulable", "0/2 nodes", now=NOW, generation=1)
    status.set_condition(new, "Failed", "True", "DeadlineExceeded", "too slow", now=NOW, generation=1)
    status.set_condition(new, "Running", "False", "Suspended", "paused", now=NOW, generation=1)
    events = status.transition_events(old, new)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "Unschedulable"),
        ("Normal", "Suspended"),
        ("Warning", "DeadlineExceeded"),
    ]
    assert status.transition_events(new, new) == []


@pytest.mark.parametrize(
    ("message", "why"),
    [
        ("", "empty"),
        ("Traceback (most recent call last):\n  ...", "not JSON"),
        ('{"score": 1}', "not a result"),
    ],
)
def test_a_termination_message_that_is_no_result_says_why(message: str, why: str) -> None:
    with pytest.raises(status.ResultUnreadable, match=why):
        status.parse_result(message)


def test_judged_messages_name_the_pass_rate_and_the_failed_tests() -> None:
    result = status.parse_result(result_message(failing=("speedup.all",)))
    judged = status.judge_result(result, max_recoveries=3)
    assert judged.decision == "GO"  # 23/24 = 95.8% >= 95%
    assert judged.acceptance_reason == status.Reason.ACCEPTANCE_TARGET_MET
    assert "95.83% (23/24)" in judged.acceptance_message and "speedup.all" in judged.acceptance_message
    assert judged.safety_ok and judged.safety_reason == status.Reason.GATES_HELD


def test_messages_are_clipped_to_a_size_a_condition_can_hold() -> None:
    assert len(status.clip("x" * 5000)) == status.MESSAGE_LIMIT
    assert status.clip("short") == "short"
