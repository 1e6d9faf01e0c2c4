"""The two forwarding stages of the Python bench, in one of four ways.

    python stages.py VARIANT PREFIX [URL]

VARIANT is ``flowgate-python`` (flowgate with the Python handler below),
``flowgate-native`` (flowgate's built-in ``forward``), ``faststream``
(FastStream's RabbitMQ broker) or ``aio-pika`` (written as the article
writes its worker). Each consumes ``PREFIX.s1`` → publishes ``hop1`` and
``PREFIX.s2`` → ``hop2`` on the topic exchange ``PREFIX.ex``, prefetch 50,
every output persistent, ``mandatory`` and confirmed before its input is
acked. The topology is declared by the bench (``bench.py``). Prints
``ready`` once both stages consume; runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

PREFETCH = 50


async def forward(body: bytes) -> bytes:
    """The trivial forwarding handler, written once for every variant."""
    return body


def flowgate_config(prefix: str, url: str, handler: str) -> str:
    stages = ""
    for i in (1, 2):
        stages += f"""
[[stages]]
name = "s{i}"
queue = "{prefix}.s{i}"
handler = "{handler}"
prefetch = {PREFETCH}
concurrency = 8
output = {{ exchange = "{prefix}.ex", routing_key = "hop{i}" }}
"""
    return bench_topology(prefix, url) + stages


def bench_topology(prefix: str, url: str) -> str:
    """The bench's topology (the Rust bench's chain: s1 → s2 → sink)."""
    text = f"""
[amqp]
url = "{url}"
[http]
bind = ""
[[exchanges]]
name = "{prefix}.ex"
type = "topic"
"""
    for name, key in (("s1", "in"), ("s2", "hop1"), ("sink", "hop2")):
        text += f"""
[[queues]]
name = "{prefix}.{name}"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "{key}" }}]
dead_letter = true
"""
    return text


async def run_flowgate(prefix: str, url: str, python: bool) -> None:
    import flowgate

    app = flowgate.App.from_toml(flowgate_config(prefix, url, "fwd" if python else "forward"))

    @app.handler("fwd")
    async def fwd(msg: flowgate.Message) -> flowgate.Output:
        return flowgate.Output(await forward(msg.body))

    async with app:
        print("ready", flush=True)
        await wait_for_sigterm()


async def run_faststream(prefix: str, url: str) -> None:
    from faststream.rabbit import (
        Channel,
        ExchangeType,
        RabbitBroker,
        RabbitExchange,
        RabbitMessage,
        RabbitQueue,
    )

    broker = RabbitBroker(url, logger=None, default_channel=Channel(prefetch_count=PREFETCH))
    exchange = RabbitExchange(f"{prefix}.ex", type=ExchangeType.TOPIC, declare=False)

    def stage(i: int) -> None:
        @broker.subscriber(RabbitQueue(f"{prefix}.s{i}", declare=False))
        async def handle(msg: RabbitMessage) -> None:
            await broker.publish(
                await forward(msg.body),
                exchange=exchange,
                routing_key=f"hop{i}",
                headers=msg.headers,
                message_id=msg.message_id,
                persist=True,
                mandatory=True,
            )

    stage(1)
    stage(2)
    await broker.start()
    print("ready", flush=True)
    await wait_for_sigterm()
    await broker.stop()


async def run_aio_pika(prefix: str, url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect_robust(url)

    async def stage(i: int) -> None:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=PREFETCH)
        exchange = await channel.get_exchange(f"{prefix}.ex")
        queue = await channel.get_queue(f"{prefix}.s{i}")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                await exchange.publish(
                    aio_pika.Message(
                        body=await forward(message.body),
                        headers=message.headers,
                        message_id=message.message_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=f"hop{i}",
                    mandatory=True,
                )

        await queue.consume(on_message)

    await stage(1)
    await stage(2)
    print("ready", flush=True)
    await wait_for_sigterm()
    await connection.close()


async def wait_for_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()


def main() -> None:
    variant, prefix = sys.argv[1], sys.argv[2]
    url = sys.argv[3] if len(sys.argv) > 3 else "amqp://guest:guest@127.0.0.1:5672/%2f"
    logging.basicConfig(level=logging.WARNING)
    runners = {
        "flowgate-python": lambda: run_flowgate(prefix, url, python=True),
        "flowgate-native": lambda: run_flowgate(prefix, url, python=False),
        "faststream": lambda: run_faststream(prefix, url),
        "aio-pika": lambda: run_aio_pika(prefix, url),
    }
    asyncio.run(runners[variant]())


if __name__ == "__main__":
    main()
