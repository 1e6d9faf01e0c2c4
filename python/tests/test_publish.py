"""`app.publish` goes through the engine's ingress: Backpressure with
retry_after while a watermark or a broker alarm holds, PublishError for a
message that will never be taken."""

from __future__ import annotations

import asyncio
from typing import List

import pytest

import flowgate
from flowgate.testing import BrokerNode, TestPipeline

WATCHED = """
[http]
bind = ""
[depth]
interval = "100ms"
[ingress]
publish_timeout = "1s"
[[exchanges]]
name = "shop"
[[queues]]
name = "orders"
bindings = [{ exchange = "shop", routing_key = "order.created" }]
watermark = { high = 5, low = 2 }
"""


async def test_publish_is_confirmed_and_refused_with_retry_after_above_the_watermark() -> None:
    app = flowgate.App.from_toml(WATCHED)
    async with TestPipeline(app) as p:
        accepted: List[str] = []
        refusal = None
        for i in range(200):
            try:
                assert await app.publish(
                    p.name("shop"), "order.created", b"{}", message_id=f"o-{i}"
                ) == ("confirmed")
                accepted.append(f"o-{i}")
            except flowgate.Backpressure as e:
                refusal = e
                break
            await asyncio.sleep(0.01)
        assert refusal is not None, "never refused above the watermark"
        assert isinstance(refusal, flowgate.PublishError)
        assert (refusal.status, refusal.retry_after) == (503, 1)
        assert refusal.queue == p.name("orders")
        assert len(accepted) >= 5
        # It holds: still refused while the queue stays above `low`.
        with pytest.raises(flowgate.Backpressure):
            await app.publish(p.name("shop"), "order.created", b"{}", message_id="late")
        # Every accepted message is in the queue, once; draining it lets
        # publishes through again.
        (await p.account("orders", accepted)).assert_exactly_once()
        for _ in range(100):
            try:
                await app.publish(p.name("shop"), "order.created", b"{}", message_id="again")
                break
            except flowgate.Backpressure:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("still refused after the queue was drained")


async def test_a_route_no_queue_is_bound_to_is_a_publish_error_not_backpressure() -> None:
    app = flowgate.App.from_toml(WATCHED)
    async with TestPipeline(app) as p:
        with pytest.raises(flowgate.PublishError) as e:
            await app.publish(p.name("shop"), "order.nowhere", b"{}")
        assert not isinstance(e.value, flowgate.Backpressure)
        assert e.value.status == 404
        with pytest.raises(ValueError):
            await app.publish(p.name("shop"), "order.created", b"{}", message_id="x" * 300)


async def test_publish_raises_backpressure_while_a_broker_alarm_holds() -> None:
    node = await asyncio.to_thread(BrokerNode.start)
    try:
        app = flowgate.App.from_toml(WATCHED)
        async with TestPipeline(app, url=node.amqp_url) as p:
            assert await app.publish(
                p.name("shop"), "order.created", b"{}", message_id="before"
            ) == ("confirmed")
            await asyncio.to_thread(node.set_memory_alarm, True)
            with pytest.raises(flowgate.Backpressure) as e:
                await app.publish(p.name("shop"), "order.created", b"{}", message_id="during")
            assert e.value.retry_after == 1 and e.value.status == 503
            await asyncio.to_thread(node.set_memory_alarm, False)
            for _ in range(100):
                try:
                    await app.publish(p.name("shop"), "order.created", b"{}", message_id="after")
                    break
                except flowgate.Backpressure:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("still refused after the alarm cleared")
            got = {mid for mid, _ in await p.collect("orders", 3, 10)}
            assert {"before", "after"} <= got
    finally:
        await asyncio.to_thread(node.stop)
