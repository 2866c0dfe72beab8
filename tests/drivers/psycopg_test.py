"""psycopg 3 through pgmux (run by tests/drivers.rs).

Every query is prepared (prepare_threshold=0), so each client holds named
statements (_pg3_N) that pgmux must carry across the server connections
of a pool smaller than the number of clients. CLIENTS AsyncConnections
run ITERATIONS rounds each of: parameterized select, committed insert,
rolled-back insert, failed transaction (unique violation), executemany.

Connection from PGMUX_HOST/PORT/USER/PASSWORD/DB. Tables items/accounts
exist (see tests/drivers.rs). Prints "OK rows=N pids=K" and exits 0 on
success; any failed assertion or driver error exits non-zero.
"""

import asyncio
import os
import sys
import traceback

import psycopg
from psycopg import errors

CLIENTS = 8
ITERATIONS = 25
BATCH = 5


def conninfo():
    e = os.environ
    return psycopg.conninfo.make_conninfo(
        host=e["PGMUX_HOST"], port=e["PGMUX_PORT"], user=e["PGMUX_USER"],
        password=e["PGMUX_PASSWORD"], dbname=e["PGMUX_DB"], connect_timeout=10)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def count(conn, client):
    cur = await conn.execute("SELECT count(*) FROM items WHERE client = %s", (client,))
    return (await cur.fetchone())[0]


async def run_client(client, pids):
    conn = await psycopg.AsyncConnection.connect(conninfo(), autocommit=True, prepare_threshold=0)
    seen = set()
    expected = 0
    async with conn:
        for i in range(ITERATIONS):
            # Parameterized select; the backend pid shows where it ran.
            cur = await conn.execute("SELECT %s::int + %s::int, %s::text || '!', pg_backend_pid()", (client, i, f"c{client}"))
            total, text, pid = await cur.fetchone()
            check((total, text) == (client + i, f"c{client}!"), f"client {client} select got {(total, text)}")
            seen.add(pid)

            # Committed transaction.
            async with conn.transaction():
                await conn.execute("INSERT INTO items (client, n, label) VALUES (%s, %s, %s)", (client, i, f"row {i}"))
                expected += 1
                check(await count(conn, client) == expected, f"client {client}: insert {i} not visible in its transaction")
            check(await count(conn, client) == expected, f"client {client}: commit {i} lost")

            # Rolled-back transaction.
            async with conn.transaction(force_rollback=True):
                await conn.execute("INSERT INTO items (client, n, label) VALUES (%s, %s, %s)", (client, 100000 + i, "rollback"))
                check(await count(conn, client) == expected + 1, f"client {client}: row {i} invisible before rollback")
            check(await count(conn, client) == expected, f"client {client}: rollback {i} kept a row")

            # A failed transaction (server error mid-transaction) rolls back too.
            try:
                async with conn.transaction():
                    await conn.execute("INSERT INTO items (client, n, label) VALUES (%s, %s, %s)", (client, 200000 + i, "dup"))
                    await conn.execute("INSERT INTO items (client, n, label) VALUES (%s, %s, %s)", (client, i, "dup"))
                raise AssertionError(f"client {client}: duplicate key {i} accepted")
            except errors.UniqueViolation:
                pass
            check(await count(conn, client) == expected, f"client {client}: failed transaction {i} kept a row")

            # executemany (pipelined by psycopg), every fifth round.
            if i % 5 == 0:
                rows = [(client, 300000 + i * BATCH + k, f"batch {k}") for k in range(BATCH)]
                async with conn.cursor() as cur:
                    await cur.executemany("INSERT INTO items (client, n, label) VALUES (%s, %s, %s)", rows)
                expected += BATCH
                cur = await conn.execute(
                    "SELECT array_agg(label ORDER BY n) FROM items WHERE client = %s AND n >= %s AND n < %s",
                    (client, 300000 + i * BATCH, 300000 + (i + 1) * BATCH))
                labels = (await cur.fetchone())[0]
                check(labels == [f"batch {k}" for k in range(BATCH)], f"client {client}: executemany got {labels}")

            # Interleave with the other clients.
            await asyncio.sleep(0)
        check(await count(conn, client) == expected, f"client {client}: final count")
        prepared = await conn.execute("SELECT %s::int", (1,))
        check((await prepared.fetchone())[0] == 1, "final select")
    pids.append(seen)
    return expected


async def main():
    pids = []
    rows = await asyncio.gather(*(run_client(c, pids) for c in range(CLIENTS)))
    all_pids = set().union(*pids)
    check(any(len(s) > 1 for s in pids), f"no client ever moved to another server connection: {pids}")
    async with await psycopg.AsyncConnection.connect(conninfo(), autocommit=True, prepare_threshold=0) as conn:
        cur = await conn.execute("SELECT count(*) FROM items")
        total = (await cur.fetchone())[0]
    check(total == sum(rows), f"items has {total} rows, clients committed {sum(rows)}")
    print(f"OK rows={total} pids={len(all_pids)}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - report any failure plainly
        traceback.print_exc()
        print(f"FAIL psycopg {psycopg.__version__}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
