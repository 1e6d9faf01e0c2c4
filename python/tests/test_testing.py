"""flowgate.testing without a broker: synthetic messages, the engine's
judgement of what a handler returned or raised."""

from __future__ import annotations

import datetime
from typing import Any, List

import pytest

import flowgate
from flowgate.testing import message, run_batch, run_handler, run_handler_async


def test_a_message_reads_body_text_json_headers_and_properties() -> None:
    m = message(
        '{"sku": "A1"}',
        message_id="o-1",
        headers={"tenant": "acme", "n": 3, "ok": True, "nested": {"a": [1, "b"]}},
        content_type="application/json",
        correlation_id="c-9",
        routing_key="order.created",
        stage="reserve",
        attempt=2,
    )
    assert m.body == b'{"sku": "A1"}'
    assert m.text() == '{"sku": "A1"}'
    assert m.json() == {"sku": "A1"}
    assert m.headers["tenant"] == "acme" and m.header("n") == 3 and m.header("ok") is True
    assert m.header("nested") == {"a": [1, "b"]}
    assert m.header("missing", "d") == "d"
    assert (m.message_id, m.content_type, m.correlation_id) == ("o-1", "application/json", "c-9")
    assert m.properties["message_id"] == "o-1"
    assert (m.attempt, m.stage, m.routing_key, m.redelivered) == (
        2,
        "reserve",
        "order.created",
        False,
    )
    assert m.headers[flowgate.headers.ATTEMPT] == 2
    with pytest.raises(UnicodeDecodeError):
        message(b"\xff").text()
    assert message(b"\xff").text(errors="replace") == "\ufffd"


def test_outputs_start_from_the_input_and_go_to_the_stage_output() -> None:
    def h(msg: flowgate.Message) -> List[flowgate.Output]:
        return [
            flowgate.Output(msg.body),
            flowgate.Output(
                "x",
                exchange="audit",
                routing_key="k",
                message_id="o-1.a",
                headers={"extra": 1.5},
                content_type="text/plain",
            ),
        ]

    o = run_handler(
        h,
        message(b"in", message_id="o-1", headers={"tenant": "acme"}),
        output=("shop", "order.reserved"),
    )
    assert o.kind == "ack"
    first, second = o.outputs
    assert (first.exchange, first.routing_key, first.body) == ("shop", "order.reserved", b"in")
    assert first.message_id == "o-1" and first.headers == {"tenant": "acme"}
    assert (second.exchange, second.routing_key, second.message_id) == ("audit", "k", "o-1.a")
    assert second.headers == {"tenant": "acme", "extra": 1.5}
    assert second.properties["content_type"] == "text/plain"


def test_what_a_handler_raises_or_returns_is_judged_as_the_engine_judges_it() -> None:
    msg = message(b"x", message_id="o-1")

    def raises(e: BaseException) -> Any:
        def h(_: flowgate.Message) -> None:
            raise e

        return h

    o = run_handler(raises(flowgate.Retry("busy", after=datetime.timedelta(seconds=2))), msg)
    assert (o.kind, o.reason, o.after) == ("retry", "busy", 2.0)
    o = run_handler(raises(flowgate.Retry("busy")), msg)
    assert (o.kind, o.after) == ("retry", None)
    o = run_handler(raises(flowgate.DeadLetter("out-of-stock")), msg)
    assert (o.kind, o.reason) == ("dead_letter", "out-of-stock")
    o = run_handler(raises(KeyError("sku")), msg)
    assert (o.kind, o.reason) == ("error", "KeyError: 'sku'")
    assert run_handler(lambda m: None, msg).kind == "ack"
    o = run_handler(lambda m: "text", msg)
    assert o.kind == "invalid_output" and "returned a str" in (o.reason or "")
    # No destination anywhere: the output cannot be published.
    o = run_handler(lambda m: flowgate.Output(b"x"), msg)
    assert o.kind == "invalid_output" and "no exchange" in (o.reason or "")
    o = run_handler(
        lambda m: flowgate.Output(b"x", exchange="e", routing_key="k", message_id="i" * 300), msg
    )
    assert o.kind == "invalid_output" and "255" in (o.reason or "")


async def test_async_handlers_run_too() -> None:
    async def h(msg: flowgate.Message) -> flowgate.Output:
        return flowgate.Output(msg.body.upper(), exchange="e", routing_key="k")

    o = await run_handler_async(h, message(b"abc"))
    assert o.outputs[0].body == b"ABC"
    with pytest.raises(RuntimeError):
        run_handler(h, message(b"abc"))  # a loop is running: use run_handler_async


def test_run_handler_runs_async_handlers_outside_a_loop() -> None:
    async def h(msg: flowgate.Message) -> None:
        raise flowgate.DeadLetter("nope")

    assert run_handler(h, message(b"")).kind == "dead_letter"


def test_a_batch_gets_one_outcome_per_message() -> None:
    msgs = [message(str(i), message_id=f"m-{i}") for i in range(4)]

    def batch(ms: List[flowgate.Message]) -> List[Any]:
        return [
            None,
            flowgate.Output(ms[1].body, exchange="e", routing_key="k"),
            flowgate.Retry("later"),
        ]

    outs = run_batch(batch, msgs)
    assert [o.kind for o in outs] == ["ack", "ack", "retry", "retry"]
    assert outs[3].reason == flowgate._flowgate.MISSING_BATCH_RESULT
    outs = run_batch(lambda ms: 42, msgs)
    assert {o.kind for o in outs} == {"invalid_output"}

    def boom(ms: List[flowgate.Message]) -> None:
        raise flowgate.Retry("db down")

    assert {(o.kind, o.reason) for o in run_batch(boom, msgs)} == {("retry", "db down")}


def test_output_validates_what_it_is_given() -> None:
    with pytest.raises(TypeError):
        flowgate.Output(12)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        flowgate.Output(b"x", headers={"h": object()})
    with pytest.raises(ValueError):
        flowgate.Output(b"x", headers={"h" * 300: 1})
    with pytest.raises(ValueError):
        flowgate.Output(b"x", headers={"big": 2**70})
    assert flowgate.Output(bytearray(b"ab")).body == b"ab"
    assert flowgate.Output(memoryview(b"cd")).body == b"cd"
    with pytest.raises(ValueError):
        flowgate.Retry("x", after=-1)
