"""asyncpg through pgmux (run by tests/drivers.rs).

asyncpg prepares every query as a named statement and caches it per
connection (statement_cache_size left at its default: that is the point),
so pgmux must carry those statements across the server connections of a
pool smaller than the number of clients. CLIENTS connections run
ITERATIONS rounds each of: fetchrow, committed and rolled-back
transactions, a failed transaction, an explicit conn.prepare() statement
reused across transactions, executemany, copy_records_to_table, fetch.

Connection from PGMUX_HOST/PORT/USER/PASSWORD/DB. Table items exists (see
tests/drivers.rs). Prints "OK rows=N pids=K" and exits 0 on success; any
failed assertion or driver error exits non-zero.
"""

import asyncio
import os
import sys
import traceback

import asyncpg

CLIENTS = 8
ITERATIONS = 25
BATCH = 5
INSERT = "INSERT INTO items (client, n, label) VALUES ($1, $2, $3)"
COUNT = "SELECT count(*) FROM items WHERE client = $1"


async def connect():
    e = os.environ
    return await asyncpg.connect(host=e["PGMUX_HOST"], port=int(e["PGMUX_PORT"]), user=e["PGMUX_USER"],
                                 password=e["PGMUX_PASSWORD"], database=e["PGMUX_DB"], timeout=10)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def run_client(client, pids):
    conn = await connect()
    seen = set()
    expected = 0
    try:
        # One explicit statement, reused in every round (and transaction).
        label_of = await conn.prepare("SELECT label FROM items WHERE client = $1 AND n = $2")
        for i in range(ITERATIONS):
            row = await conn.fetchrow("SELECT $1::int + $2::int AS total, $3::text || '!' AS text, pg_backend_pid() AS pid",
                                      client, i, f"c{client}")
            check((row["total"], row["text"]) == (client + i, f"c{client}!"), f"client {client} fetchrow got {row}")
            seen.add(row["pid"])

            # Committed transaction; the prepared statement sees the row.
            async with conn.transaction():
                await conn.execute(INSERT, client, i, f"row {i}")
                expected += 1
                check(await label_of.fetchval(client, i) == f"row {i}", f"client {client}: row {i} in its transaction")
            check(await conn.fetchval(COUNT, client) == expected, f"client {client}: commit {i} lost")
            check(await label_of.fetchval(client, i) == f"row {i}", f"client {client}: row {i} after commit")

            # Rolled-back transaction.
            tr = conn.transaction()
            await tr.start()
            await conn.execute(INSERT, client, 100000 + i, "rollback")
            check(await label_of.fetchval(client, 100000 + i) == "rollback", f"client {client}: row invisible")
            await tr.rollback()
            check(await label_of.fetchval(client, 100000 + i) is None, f"client {client}: rollback {i} kept a row")

            # A failed transaction (server error mid-transaction) rolls back too.
            try:
                async with conn.transaction():
                    await conn.execute(INSERT, client, 200000 + i, "dup")
                    await conn.execute(INSERT, client, i, "dup")
                raise AssertionError(f"client {client}: duplicate key {i} accepted")
            except asyncpg.UniqueViolationError:
                pass
            check(await conn.fetchval(COUNT, client) == expected, f"client {client}: failed transaction {i} kept a row")

            if i % 5 == 0:
                # executemany and COPY, each a batch of rows.
                many = [(client, 300000 + i * BATCH + k, f"many {k}") for k in range(BATCH)]
                copy = [(client, 400000 + i * BATCH + k, f"copy {k}") for k in range(BATCH)]
                await conn.executemany(INSERT, many)
                copied = await conn.copy_records_to_table("items", records=copy, columns=["client", "n", "label"])
                check(copied == f"COPY {BATCH}", f"client {client}: copy said {copied!r}")
                expected += 2 * BATCH
                rows = await conn.fetch("SELECT client, n, label FROM items WHERE client = $1 AND n = ANY($2) ORDER BY n",
                                        client, [r[1] for r in many + copy])
                check([tuple(r) for r in rows] == many + copy, f"client {client}: batch rows {rows}")
            await asyncio.sleep(0)
        check(await conn.fetchval(COUNT, client) == expected, f"client {client}: final count")
    finally:
        await conn.close()
    pids.append(seen)
    return expected


async def main():
    pids = []
    rows = await asyncio.gather(*(run_client(c, pids) for c in range(CLIENTS)))
    check(any(len(s) > 1 for s in pids), f"no client ever moved to another server connection: {pids}")
    conn = await connect()
    total = await conn.fetchval("SELECT count(*) FROM items")
    await conn.close()
    check(total == sum(rows), f"items has {total} rows, clients committed {sum(rows)}")
    print(f"OK rows={total} pids={len(set().union(*pids))}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - report any failure plainly
        traceback.print_exc()
        print(f"FAIL asyncpg {asyncpg.__version__}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
