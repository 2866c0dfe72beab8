"""Startup parameters from libpq's environment (PGCLIENTENCODING,
PGDATESTYLE, PGTZ) through pgmux (run by tests/startup_params.rs): the
ParameterStatus values psycopg 3 sees before its first query equal what a
direct connection to PostgreSQL reports. Prints "OK" and exits 0.
"""

import os

import psycopg

E = os.environ
os.environ.update(PGCLIENTENCODING="utf8", PGDATESTYLE="sql,dmy", PGTZ="utc")


def seen(port):
    dsn = psycopg.conninfo.make_conninfo(
        host=E["PGMUX_HOST"], port=port, user=E["PGMUX_USER"],
        password=E["PGMUX_PASSWORD"], dbname=E["PGMUX_DB"])
    with psycopg.connect(dsn) as c:
        return {k: c.info.parameter_status(k) for k in ("client_encoding", "DateStyle", "TimeZone")}


direct, pgmux = seen(E["PGMUX_DIRECT_PORT"]), seen(E["PGMUX_PORT"])
if direct != pgmux:
    raise AssertionError(f"direct {direct} != pgmux {pgmux}")
print("OK", pgmux)
