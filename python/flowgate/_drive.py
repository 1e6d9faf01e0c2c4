"""Continuing a handler's coroutine as a task after its first step.

The binding runs an ``async def`` handler's first step at once, in the
loop's drain (most handlers finish there: no task, no done callback, no
extra loop iteration). Only one that suspends becomes a task, driven by
:func:`resume` from where it stopped.
"""

from __future__ import annotations

import types
from typing import Any, Coroutine, Generator


@types.coroutine
def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Drive ``coro`` on, as ``await coro`` would, after its first step
    yielded ``yielded`` (what it waits for); exceptions thrown in (a
    cancellation) go to ``coro``."""
    while True:
        try:
            value = yield yielded
        except BaseException as e:  # thrown in by the task: hand it on
            try:
                yielded = coro.throw(e)
            except StopIteration as done:
                return done.value
            continue
        try:
            yielded = coro.send(value)
        except StopIteration as done:
            return done.value
