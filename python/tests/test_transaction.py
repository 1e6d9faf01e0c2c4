"""Transactional handlers (issue 27): a ``def f(message, tx)`` whose SQL
runs in the PostgreSQL transaction of flowgate's inbox, so its writes, the
inbox row and its outputs commit together; a redelivery of a committed
message is acked without calling the handler; a failure rolls the writes
back. Each test has a database of its own on the local server
(``FLOWGATE_TEST_PG_URL``, as the Rust tests)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from typing import Iterator, List

import pytest
from support import chain, until

import flowgate
from flowgate.testing import TestPipeline

PG_ADMIN = os.environ.get(
    "FLOWGATE_TEST_PG_URL", "postgres://postgres:postgres@127.0.0.1:5432/postgres"
)


def _psql(url: str, sql: str) -> str:
    return subprocess.run(
        ["psql", url, "-Atc", sql], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


@pytest.fixture
def database() -> Iterator[str]:
    name = f"fgpytest_{uuid.uuid4().hex[:12]}"
    _psql(PG_ADMIN, f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    _psql(url, "CREATE TABLE effects (message_id text NOT NULL, body text NOT NULL)")
    try:
        yield url
    finally:
        _psql(PG_ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _app(url: str) -> flowgate.App:
    return flowgate.App.from_toml(
        chain(
            ("write", ""),
            extra=f'[postgres]\nurl = "{url}"\nmigrate_on_start = true\n',
        )
    )


async def _scalar(url: str, sql: str) -> str:
    return await asyncio.to_thread(_psql, url, sql)


async def test_the_handlers_sql_commits_with_the_inbox_row_and_a_repeat_is_absorbed(
    database: str,
) -> None:
    app = _app(database)
    calls: List[str] = []

    @app.tx_handler("write")
    def write(msg: flowgate.Message, tx: flowgate.Transaction) -> flowgate.Output:
        calls.append(msg.message_id or "")
        tx.execute(
            "INSERT INTO effects (message_id, body) VALUES ($1, $2)",
            msg.message_id,
            msg.body.decode(),
        )
        # Its own write is visible in its transaction.
        assert tx.fetch(
            "SELECT count(*), max(body) FROM effects WHERE message_id = $1", msg.message_id
        ) == [(1, msg.body.decode())]
        return flowgate.Output(msg.body)

    ids = [f"m-{i}" for i in range(50)]
    async with TestPipeline(app) as p:
        await p.publish_many(ids, b"paid")

        async def committed() -> bool:
            return await _scalar(database, "SELECT count(*) FROM flowgate_inbox") == "50"

        await until("the first copies are committed", committed)
        # The same ids again: what a redelivery after a crash past the
        # commit looks like to the stage.
        await p.publish_many(ids, b"paid")
        got = await p.collect("sink", 100, timeout=10.0)
    assert sorted(calls) == sorted(ids), "the handler ran once per id"
    assert await _scalar(database, "SELECT count(*), count(DISTINCT message_id) FROM effects") == (
        "50|50"
    ), "one effect row per id"
    assert len(got) == 50, "one output per id"
    assert len({g[0] for g in got}) == 50
    assert await _scalar(database, "SELECT count(*) FROM flowgate_outbox") == "0", "all relayed"


async def test_a_failed_handler_rolls_its_writes_back(database: str) -> None:
    app = _app(database)

    @app.tx_handler("write")
    def write(msg: flowgate.Message, tx: flowgate.Transaction) -> None:
        tx.execute(
            "INSERT INTO effects (message_id, body) VALUES ($1, $2)",
            msg.message_id,
            msg.body.decode(),
        )
        if (msg.message_id or "").startswith("bad"):
            raise flowgate.DeadLetter("refused")

    ids = [f"{'bad' if i % 2 else 'ok'}-{i}" for i in range(10)]
    async with TestPipeline(app) as p:
        await p.publish_many(ids, b"x")
        dead = await p.collect(p.dead_letter_queue("q1"), 5)
        assert len(dead) == 5
        await p.collect("sink", 5)
    assert await _scalar(
        database, "SELECT string_agg(message_id, ',' ORDER BY message_id) FROM effects"
    ) == ("ok-0,ok-2,ok-4,ok-6,ok-8"), "no write of a failed handling stays"
    assert (
        await _scalar(database, "SELECT count(*) FROM flowgate_inbox WHERE message_id LIKE 'bad%'")
        == "0"
    )


async def test_a_transaction_kept_past_its_handler_refuses_sql(database: str) -> None:
    app = _app(database)
    kept: List[flowgate.Transaction] = []

    @app.tx_handler("write")
    def write(msg: flowgate.Message, tx: flowgate.Transaction) -> None:
        kept.append(tx)

    async with TestPipeline(app) as p:
        await p.publish("m-1", b"x")

        async def handled() -> bool:
            return await _scalar(database, "SELECT count(*) FROM flowgate_inbox") == "1"

        await until("handled", handled)
    with pytest.raises(RuntimeError, match="transaction is over"):
        kept[0].execute("SELECT 1")


def test_an_async_transactional_handler_is_refused() -> None:
    app = flowgate.App.from_toml('[http]\nbind = ""\n')
    with pytest.raises(TypeError):

        @app.tx_handler("write")
        async def write(msg: flowgate.Message, tx: flowgate.Transaction) -> None:
            pass
