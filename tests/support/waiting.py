"""Bounded polling: the only way integration tests wait (250 ms interval, 30 s timeout)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30,
    interval: float = 0.25,
    message: str | Callable[[], str] = "",
) -> T:
    """Call `predicate` until it returns something truthy, and return that.

    Exceptions raised by the predicate count as "not yet" (the API may answer 404 before an
    object exists); the last one is chained to the TimeoutError raised after `timeout` seconds,
    together with the last value seen, so a failure says what was still wrong.
    """
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as err:
            last_error = err
        else:
            last_error = None
            if value:
                return value
            last_value = value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            detail = f"last error: {last_error!r}" if last_error else f"last value: {last_value!r}"
            raise TimeoutError(
                f"timed out after {timeout:g}s waiting for {text or predicate!r}; {detail}"
            ) from last_error
        time.sleep(interval)
