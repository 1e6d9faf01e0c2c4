"""Helpers of the Python tests: configs, the broker's own counts, waiting."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Optional, Tuple

if TYPE_CHECKING:
    import flowgate


def chain(
    *stages: Tuple[str, str],
    prefetch: int = 10,
    retry: Optional[str] = None,
    extra: str = "",
    watermark: Optional[str] = None,
    prefix: str = "",
) -> str:
    """A chain ``in → s1 → s2 → … → sink`` on exchange ``ex``: one stage per
    ``(handler, stage options)``; stage ``i`` consumes ``q<i>`` and
    publishes ``hop<i>``. Every queue dead-letters to ``<queue>.dlq``.
    ``prefix`` prefixes every name (``<prefix>.q1``)."""
    p = f"{prefix}." if prefix else ""
    text = f'[http]\nbind = ""\n[[exchanges]]\nname = "{p}ex"\n' + extra
    keys = ["in"] + [f"hop{i}" for i in range(1, len(stages) + 1)]
    names = [f"{p}q{i}" for i in range(1, len(stages) + 1)] + [f"{p}sink"]
    for i, (name, key) in enumerate(zip(names, keys)):
        text += (
            f'[[queues]]\nname = "{name}"\n'
            f'bindings = [{{ exchange = "{p}ex", routing_key = "{key}" }}]\ndead_letter = true\n'
        )
        if watermark and i == 0:
            text += f"watermark = {watermark}\n"
    for i, (handler, options) in enumerate(stages, start=1):
        text += (
            f'[[stages]]\nname = "s{i}"\nqueue = "{p}q{i}"\nhandler = "{handler}"\n'
            f"prefetch = {prefetch}\n"
            f'output = {{ exchange = "{p}ex", routing_key = "hop{i}" }}\n{options}\n'
        )
        if retry:
            text += f"retry = {retry}\n"
    return text


def broker_counts(queue: str) -> Tuple[int, int]:
    """``(ready, unacked)`` of ``queue`` as the broker itself counts them.

    The broker's figures trail its state by a moment (a second or two on a
    loaded machine): wait for a count with :func:`until`, never read one
    once."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == queue:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {queue} not found")


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Wait until ``check()`` holds (polling; fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def counts(queue: str) -> Tuple[int, int]:
    """:func:`broker_counts` off the event loop."""
    return await asyncio.to_thread(broker_counts, queue)


def metric(app: flowgate.App, name: str, stage: str) -> float:
    """One stage's value of an engine metric (``flowgate_…_total``)."""
    prefix = f'{name}{{stage="{stage}"}} '
    for line in app.metrics().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0
