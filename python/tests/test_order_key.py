"""A Python key function (``@app.order_key``) orders an ``order_by`` stage:
each key's messages are handled in publish order, different keys in
parallel; no key (``None``, an exception) is a ``missing-key`` dead letter
under ``missing_key = "reject"``."""

from __future__ import annotations

import asyncio
import random
from typing import Dict, List, Optional

import pytest
from support import chain, until

import flowgate
from flowgate import headers, reasons
from flowgate.testing import TestPipeline

KEYS = 4
EVENTS = 30


async def test_a_python_key_keeps_each_keys_messages_in_order() -> None:
    app = flowgate.App.from_toml(
        chain(("ordered", 'order_by = "tenant"\nconcurrency = 8'), prefetch=40)
    )
    seen: Dict[str, List[int]] = {}
    keyed: List[str] = []

    @app.order_key("tenant")
    def tenant(msg: flowgate.Message) -> Optional[str]:
        keyed.append(msg.message_id or "")
        value = msg.headers.get("tenant")
        return value if isinstance(value, str) else None

    @app.handler("ordered")
    async def ordered(msg: flowgate.Message) -> None:
        # Random work: without lanes a key's later message would overtake.
        await asyncio.sleep(random.uniform(0, 0.005))
        key, seq = msg.text().split(":")
        seen.setdefault(key, []).append(int(seq))

    async with TestPipeline(app) as p:
        for seq in range(EVENTS):
            for k in range(KEYS):
                await p.publish(f"t{k}-{seq}", f"t{k}:{seq}", headers={"tenant": f"t{k}"})

        async def all_handled() -> bool:
            return sum(len(v) for v in seen.values()) >= KEYS * EVENTS

        await until("every message handled", all_handled, timeout=60)
        assert sorted(seen) == [f"t{k}" for k in range(KEYS)]
        for key, got in seen.items():
            assert got == list(range(EVENTS)), f"{key} out of order: {got}"
        assert len(keyed) == KEYS * EVENTS, "the key function runs once per delivery"


async def test_no_key_or_a_raising_key_function_dead_letters_as_missing_key() -> None:
    app = flowgate.App.from_toml(chain(("ordered", 'order_by = "tenant"\nmissing_key = "reject"')))
    handled: List[str] = []

    @app.order_key("tenant")
    def tenant(msg: flowgate.Message) -> Optional[str]:
        if msg.message_id == "boom":
            raise RuntimeError("no tenant service")
        value = msg.headers.get("tenant")
        return value if isinstance(value, str) else None

    @app.handler("ordered")
    def ordered(msg: flowgate.Message) -> None:
        handled.append(msg.message_id or "")

    async with TestPipeline(app) as p:
        await p.publish("keyed", b"x", headers={"tenant": "t1"})
        await p.publish("keyless", b"x")
        await p.publish("boom", b"x", headers={"tenant": "t1"})
        dead = await p.collect(p.dead_letter_queue("q1"), 2)
        assert sorted(mid for mid, _ in dead) == ["boom", "keyless"]
        assert all(h[headers.REASON] == reasons.MISSING_KEY for _, h in dead)

        async def keyed_handled() -> bool:
            return handled == ["keyed"]

        await until("the keyed message handled", keyed_handled)


def test_an_order_key_is_a_plain_function_registered_once() -> None:
    app = flowgate.App.from_toml('[http]\nbind = ""\n')

    async def not_plain(msg: flowgate.Message) -> Optional[str]:
        return None

    with pytest.raises(TypeError):
        app.order_key("k")(not_plain)  # type: ignore[type-var]
    app.order_key("k")(lambda msg: None)
    with pytest.raises(ValueError):
        app.order_key("k")(lambda msg: None)


async def test_an_unregistered_key_function_fails_the_start_naming_the_key() -> None:
    app = flowgate.App.from_toml(chain(("ordered", 'order_by = "nobody"')))

    @app.handler("ordered")
    def ordered(msg: flowgate.Message) -> None:
        return None

    with pytest.raises(flowgate.ConfigError) as e:
        async with TestPipeline(app):
            pass
    assert e.value.key == "stages[0].order_by", e.value
