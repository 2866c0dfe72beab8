//! Prometheus metrics, one registry per proxy, served as text on
//! `metrics_listen` at `/metrics`.
//!
//! Counters and histograms on the data path are handles created once per
//! pool ([`PoolMetrics`], labelled by route and backend), so a query costs
//! a few atomic adds. Gauges of state (connections, replica lag and
//! health, directory caches) are sampled at scrape time. Labels come from
//! the config only (routes, backend groups, SQLSTATE classes): their
//! number is bounded, never per client or per query text.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Latency buckets, seconds: 100 µs to 30 s.
const LATENCY: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A pool's data-path counters (route: primary, replica, shard).
#[derive(Clone)]
pub struct PoolMetrics {
    pub queries: IntCounter,
    pub xacts: IntCounter,
    pub query_seconds: Histogram,
    pub xact_seconds: Histogram,
    pub wait_seconds: Histogram,
    /// Bytes from clients to the server, and back.
    pub sent: IntCounter,
    pub received: IntCounter,
    pub prepared_hits: IntCounter,
    pub prepared_misses: IntCounter,
    pub prepared_evictions: IntCounter,
    /// Server statements found stale (schema changed under them) and
    /// prepared again; and the batches pgmux re-ran for that.
    pub prepared_stale: IntCounter,
    pub prepared_reruns: IntCounter,
    /// Statements whose shape a client was told, checked after DDL.
    pub prepared_checks: IntCounter,
}

pub struct Metrics {
    registry: Registry,
    pub clients: IntGaugeVec,
    pub server_connections: IntGaugeVec,
    queries: IntCounterVec,
    xacts: IntCounterVec,
    query_seconds: HistogramVec,
    xact_seconds: HistogramVec,
    pool_wait: HistogramVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    prepared: IntCounterVec,
    pub replica_lag_bytes: GaugeVec,
    pub replica_lag_seconds: GaugeVec,
    pub replica_healthy: GaugeVec,
    pub directory_cache: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY.to_vec()), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("pgmux".into()), None).expect("valid prefix");
        Metrics {
            clients: int_gauge(&r, "client_connections", "Client connections by state", &["state"]),
            server_connections: int_gauge(
                &r,
                "server_connections",
                "Server connections by backend and state",
                &["backend", "state"],
            ),
            queries: counter(
                &r,
                "queries_total",
                "Queries (ReadyForQuery answers) by route and backend",
                &["route", "backend"],
            ),
            xacts: counter(&r, "transactions_total", "Transactions by route and backend", &["route", "backend"]),
            query_seconds: histogram(&r, "query_duration_seconds", "Query latency by route", &["route"]),
            xact_seconds: histogram(&r, "transaction_duration_seconds", "Transaction latency by route", &["route"]),
            pool_wait: histogram(&r, "pool_wait_seconds", "Time waiting for a server connection", &["backend"]),
            bytes: counter(&r, "bytes_total", "Bytes relayed by direction and backend", &["direction", "backend"]),
            errors: counter(&r, "errors_total", "Errors sent to clients by SQLSTATE class", &["class"]),
            prepared: counter(&r, "prepared_statements_total", "Prepared statement cache events", &["event"]),
            replica_lag_bytes: gauge(&r, "replica_lag_bytes", "Replay lag in bytes", &["group", "backend"]),
            replica_lag_seconds: gauge(&r, "replica_lag_seconds", "Replay lag in seconds", &["group", "backend"]),
            replica_healthy: gauge(&r, "backend_healthy", "1 when reachable and not banned", &["group", "backend"]),
            directory_cache: counter(
                &r,
                "directory_cache_total",
                "Shard directory cache lookups by result",
                &["database", "map", "result"],
            ),
            registry: r,
        }
    }

    /// The handles of a pool of backend group `backend` on `route`.
    pub fn pool(&self, route: &str, backend: &str) -> PoolMetrics {
        PoolMetrics {
            queries: self.queries.with_label_values(&[route, backend]),
            xacts: self.xacts.with_label_values(&[route, backend]),
            query_seconds: self.query_seconds.with_label_values(&[route]),
            xact_seconds: self.xact_seconds.with_label_values(&[route]),
            wait_seconds: self.pool_wait.with_label_values(&[backend]),
            sent: self.bytes.with_label_values(&["client_to_server", backend]),
            received: self.bytes.with_label_values(&["server_to_client", backend]),
            prepared_hits: self.prepared.with_label_values(&["hit"]),
            prepared_misses: self.prepared.with_label_values(&["miss"]),
            prepared_evictions: self.prepared.with_label_values(&["eviction"]),
            prepared_stale: self.prepared.with_label_values(&["stale"]),
            prepared_reruns: self.prepared.with_label_values(&["rerun"]),
            prepared_checks: self.prepared.with_label_values(&["check"]),
        }
    }

    /// (backend, route, queries, transactions) of every route used so far.
    pub fn routes(&self) -> Vec<(String, String, u64, u64)> {
        let mut out = Vec::new();
        for family in self.registry.gather() {
            if family.name() != "pgmux_queries_total" {
                continue;
            }
            for m in family.get_metric() {
                let label = |n: &str| m.get_label().iter().find(|l| l.name() == n).map(|l| l.value().to_string());
                let (Some(backend), Some(route)) = (label("backend"), label("route")) else { continue };
                let queries = m.get_counter().get_value() as u64;
                let xacts = self.xacts.with_label_values(&[&route, &backend]).get();
                out.push((backend, route, queries, xacts));
            }
        }
        out.sort();
        out
    }

    /// An error sent to a client (its SQLSTATE).
    pub fn error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("??");
        self.errors.with_label_values(&[class]).inc();
    }

    /// Errors counted so far in SQLSTATE class `class`.
    pub fn errors_in(&self, class: &str) -> u64 {
        self.errors.with_label_values(&[class]).get()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("metrics encoding failed: {e}");
        }
        out
    }
}

/// The SQLSTATE of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<&str> {
    let mut rest = body;
    while let Some((&kind, after)) = rest.split_first() {
        let end = after.iter().position(|&b| b == 0)?;
        if kind == b'C' {
            return std::str::from_utf8(&after[..end]).ok();
        }
        rest = &after[end + 1..];
    }
    None
}

/// Serve `GET /metrics` on `listener` until the process ends; `render`
/// produces the body (sampling gauges first).
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> Vec<u8> + Send + Sync>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            let head = tokio::time::timeout(Duration::from_secs(5), async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(head, Ok(true)) {
                return;
            }
            let line = String::from_utf8_lossy(req.split(|&b| b == b'\r').next().unwrap_or_default()).into_owned();
            let (status, ctype, body) = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["GET", "/metrics", ..] => ("200 OK", "text/plain; version=0.0.4", render()),
                ["GET", ..] => ("404 Not Found", "text/plain", b"not found; try /metrics\n".to_vec()),
                _ => ("405 Method Not Allowed", "text/plain", b"GET only\n".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_metrics() {
        let m = Metrics::new();
        let p = m.pool("primary", "db");
        p.queries.inc_by(3);
        p.query_seconds.observe(0.002);
        m.error("23505");
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("pgmux_queries_total{backend=\"db\",route=\"primary\"} 3"), "{text}");
        assert!(text.contains("pgmux_errors_total{class=\"23\"} 1"), "{text}");
        assert!(text.contains("pgmux_query_duration_seconds_bucket{route=\"primary\",le=\"0.0025\"} 1"), "{text}");
        assert_eq!(m.errors_in("23"), 1);
    }

    #[test]
    fn finds_the_sqlstate() {
        assert_eq!(error_code(b"SERROR\0VERROR\0C23505\0Mdup\0\0"), Some("23505"));
        assert_eq!(error_code(b"SERROR\0\0"), None);
        assert_eq!(error_code(b"C4"), None);
    }
}
