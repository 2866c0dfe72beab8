// pgjdbc through pgmux (compiled and run by tests/drivers.rs).
//
// prepareThreshold=1 makes pgjdbc use named server statements (S_N) from
// the first execution and reuse them for the life of the connection, so
// pgmux must carry them across the server connections of a pool smaller
// than the number of clients. CLIENTS threads run ITERATIONS rounds each of:
// parameterized select, committed and rolled-back transactions, a failed
// transaction (unique violation), and a batch insert (addBatch/executeBatch).
//
// Connection from PGMUX_HOST/PORT/USER/PASSWORD/DB. Table items exists (see
// tests/drivers.rs). Prints "OK rows=N pids=K" and exits 0 on success; any
// failed assertion or driver error exits 1.

import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class PgjdbcTest {
    static final int CLIENTS = 6;
    static final int ITERATIONS = 25;
    static final int BATCH = 5;
    static final String INSERT = "INSERT INTO items (client, n, label) VALUES (?, ?, ?)";

    static Connection connect() throws SQLException {
        Map<String, String> e = System.getenv();
        String url = "jdbc:postgresql://" + e.get("PGMUX_HOST") + ":" + e.get("PGMUX_PORT") + "/" + e.get("PGMUX_DB")
                + "?prepareThreshold=1&connectTimeout=10";
        return DriverManager.getConnection(url, e.get("PGMUX_USER"), e.get("PGMUX_PASSWORD"));
    }

    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    static long count(PreparedStatement ps, int client) throws SQLException {
        ps.setInt(1, client);
        try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static void insert(PreparedStatement ps, int client, int n, String label) throws SQLException {
        ps.setInt(1, client);
        ps.setInt(2, n);
        ps.setString(3, label);
        check(ps.executeUpdate() == 1, "insert count");
    }

    /** One client; returns the rows it committed. */
    static long runClient(int client, Set<Integer> pids) throws SQLException {
        long expected = 0;
        try (Connection c = connect();
                PreparedStatement select = c.prepareStatement("SELECT ?::int + ?::int, ?::text || '!', pg_backend_pid()");
                PreparedStatement insert = c.prepareStatement(INSERT);
                PreparedStatement count = c.prepareStatement("SELECT count(*) FROM items WHERE client = ?")) {
            for (int i = 0; i < ITERATIONS; i++) {
                c.setAutoCommit(true);
                select.setInt(1, client);
                select.setInt(2, i);
                select.setString(3, "c" + client);
                try (ResultSet rs = select.executeQuery()) {
                    check(rs.next(), "select returned no row");
                    check(rs.getInt(1) == client + i && rs.getString(2).equals("c" + client + "!"),
                            "client " + client + " select got " + rs.getInt(1) + ", " + rs.getString(2));
                    pids.add(rs.getInt(3));
                }

                // Committed transaction.
                c.setAutoCommit(false);
                insert(insert, client, i, "row " + i);
                expected++;
                check(count(count, client) == expected, "client " + client + ": insert " + i + " not visible in its transaction");
                c.commit();
                check(count(count, client) == expected, "client " + client + ": commit " + i + " lost");
                c.commit();

                // Rolled-back transaction.
                insert(insert, client, 100000 + i, "rollback");
                check(count(count, client) == expected + 1, "client " + client + ": row invisible before rollback");
                c.rollback();
                check(count(count, client) == expected, "client " + client + ": rollback " + i + " kept a row");
                c.commit();

                // A failed transaction (server error mid-transaction).
                insert(insert, client, 200000 + i, "dup");
                try {
                    insert(insert, client, i, "dup");
                    throw new AssertionError("client " + client + ": duplicate key " + i + " accepted");
                } catch (SQLException e) {
                    check("23505".equals(e.getSQLState()), "client " + client + ": expected 23505, got " + e);
                }
                c.rollback();
                check(count(count, client) == expected, "client " + client + ": failed transaction " + i + " kept a row");
                c.commit();

                // Batch insert, every fifth round.
                if (i % 5 == 0) {
                    for (int k = 0; k < BATCH; k++) {
                        insert.setInt(1, client);
                        insert.setInt(2, 300000 + i * BATCH + k);
                        insert.setString(3, "batch " + k);
                        insert.addBatch();
                    }
                    int[] counts = insert.executeBatch();
                    check(counts.length == BATCH, "batch returned " + counts.length + " counts");
                    for (int n : counts) check(n == 1 || n == Statement.SUCCESS_NO_INFO, "batch count " + n);
                    c.commit();
                    expected += BATCH;
                    check(count(count, client) == expected, "client " + client + ": batch " + i + " lost");
                    c.commit();
                }
            }
            c.setAutoCommit(true);
            check(count(count, client) == expected, "client " + client + ": final count");
        }
        return expected;
    }

    public static void main(String[] args) throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(CLIENTS);
        List<Future<Long>> results = new ArrayList<>();
        List<Set<Integer>> pids = new ArrayList<>();
        for (int client = 0; client < CLIENTS; client++) {
            final int cl = client;
            final Set<Integer> seen = ConcurrentHashMap.newKeySet();
            pids.add(seen);
            results.add(pool.submit(() -> runClient(cl, seen)));
        }
        pool.shutdown();
        long committed = 0;
        try {
            for (Future<Long> f : results) committed += f.get(120, TimeUnit.SECONDS);
            check(pids.stream().anyMatch(s -> s.size() > 1), "no client ever moved to another server connection: " + pids);
            long total;
            try (Connection c = connect(); Statement s = c.createStatement();
                    ResultSet rs = s.executeQuery("SELECT count(*) FROM items")) {
                rs.next();
                total = rs.getLong(1);
            }
            check(total == committed, "items has " + total + " rows, clients committed " + committed);
            Set<Integer> all = new HashSet<>();
            pids.forEach(all::addAll);
            System.out.println("OK rows=" + total + " pids=" + all.size());
        } catch (Throwable t) {
            Throwable cause = t instanceof ExecutionException ? t.getCause() : t;
            cause.printStackTrace();
            System.err.println("FAIL pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_FULL_NAME + ": " + cause);
            System.exit(1);
        }
        System.exit(0);
    }
}
