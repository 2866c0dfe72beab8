//! Value types of the configuration: durations, backend addresses,
//! replicas with weights, and the routing choices of a database.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// A duration written as seconds (`30`) or with a unit (`"500ms"`, `"2m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(s) => Ok(Dur(Duration::from_secs(s))),
            Raw::Str(s) => parse_duration(&s).map(Dur).map_err(de::Error::custom),
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration \"{s}\" (use e.g. 500ms, 30s, 5m, 1h)"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" | "min" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        u => return Err(format!("invalid duration unit \"{u}\" in \"{s}\" (use ms, s, m or h)")),
    };
    Ok(Duration::from_millis(ms))
}

/// A backend address `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("\"{s}\" is not host:port"))?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("invalid port in \"{s}\""))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("missing host in \"{s}\""));
        }
        Ok(HostPort { host: host.to_string(), port })
    }
}

/// A replica: `"host:port"`, or `{ addr = "host:port", weight = 3 }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    pub addr: HostPort,
    /// Share of reads under `load_balancing = "weighted"` (0: none).
    pub weight: u32,
}

impl<'de> Deserialize<'de> for Replica {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Replica;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"host:port\" or { addr = \"host:port\", weight = N }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Replica, E> {
                Ok(Replica { addr: s.parse().map_err(E::custom)?, weight: 1 })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Replica, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    addr: HostPort,
                    #[serde(default = "one")]
                    weight: u32,
                }
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Replica { addr: t.addr, weight: t.weight })
            }
        }
        d.deserialize_any(V)
    }
}

fn one() -> u32 {
    1
}

/// How reads are spread over the eligible replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// In turn.
    #[default]
    RoundRobin,
    /// To the backend whose pool has the fewest connections in use.
    LeastConnections,
    /// Uniformly at random.
    Random,
    /// At random, in proportion to each replica's `weight`.
    Weighted,
}

/// Whether the primary serves reads too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrimaryReads {
    /// Never: with no eligible replica a read fails (read-your-writes reads
    /// still go to the primary when no replica has caught up).
    Never,
    /// Only when no replica is eligible.
    #[default]
    Fallback,
    /// Always one of the candidates, like a replica (weight 1).
    AlwaysEligible,
}

/// Read-your-writes for a client that wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadYourWrites {
    /// Its reads go only to replicas that replayed its last write.
    #[default]
    Session,
    Off,
}

/// Where an explicit read-write transaction goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionRouting {
    /// The primary.
    #[default]
    Primary,
    /// Where its first statement after BEGIN would go (pgmux answers the
    /// BEGIN itself and sends it with that statement).
    FirstStatement,
}
