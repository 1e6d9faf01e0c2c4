"""SIGTERM or Ctrl-C during `app.run()` drains: exit status 0, no traceback,
nothing lost (every message is in the sink or still in its queue, once)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
from support import chain, until

import flowgate
from flowgate.testing import TestPipeline, unique

APP = Path(__file__).parent / "apps" / "drain_app.py"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_mid_run_drains_with_nothing_lost(
    sig: signal.Signals, tmp_path: Path
) -> None:
    prefix = unique("drain")
    config = chain(("work", "concurrency = 4"), prefix=prefix)
    path = tmp_path / "flowgate.toml"
    path.write_text(config)
    # The test's own view of the same topology: publish, count, clean up.
    observer = flowgate.App.from_toml(config.split("[[stages]]")[0])
    async with TestPipeline(observer, rename=False) as p:
        q1, sink = f"{prefix}.q1", f"{prefix}.sink"
        ids = [f"m-{i}" for i in range(300)]
        await p.publish_many(ids, b"x" * 64, exchange=f"{prefix}.ex", routing_key="in")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(APP),
            str(path),
            stderr=asyncio.subprocess.PIPE,
            # Ctrl-C's run logs JSON lines: Python's records among the engine's.
            env={
                **os.environ,
                "RUST_LOG": "info",
                "FLOWGATE__LOG__FORMAT": "json" if sig == signal.SIGINT else "text",
            },
        )
        try:
            await until("the app is working", lambda: _has_arrived(p, sink, 40), 30)
            proc.send_signal(sig)
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
        text = stderr.decode()
        assert proc.returncode == 0, text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
        if sig == signal.SIGINT:
            lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            events = [(e.get("logger"), e.get("message")) for e in lines]
            assert ("flowgate", "SIGINT received") in events, text
            assert any(e.get("message") == "shutdown complete" for e in lines), text
            working = [e for e in lines if e.get("logger") == "shop"]
            assert working and all(e["stage"] == "s1" for e in working), text
            assert {e["message_id"] for e in working} <= set(ids), text
        else:
            assert f"{sig.name} received" in text, text
            assert "shutdown complete clean=true" in text, text
        # Nothing unacked left behind (the app is gone: its connection is
        # closed), nothing lost, nothing twice.
        in_q1 = await p.depth(q1)
        in_sink = await p.depth(sink)
        assert 0 < in_q1 < len(ids), "the signal came mid-run"
        got = await p.collect(sink, in_sink, 30) + await p.collect(q1, in_q1, 30)
        seen = Counter(mid for mid, _ in got)
        assert sorted(seen) == sorted(ids), "every message in the sink or still queued"
        assert set(seen.values()) == {1}, "none twice"


async def _has_arrived(p: TestPipeline, queue: str, n: int) -> bool:
    return await p.depth(queue) >= n
