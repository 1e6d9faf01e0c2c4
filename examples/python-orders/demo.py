"""The order pipeline in Python, end to end on the local broker.

    python examples/python-orders/demo.py [--orders 3000] [--rate 500] [--concurrency 64]

Declares a uniquely named copy of ``examples/orders/config/orders.toml``,
runs reserve, pay and ship as Python handlers and the FastAPI gateway on a
free port, sends orders over HTTP at ``--rate`` (5x what payment takes, so
the gateway has to answer 503 + Retry-After), waits until every accepted
order is shipped or failed, prints the summary the Rust demo prints, and
removes what it declared. Exit status 1 if an accepted order has no final
status (lost).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flowgate
import httpx
import uvicorn
from flowgate.testing import TestPipeline

from gateway import create_gateway
from services import CONFIG, SECTION, Services

SKUS = ["sku-red", "sku-blue", "sku-green"]


async def drive(url: str, n: int, rate: float, concurrency: int) -> Dict[str, List[str]]:
    """Sends ``n`` orders at ``rate``/s with at most ``concurrency`` in
    flight: the ids accepted, and the refusals (by status).
    """
    out: Dict[str, List[str]] = {"accepted": [], "503": [], "other": []}
    gate = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async with httpx.AsyncClient(timeout=30) as http:

        async def one(i: int) -> None:
            async with gate:
                # A few orders for the scarce SKU (10 in stock): those
                # beyond its stock end dead-lettered `out-of-stock`.
                sku = "sku-limited" if random.random() < 0.02 else random.choice(SKUS)
                r = await http.post(
                    url,
                    json={
                        "customer_id": f"c-{i % 97}",
                        "items": [{"sku": sku, "qty": 1}],
                        "total": 9.5,
                    },
                )
            if r.status_code == 202:
                out["accepted"].append(r.json()["order_id"])
            elif r.status_code == 503:
                assert r.headers.get("retry-after"), "503 without Retry-After"
                out["503"].append(str(i))
            else:
                out["other"].append(f"{r.status_code}")

        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument(
        "--wait", type=float, default=60.0, help="give up after this long without progress"
    )
    args = ap.parse_args()

    # Listeners on free ports: several demos (and tests) may run at once.
    os.environ.setdefault("FLOWGATE__HTTP__BIND", "127.0.0.1:0")
    app = flowgate.App(CONFIG, section=SECTION)
    services = Services(app)
    pipeline = TestPipeline(app, prefix="pydemo")
    prefix = pipeline.prefix
    gateway = create_gateway(services, run=lambda: pipeline)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(gateway, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            return 1
        await asyncio.sleep(0.05)

    s = services.s
    print(f"flowgate for Python demo: the order pipeline, topology `{prefix}.*`\n")
    print(
        "  POST /orders ─▶ gateway ─order.created─▶ reserve ─order.reserved─▶ pay (throttled)"
        " ─order.paid─▶ ship ─order.shipped─▶ track"
    )
    print(
        f"\npayment provider: {s.payment_rate:g} charges/s, "
        f"{s.payment_latency * 1000:g}ms per call, "
        f"{s.payment_failure_rate:.0%} transient failures; the gateway answers 503 while a queue "
        "is above its watermark"
    )
    print(
        f"driving {args.orders} orders at {args.rate:g}/s through http://127.0.0.1:{port}/orders\n"
    )
    t0 = time.monotonic()
    sent = await drive(f"http://127.0.0.1:{port}/orders", args.orders, args.rate, args.concurrency)
    accepted = sent["accepted"]

    # Until every accepted order has a final status, or nothing moves.
    last, last_change = -1, time.monotonic()
    while True:
        done = sum(1 for o in accepted if services.statuses[o].state in ("shipped", "failed"))
        if done == len(accepted):
            break
        if done != last:
            last, last_change = done, time.monotonic()
        elif time.monotonic() - last_change > args.wait:
            break
        await asyncio.sleep(0.1)
    run_time = time.monotonic() - t0
    peaks = app.queue_peaks()

    final = [services.statuses[o] for o in accepted]
    shipped = [st for st in final if st.state == "shipped"]
    failed = [st for st in final if st.state == "failed"]
    lost = len(accepted) - len(shipped) - len(failed)
    by_reason: Dict[str, int] = {}
    for st in failed:
        by_reason[st.reason or "?"] = by_reason.get(st.reason or "?", 0) + 1
    lat = sorted((st.done_at_ms or 0) - st.created_at_ms for st in shipped)

    def row(label: str, value: object) -> None:
        print(f"  {label:<30}{value:>6}")

    row("orders sent", args.orders)
    row("accepted (202)", len(accepted))
    row("rejected 503 (Retry-After)", len(sent["503"]))
    if sent["other"]:
        row("other answers", len(sent["other"]))
    row("shipped", len(shipped))
    row("dead-lettered", len(failed))
    for reason, n in sorted(by_reason.items()):
        row(f"  {reason}", n)
    row("lost (no final status)", lost)
    if lat:
        print(f"  {'order→shipped p50':<30}{statistics.median(lat):>6.0f} ms")
        print(f"  {'order→shipped p99':<30}{lat[int(0.99 * (len(lat) - 1))]:>6.0f} ms")
    print(f"  {'send rate':<30}{args.rate:>6g} orders/s")
    print(f"  {'run time':<30}{run_time:>6.1f} s")
    row("payment throttle hits", services.provider.throttle_hits)
    print("  peak queue depth")
    for q, n in sorted(peaks.items()):
        print(f"    {q:<45}{n:>6}")

    server.should_exit = True
    await serving
    verdict = "every accepted order ended shipped or failed with a reason"
    print(
        f"\n{verdict if lost == 0 else f'{lost} accepted orders have no final status'}; "
        "topology removed."
    )
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
