"""`@app.batch_handler`: one call per batch, one result per message."""

from __future__ import annotations

from typing import Any, List

from support import chain

import flowgate
from flowgate import headers
from flowgate.testing import TestPipeline


async def test_a_batch_handler_gets_lists_and_judges_each_message_alone() -> None:
    app = flowgate.App.from_toml(
        chain(("store", 'batch = { size = 10, timeout = "200ms" }'), prefetch=20)
    )
    sizes: List[int] = []

    @app.batch_handler("store")
    async def store(msgs: List[flowgate.Message]) -> List[Any]:
        sizes.append(len(msgs))
        out: List[Any] = []
        for m in msgs:
            n = int((m.message_id or "m-0")[2:])
            out.append(flowgate.DeadLetter("odd") if n % 2 else flowgate.Output(m.body))
        return out

    async with TestPipeline(app) as p:
        ids = [f"m-{i}" for i in range(20)]
        await p.publish_many(ids, b"x")
        even = [i for i in ids if int(i[2:]) % 2 == 0]
        odd = [i for i in ids if int(i[2:]) % 2]
        (await p.account("sink", even)).assert_exactly_once()
        dead = await p.collect(p.dead_letter_queue("q1"), len(odd))
        assert sorted(d[0] for d in dead) == sorted(odd)
        assert {d[1][headers.REASON] for d in dead} == {"odd"}
    assert max(sizes) > 1, f"batches, not single messages: {sizes}"
    assert sum(sizes) == 20
