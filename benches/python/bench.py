"""flowgate for Python against FastStream and aio-pika, in the same run.

    python benches/python/bench.py            # after `pip install ./python` and
                                              # benches/python/requirements.txt

The 3-hop pipeline of the Rust bench (source → s1 → s2 → sink; classic
durable queues, persistent 256-byte messages, prefetch 50, each output
confirmed before its input is acked) with a trivial forwarding handler
written once in Python (``stages.forward``), run four ways:

* ``flowgate-python`` — flowgate with that handler (``@app.handler``),
* ``faststream``      — FastStream's RabbitMQ broker (per-message logs off),
* ``aio-pika``        — aio-pika written as the article writes its worker,
* ``flowgate-native`` — flowgate's built-in ``forward`` (no Python).

The two stages run in a process of their own (``stages.py``), so the CPU
time is theirs (from ``/proc/<pid>/stat``); the source and the sink run
here (the Rust test kit's driver). Each variant runs ``RUNS`` times,
interleaved; the table shows medians. Environment: ``FLOWGATE_PY_BENCH_N``
(messages per run, default 20000), ``FLOWGATE_PY_BENCH_RUNS`` (default 3),
``FLOWGATE_PY_BENCH_VARIANTS`` (comma-separated subset).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flowgate
from flowgate import _flowgate
from flowgate.testing import unique

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stages import bench_topology  # noqa: E402

URL = os.environ.get("FLOWGATE_PY_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
N = int(os.environ.get("FLOWGATE_PY_BENCH_N", "20000"))
RUNS = int(os.environ.get("FLOWGATE_PY_BENCH_RUNS", "3"))
VARIANTS = os.environ.get(
    "FLOWGATE_PY_BENCH_VARIANTS", "flowgate-python,faststream,aio-pika,flowgate-native"
).split(",")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def declare(prefix: str) -> _flowgate.Config:
    """Declares the bench's topology (as the engine declares it) and returns it."""
    config = _flowgate.Config.from_toml(bench_topology(prefix, URL))

    async def run() -> None:
        app = flowgate.App.from_toml(bench_topology(prefix, URL))
        async with app:
            pass

    asyncio.run(run())
    return config


def one_run(variant: str) -> dict[str, float]:
    prefix = unique("pybench")
    config = declare(prefix)
    cleanup = _flowgate.Cleanup(config)
    log = open(Path(tempfile.gettempdir()) / f"flowgate-pybench-{variant}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "stages.py"), variant, prefix, URL],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{variant}: the stages did not start (see {log.name})")
        time.sleep(0.5)  # let every consumer's prefetch window open
        cpu0 = cpu_seconds(proc.pid)
        stats = _flowgate.drive(URL, f"{prefix}.ex", "in", f"{prefix}.sink", N, 256, 600.0)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        cleanup.close()
    received = stats["received"]
    return {
        "throughput": stats["throughput"],
        "p50": stats["p50_ms"],
        "p99": stats["p99_ms"],
        "cpu_us": cpu / max(received, 1) * 1e6,
        "lost": stats["sent"] - received,
    }


def main() -> None:
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for r in range(RUNS):
        for v in VARIANTS:
            res = one_run(v)
            results[v].append(res)
            print(
                f"run {r + 1}/{RUNS} {v:16} {res['throughput']:8.0f} msg/s "
                f"cpu {res['cpu_us']:6.0f} µs/msg lost {res['lost']:.0f}",
                file=sys.stderr,
                flush=True,
            )

    def med(v: str, k: str) -> float:
        return statistics.median(x[k] for x in results[v])

    print(
        f"\n3 hops, {N} persistent 256-byte messages, classic durable queues, prefetch 50, "
        f"confirms; stage process CPU; median of {RUNS} runs\n"
    )
    print("| stages | msg/s (runs' range) | p50 ms | p99 ms | CPU µs/msg | lost |")
    print("|---|---|---|---|---|---|")
    for v in VARIANTS:
        tps = [x["throughput"] for x in results[v]]
        print(
            f"| {v} | {med(v, 'throughput'):.0f} ({min(tps):.0f}–{max(tps):.0f}) "
            f"| {med(v, 'p50'):.1f} | {med(v, 'p99'):.1f} | {med(v, 'cpu_us'):.0f} "
            f"| {sum(x['lost'] for x in results[v]):.0f} |"
        )
    if "flowgate-python" in results:
        print()
        base = med("flowgate-python", "throughput")
        for other in ("faststream", "aio-pika", "flowgate-native"):
            if other in results:
                print(f"flowgate-python / {other}: {base / med(other, 'throughput'):.2f}×")


if __name__ == "__main__":
    main()
