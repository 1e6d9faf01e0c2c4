"""A TCP proxy between the engine and the broker that can hold confirms.

Frames from the broker to the client are parsed (AMQP 0-9-1: type, channel,
size, payload, frame end); while ``holding``, every ``basic.ack`` method
frame (class 60, method 80 — a publisher confirm) is kept back instead of
forwarded, everything else passes. ``release()`` forwards what was kept,
in order, and stops holding. The client's bytes pass untouched.
"""

from __future__ import annotations

import asyncio
import struct
from typing import List, Optional, Tuple

FRAME_METHOD = 1
FRAME_END = 0xCE
BASIC_ACK = (60, 80)


class ConfirmHoldingProxy:
    def __init__(self, upstream: Tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.upstream = upstream
        self.holding = False
        self.held = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._held: List[Tuple[asyncio.StreamWriter, bytes]] = []
        self._writers: List[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/%2f"

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        for writer, frame in self._held:
            writer.write(frame)
        self._held.clear()

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        br, bw = await asyncio.open_connection(*self.upstream)
        self._writers += [cw, bw]
        await asyncio.gather(self._pipe(cr, bw), self._frames(br, cw), return_exceptions=True)
        cw.close()
        bw.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    async def _frames(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            header = await r.readexactly(7)
            kind, _channel, size = struct.unpack(">BHI", header)
            rest = await r.readexactly(size + 1)
            assert rest[-1] == FRAME_END, "lost frame sync"
            frame = header + rest
            if (
                self.holding
                and kind == FRAME_METHOD
                and struct.unpack(">HH", rest[:4]) == BASIC_ACK
            ):
                self._held.append((w, frame))
                self.held += 1
                continue
            w.write(frame)
            await w.drain()
