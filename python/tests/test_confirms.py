"""Outputs are confirmed before the input is acked (a held confirm keeps
the input unacked, as the broker itself counts it)."""

from __future__ import annotations

import asyncio

from amqp_proxy import ConfirmHoldingProxy
from support import chain, counts, metric, until

import flowgate
from flowgate.testing import TestPipeline


async def test_the_input_stays_unacked_until_its_output_is_confirmed() -> None:
    proxy = ConfirmHoldingProxy()
    url = await proxy.start()
    # The publisher waits for the held confirm longer than the test holds it.
    app = flowgate.App.from_toml(
        chain(("hold", ""), extra='[publisher]\nconfirm_timeout = "60s"\n')
    )
    handled = asyncio.Event()

    @app.handler("hold")
    async def hold(msg: flowgate.Message) -> flowgate.Output:
        # From here on the broker's confirms stop at the proxy: the
        # output published after this returns is confirmed but unheard.
        proxy.hold()
        handled.set()
        return flowgate.Output(msg.body)

    try:
        async with TestPipeline(app, url=url) as p:
            q1, sink = p.name("q1"), p.name("sink")
            await p.publish("m-1", b"payload")
            await handled.wait()
            # The broker took the output (it sits in the sink queue) and
            # confirmed it (the proxy holds the confirm) ...
            await until("the output is in the sink", lambda: _ready_is(sink, 1))
            await until("the broker confirmed it", lambda: _true(proxy.held >= 1))
            # ... and the broker counts the input unacked while the confirm
            # is held, and still does a few seconds later (its counts trail
            # its state by a second or two).
            await until("the broker counts it unacked", lambda: _counts_are(q1, (0, 1)))
            await asyncio.sleep(3)
            assert await counts(q1) == (0, 1), "acked before its output was confirmed"
            assert metric(app, "flowgate_messages_acked_total", "s1") == 0
            proxy.release()
            await until("the input is acked once confirmed", lambda: _counts_are(q1, (0, 0)))
            assert metric(app, "flowgate_messages_acked_total", "s1") == 1
            acc = await p.account("sink", ["m-1"])
            acc.assert_exactly_once()
    finally:
        proxy.release()
        await proxy.close()


async def _true(v: bool) -> bool:
    return v


async def _ready_is(queue: str, n: int) -> bool:
    return (await counts(queue))[0] == n


async def _counts_are(queue: str, want: tuple[int, int]) -> bool:
    return await counts(queue) == want
