"""Stale shared statements through pgmux, with psycopg 3 and asyncpg (run by
tests/stale_statements.rs).

Client A prepares a query (psycopg by itself after 5 executions; asyncpg
always), the schema changes straight on the server (PGMUX_DIRECT_PORT),
then new clients run the same text and must get the new shape; a type
dropped and created again must not leave "cache lookup failed"; two
search paths must not share a statement. Prints "OK" and exits 0.
"""

import asyncio
import os

import asyncpg
import psycopg

E = os.environ


def dsn(port, **extra):
    return psycopg.conninfo.make_conninfo(
        host=E["PGMUX_HOST"], port=port, user=E["PGMUX_USER"],
        password=E["PGMUX_PASSWORD"], dbname=E["PGMUX_DB"], **extra)


PGMUX = E["PGMUX_PORT"]
DIRECT = E["PGMUX_DIRECT_PORT"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def psycopg_checks():
    with psycopg.connect(dsn(DIRECT), autocommit=True) as d:
        d.execute("DROP TABLE IF EXISTS p3; CREATE TABLE p3 (id int, v text); INSERT INTO p3 VALUES (1, 'a')")
        d.execute("DROP TYPE IF EXISTS pmood; CREATE TYPE pmood AS ENUM ('ok')")
    sql = "SELECT * FROM p3 WHERE id = %s"
    with psycopg.connect(dsn(PGMUX), autocommit=True) as a:
        for _ in range(7):  # prepared by psycopg from the 6th on
            check(len(a.execute(sql, (1,)).fetchone()) == 2, "two columns")
        check(a.execute("SELECT %s::pmood::text", ("ok",)).fetchone()[0] == "ok", "enum")
        for _ in range(6):
            a.execute("SELECT %s::pmood::text", ("ok",))
    with psycopg.connect(dsn(DIRECT), autocommit=True) as d:
        d.execute("ALTER TABLE p3 ADD COLUMN note text DEFAULT 'x'")
        d.execute("BEGIN; DROP TYPE pmood; CREATE TYPE pmood AS ENUM ('ok', 'fine'); COMMIT")
    for _ in range(3):
        with psycopg.connect(dsn(PGMUX), autocommit=True) as b:
            for _ in range(7):
                row = b.execute(sql, (1,)).fetchone()
                check(row == (1, "a", "x"), f"fresh plan: {row}")
                got = b.execute("SELECT %s::pmood::text", ("fine",)).fetchone()[0]
                check(got == "fine", f"recreated type: {got}")
    # psycopg describes each execution: the first client goes on too.
    with psycopg.connect(dsn(PGMUX), autocommit=True) as a:
        check(len(a.execute(sql, (1,)).fetchone()) == 3, "three columns")


async def asyncpg_checks():
    d = await asyncpg.connect(host=E["PGMUX_HOST"], port=int(DIRECT), user=E["PGMUX_USER"],
                              password=E["PGMUX_PASSWORD"], database=E["PGMUX_DB"])
    await d.execute("DROP SCHEMA IF EXISTS ta CASCADE; DROP SCHEMA IF EXISTS tb CASCADE;"
                    "CREATE SCHEMA ta; CREATE SCHEMA tb;"
                    "CREATE TABLE ta.items (id int, a text); INSERT INTO ta.items VALUES (1, 'ta');"
                    "CREATE TABLE tb.items (id int, b int, c int); INSERT INTO tb.items VALUES (1, 2, 3);"
                    "DROP TABLE IF EXISTS q3; CREATE TABLE q3 (id int, v text); INSERT INTO q3 VALUES (1, 'a')")

    async def connect(**settings):
        return await asyncpg.connect(host=E["PGMUX_HOST"], port=int(PGMUX), user=E["PGMUX_USER"],
                                     password=E["PGMUX_PASSWORD"], database=E["PGMUX_DB"],
                                     server_settings=settings)
    ta, tb = await connect(search_path="ta"), await connect(search_path="tb")
    for _ in range(3):
        r = await ta.fetchrow("SELECT * FROM items WHERE id > $1", 0)
        check(tuple(r) == (1, "ta"), f"ta: {tuple(r)}")
        r = await tb.fetchrow("SELECT * FROM items WHERE id > $1", 0)
        check(tuple(r) == (1, 2, 3), f"tb: {tuple(r)}")
    a = await connect()
    check(len(await a.fetchrow("SELECT * FROM q3 WHERE id = $1", 1)) == 2, "two columns")
    await d.execute("ALTER TABLE q3 ADD COLUMN note text DEFAULT 'x'")
    for _ in range(3):
        b = await connect()
        r = await b.fetchrow("SELECT * FROM q3 WHERE id = $1", 1)
        check(tuple(r) == (1, "a", "x"), f"fresh plan: {tuple(r)}")
        await b.close()
    # asyncpg was told the old shape: PostgreSQL's error (with its routine,
    # as on its own connection), on which asyncpg prepares again by itself.
    r = await a.fetchrow("SELECT * FROM q3 WHERE id = $1", 1)
    check(len(r) == 3, f"after asyncpg re-prepared: {tuple(r)}")
    # The same with the DDL relayed through pgmux (no server error then
    # says which statement changed: pgmux checks the shape asyncpg was
    # told before the next use); an unchanged statement just runs.
    check(len(await a.fetchrow("SELECT id FROM q3 WHERE id = $1", 1)) == 1, "one column")
    b = await connect()
    await b.execute("ALTER TABLE q3 ADD COLUMN w int DEFAULT 7")
    await b.close()
    r = await a.fetchrow("SELECT * FROM q3 WHERE id = $1", 1)
    check(tuple(r) == (1, "a", "x", 7), f"after DDL through pgmux: {tuple(r)}")
    r = await a.fetchrow("SELECT id FROM q3 WHERE id = $1", 1)
    check(tuple(r) == (1,), f"unchanged statement: {tuple(r)}")
    await b_ddl(connect, "ALTER TABLE q3 ADD COLUMN z int DEFAULT 9")
    async with a.transaction():
        # Inside a transaction asyncpg cannot re-prepare by itself: the
        # error reaches it, as on its own connection.
        try:
            await a.fetchrow("SELECT * FROM q3 WHERE id = $1", 1)
            check(False, "a changed shape inside a transaction must fail")
        except asyncpg.exceptions.InvalidCachedStatementError:
            pass
    r = await a.fetchrow("SELECT * FROM q3 WHERE id = $1", 1)
    check(len(r) == 5, f"after the transaction: {tuple(r)}")
    for c in (a, ta, tb, d):
        await c.close()


async def b_ddl(connect, sql):
    b = await connect()
    await b.execute(sql)
    await b.close()


psycopg_checks()
asyncio.run(asyncpg_checks())
print("OK")
