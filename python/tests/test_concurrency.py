"""A stage's concurrency bounds running Python handlers; a slow plain def
handler does not delay another stage's acks; handler log records carry the
message id and stage."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Set, Tuple

import pytest
from support import chain, metric, until

import flowgate
from flowgate import _flowgate
from flowgate.testing import TestPipeline, unique

TWO_QUEUES = """
[http]
bind = ""
[[exchanges]]
name = "ex"
[[queues]]
name = "slow"
bindings = [{ exchange = "ex", routing_key = "slow" }]
[[queues]]
name = "fast"
bindings = [{ exchange = "ex", routing_key = "fast" }]
[[queues]]
name = "sink"
bindings = [{ exchange = "ex", routing_key = "done" }]
[[stages]]
name = "slow"
queue = "slow"
handler = "slow"
concurrency = 1
output = { exchange = "ex", routing_key = "done" }
[[stages]]
name = "fast"
queue = "fast"
handler = "fast"
output = { exchange = "ex", routing_key = "done" }
"""


@pytest.mark.parametrize("kind", ["async", "plain"])
async def test_concurrency_3_runs_at_most_3_handlers_at_once(kind: str) -> None:
    app = flowgate.App.from_toml(
        '[http]\nbind = ""\n[[exchanges]]\nname = "ex"\n'
        '[[queues]]\nname = "q"\nbindings = [{ exchange = "ex", routing_key = "in" }]\n'
        '[[queues]]\nname = "sink"\nbindings = [{ exchange = "ex", routing_key = "out" }]\n'
        '[[stages]]\nname = "s"\nqueue = "q"\nhandler = "h"\nprefetch = 20\nconcurrency = 3\n'
        'output = { exchange = "ex", routing_key = "out" }\n'
    )
    running, peak = 0, 0
    lock = threading.Lock()
    # Forced overlap: each handler waits until three run together (or a
    # fourth would have to join them to fill the barrier).
    barrier_async = asyncio.Barrier(3) if hasattr(asyncio, "Barrier") else None
    barrier_sync = threading.Barrier(3)

    def enter() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)

    def leave() -> None:
        nonlocal running
        with lock:
            running -= 1

    if kind == "async":
        assert barrier_async is not None, "needs Python 3.11"

        @app.handler("h")
        async def h_async(msg: flowgate.Message) -> flowgate.Output:
            enter()
            try:
                await asyncio.wait_for(barrier_async.wait(), 10)
                await asyncio.sleep(0.02)
            finally:
                leave()
            return flowgate.Output(msg.body)

    else:

        @app.handler("h")
        def h_plain(msg: flowgate.Message) -> flowgate.Output:
            enter()
            try:
                barrier_sync.wait(10)
                time.sleep(0.02)
            finally:
                leave()
            return flowgate.Output(msg.body)

    async with TestPipeline(app) as p:
        ids = [f"m-{i}" for i in range(12)]
        await p.publish_many(ids, b"x")
        (await p.account("sink", ids)).assert_exactly_once()
    assert peak == 3, f"at most 3 at once, and 3 did overlap; saw {peak}"


async def test_a_plain_handler_sleeping_5s_does_not_delay_another_stages_acks() -> None:
    app = flowgate.App.from_toml(TWO_QUEUES)
    slow_started, slow_done = threading.Event(), threading.Event()

    @app.handler("slow")
    def slow(msg: flowgate.Message) -> flowgate.Output:
        slow_started.set()
        time.sleep(5)
        slow_done.set()
        return flowgate.Output(msg.body)

    @app.handler("fast")
    async def fast(msg: flowgate.Message) -> flowgate.Output:
        return flowgate.Output(msg.body)

    async with TestPipeline(app) as p:
        await p.publish("slow-1", b"x", exchange="ex", routing_key="slow")
        await asyncio.to_thread(slow_started.wait, 10)
        started = time.monotonic()
        ids = [f"fast-{i}" for i in range(20)]
        await p.publish_many(ids, b"x", exchange="ex", routing_key="fast")
        # The other stage's deliveries are all handled, their outputs
        # confirmed (they are in the sink) and acked (the engine's count)
        # while the slow one still sleeps.
        got = await p.collect("sink", len(ids), 20)
        await until("the fast stage acked everything", lambda: _acked(app, "fast", len(ids)), 20)
        assert not slow_done.is_set(), (
            f"the fast stage's acks waited for the slow handler ({time.monotonic() - started:.1f}s)"
        )
        assert sorted(mid for mid, _ in got) == sorted(ids)
        assert metric(app, "flowgate_messages_acked_total", "slow") == 0
        acc = await p.account("sink", ["slow-1"], timeout=30)
        acc.assert_exactly_once()


async def _acked(app: flowgate.App, stage: str, n: int) -> bool:
    return metric(app, "flowgate_messages_acked_total", stage) >= n


async def test_log_records_of_handlers_carry_message_id_and_stage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = flowgate.App.from_toml(TWO_QUEUES)
    log = logging.getLogger("shop")

    @app.handler("slow")
    def slow(msg: flowgate.Message) -> flowgate.Output:
        log.warning("plain handler")
        return flowgate.Output(msg.body)

    @app.handler("fast")
    async def fast(msg: flowgate.Message) -> flowgate.Output:
        await asyncio.sleep(0)  # interleaved with other tasks, still its own
        log.warning("async handler")
        return flowgate.Output(msg.body)

    with caplog.at_level(logging.WARNING, logger="shop"):
        async with TestPipeline(app) as p:
            await p.publish("s-1", b"x", exchange="ex", routing_key="slow")
            await p.publish_many(["f-1", "f-2"], b"x", exchange="ex", routing_key="fast")
            (await p.account("sink", ["s-1", "f-1", "f-2"])).assert_exactly_once()
        log.warning("outside")
    seen: Set[Tuple[str, object, object]] = {
        (r.getMessage(), getattr(r, "stage", "?"), getattr(r, "message_id", "?"))
        for r in caplog.records
        if r.name == "shop"
    }
    assert seen == {
        ("plain handler", "slow", "s-1"),
        ("async handler", "fast", "f-1"),
        ("async handler", "fast", "f-2"),
        ("outside", None, None),
    }


async def test_serve_runs_until_asked_to_stop() -> None:
    prefix = unique("serve")
    app = flowgate.App.from_toml(chain(("h", ""), prefix=prefix))
    app.handler("h")(lambda m: flowgate.Output(m.body))
    cleanup = _flowgate.Cleanup(app.config)
    try:
        serving = asyncio.create_task(app.serve())
        await until("serving", lambda: _running(app))
        assert await app.publish(f"{prefix}.ex", "in", b"x", message_id="m-1") == "confirmed"
        await until("handled", lambda: _acked(app, "s1", 1))
        app.request_stop()
        await asyncio.wait_for(serving, 30)
        assert not app.running
    finally:
        await asyncio.to_thread(cleanup.close)


async def _running(app: flowgate.App) -> bool:
    return app.running
