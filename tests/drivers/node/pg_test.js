// node-postgres (pg) through pgmux (run by tests/drivers.rs).
//
// Named queries ({name, text, values}) are parsed once per Client and then
// only bound and executed, so pgmux must carry those statements across the
// server connections of a pool smaller than the number of clients. CLIENTS
// Clients run ITERATIONS rounds each of: named select, committed and
// rolled-back transactions, a failed transaction (unique violation).
//
// Connection from PGMUX_HOST/PORT/USER/PASSWORD/DB. Table items exists (see
// tests/drivers.rs). Prints "OK rows=N pids=K" and exits 0 on success; any
// failed assertion or driver error exits 1.
'use strict';

const { Client } = require('pg');

const CLIENTS = 6;
const ITERATIONS = 25;
const env = process.env;

function connect() {
  return new Client({
    host: env.PGMUX_HOST, port: Number(env.PGMUX_PORT), user: env.PGMUX_USER,
    password: env.PGMUX_PASSWORD, database: env.PGMUX_DB, connectionTimeoutMillis: 10000,
  });
}

function check(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}

const SELECT = { name: 'sel', text: "SELECT $1::int + $2::int AS total, $3::text || '!' AS text, pg_backend_pid() AS pid" };
const INSERT = { name: 'ins', text: 'INSERT INTO items (client, n, label) VALUES ($1, $2, $3)' };
const COUNT = { name: 'cnt', text: 'SELECT count(*)::int AS n FROM items WHERE client = $1' };

async function count(c, client) {
  return (await c.query({ ...COUNT, values: [client] })).rows[0].n;
}

async function runClient(client, pids) {
  const c = connect();
  await c.connect();
  let expected = 0;
  try {
    for (let i = 0; i < ITERATIONS; i++) {
      const row = (await c.query({ ...SELECT, values: [client, i, `c${client}`] })).rows[0];
      check(row.total === client + i && row.text === `c${client}!`, `client ${client} select got ${JSON.stringify(row)}`);
      pids.add(row.pid);

      // Committed transaction.
      await c.query('BEGIN');
      const ins = await c.query({ ...INSERT, values: [client, i, `row ${i}`] });
      check(ins.rowCount === 1, `client ${client}: insert rowCount ${ins.rowCount}`);
      expected++;
      check(await count(c, client) === expected, `client ${client}: insert ${i} not visible in its transaction`);
      await c.query('COMMIT');
      check(await count(c, client) === expected, `client ${client}: commit ${i} lost`);

      // Rolled-back transaction.
      await c.query('BEGIN');
      await c.query({ ...INSERT, values: [client, 100000 + i, 'rollback'] });
      check(await count(c, client) === expected + 1, `client ${client}: row invisible before rollback`);
      await c.query('ROLLBACK');
      check(await count(c, client) === expected, `client ${client}: rollback ${i} kept a row`);

      // A failed transaction (server error mid-transaction).
      await c.query('BEGIN');
      await c.query({ ...INSERT, values: [client, 200000 + i, 'dup'] });
      let code = null;
      try {
        await c.query({ ...INSERT, values: [client, i, 'dup'] });
      } catch (e) {
        code = e.code;
      }
      check(code === '23505', `client ${client}: duplicate key ${i} gave ${code}`);
      await c.query('ROLLBACK');
      check(await count(c, client) === expected, `client ${client}: failed transaction ${i} kept a row`);
    }
  } finally {
    await c.end();
  }
  return expected;
}

async function main() {
  const pids = Array.from({ length: CLIENTS }, () => new Set());
  const rows = await Promise.all(pids.map((seen, client) => runClient(client, seen)));
  check(pids.some((s) => s.size > 1), `no client ever moved to another server connection: ${pids.map((s) => [...s])}`);
  const c = connect();
  await c.connect();
  const total = (await c.query('SELECT count(*)::int AS n FROM items')).rows[0].n;
  await c.end();
  const committed = rows.reduce((a, b) => a + b, 0);
  check(total === committed, `items has ${total} rows, clients committed ${committed}`);
  const all = new Set(pids.flatMap((s) => [...s]));
  console.log(`OK rows=${total} pids=${all.size}`);
}

main().catch((e) => {
  console.error(e);
  console.error(`FAIL pg ${require('pg/package.json').version}: ${e.message}`);
  process.exit(1);
});
