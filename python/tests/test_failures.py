"""Retry and exceptions walk the stage's ladder; DeadLetter carries its
reason header; a wrong return type dead-letters as invalid-output."""

from __future__ import annotations

from typing import Any, Dict, List

from support import chain

import flowgate
from flowgate import headers, reasons
from flowgate.testing import TestPipeline


def _x_death_queues(h: Dict[str, Any]) -> List[str]:
    return [d["queue"] for d in h.get("x-death", [])]


async def test_retry_walks_the_ladder_until_it_succeeds() -> None:
    app = flowgate.App.from_toml(
        chain(("flaky", ""), retry='{ max_attempts = 4, backoff = ["50ms", "100ms"] }')
    )
    attempts: List[int] = []

    @app.handler("flaky")
    async def flaky(msg: flowgate.Message) -> flowgate.Output:
        attempts.append(msg.attempt)
        if msg.attempt < 3:
            raise flowgate.Retry("stock service busy")
        return flowgate.Output(msg.body, headers={"attempt": msg.attempt})

    async with TestPipeline(app) as p:
        await p.publish("m-1", b"x")
        got = await p.collect("sink", 1)
        assert [g[0] for g in got] == ["m-1"]
        assert got[0][1]["attempt"] == 3
        assert attempts == [1, 2, 3]
        # Through the ladder's tiers: attempt 2 came back from tier 1, 3 from tier 2.
        assert _x_death_queues(got[0][1])[:2] == [
            f"{p.name('q1')}.retry.2",
            f"{p.name('q1')}.retry.1",
        ]
        assert await p.depth(p.dead_letter_queue("q1")) == 0


async def test_an_exception_retries_and_runs_out_as_max_attempts_with_the_error() -> None:
    app = flowgate.App.from_toml(
        chain(("broken", ""), retry='{ max_attempts = 3, backoff = ["50ms"] }')
    )
    attempts: List[int] = []

    @app.handler("broken")
    def broken(msg: flowgate.Message) -> None:
        attempts.append(msg.attempt)
        raise ValueError(f"no such sku {'A' * 5000}")

    async with TestPipeline(app) as p:
        await p.publish("m-1", b"x")
        [(mid, h)] = await p.collect(p.dead_letter_queue("q1"), 1)
        assert mid == "m-1"
        assert attempts == [1, 2, 3]
        assert h[headers.REASON] == reasons.MAX_ATTEMPTS
        assert h[headers.ATTEMPTS] == 3
        assert h[headers.ERROR].startswith("handler-error: ValueError: no such sku AAAA")
        # Bounded as the engine bounds errors (cut, with an ellipsis).
        assert h[headers.ERROR].endswith("…")
        assert len(h[headers.ERROR].encode()) <= _flowgate_max_error() + len("…".encode())


def _flowgate_max_error() -> int:
    from flowgate import _flowgate

    return int(_flowgate.MAX_ERROR_BYTES)


async def test_retry_after_takes_the_first_tier_at_least_that_long() -> None:
    app = flowgate.App.from_toml(
        chain(("later", ""), retry='{ max_attempts = 3, backoff = ["50ms", "300ms", "100ms"] }')
    )

    @app.handler("later")
    async def later(msg: flowgate.Message) -> flowgate.Output:
        if msg.attempt == 1:
            raise flowgate.Retry("locked", after=0.2)
        return flowgate.Output(msg.body)

    async with TestPipeline(app) as p:
        await p.publish("m-1", b"x")
        [(_, h)] = await p.collect("sink", 1)
        # 50ms is too short, 300ms is the first tier long enough (tier 2),
        # not the shorter-but-later 100ms one.
        assert _x_death_queues(h) == [f"{p.name('q1')}.retry.2"]


async def test_dead_letter_carries_its_reason_header() -> None:
    app = flowgate.App.from_toml(chain(("picky", "")))

    @app.handler("picky")
    async def picky(msg: flowgate.Message) -> None:
        raise flowgate.DeadLetter("out-of-stock")

    async with TestPipeline(app) as p:
        await p.publish("m-1", b"x")
        [(mid, h)] = await p.collect(p.dead_letter_queue("q1"), 1)
        assert mid == "m-1"
        assert h[headers.REASON] == "out-of-stock"
        assert h[headers.STAGE] == "s1"
        assert await p.depth("sink") == 0


async def test_a_wrong_return_type_dead_letters_as_invalid_output() -> None:
    app = flowgate.App.from_toml(chain(("wrong", "")))

    @app.handler("wrong")
    async def wrong(msg: flowgate.Message) -> Any:
        wrong: Dict[str, Any] = {"m-1": {"a": 1}, "m-2": ["not", "outputs"], "m-3": b"bytes"}
        return wrong[msg.message_id or ""]

    async with TestPipeline(app) as p:
        ids = ["m-1", "m-2", "m-3"]
        for i in ids:
            await p.publish(i, b"x")
        dead = await p.collect(p.dead_letter_queue("q1"), 3)
        assert sorted(d[0] for d in dead) == ids
        for _, h in dead:
            assert h[headers.REASON] == reasons.INVALID_OUTPUT
        errors = {d[0]: d[1][headers.ERROR] for d in dead}
        assert "returned a dict" in errors["m-1"]
        assert "item 0 of the returned list is a str" in errors["m-2"]
        assert "returned a bytes" in errors["m-3"]
        assert await p.depth("sink") == 0
