//! Config parsing and validation.
use std::time::Duration;

use super::*;
use crate::protocol::auth::Secret;

const GOOD: &str = r#"
[pgmux]
listen = "127.0.0.1:7432"

[pool]
default_pool_size = 5
query_wait_timeout = "1500ms"

[[users]]
name = "app"
password = "secret"

[[users]]
name = "ops"
auth_method = "md5"
password = "md5aeb5e2d1d7d2f6f4d4d9f1d7a0c2b3e4"
pool_mode = "session"

[databases.app]
primary = "127.0.0.1:5432"
replicas = ["127.0.0.1:5433", "localhost:5434"]
"#;

#[test]
fn parses_good_config() {
    let c = Config::parse(GOOD, "t.toml").unwrap();
    assert_eq!(c.general.listen.port, 7432);
    assert_eq!(c.pool.query_wait_timeout.0, Duration::from_millis(1500));
    assert_eq!(c.users["app"].auth_method, AuthMethod::ScramSha256);
    assert!(matches!(c.users["ops"].secret, Some(Secret::Md5(_))));
    let db = &c.databases["app"];
    assert_eq!(db.replicas.len(), 2);
    let s = c.pool_settings(db, &c.users["ops"]);
    assert_eq!((s.mode, s.size), (PoolMode::Session, 5));
}

#[test]
fn errors_name_key_and_position() {
    let bad = GOOD.replace("127.0.0.1:5433", "nohostport");
    let e = Config::parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.contains("line 21") && e.contains("replicas"), "{e}");
    let bad = GOOD.replace("\"1500ms\"", "\"15 parsecs\"");
    let e = Config::parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.contains("query_wait_timeout") && e.contains("duration unit"), "{e}");
    let bad = GOOD.replace("auth_method = \"md5\"", "auth_method = \"scram-sha-256\"");
    let e = Config::parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:16:12: users[1].password"), "{e}");
    let bad = GOOD.replace("[pool]", "[pool]\nbogus = 1");
    let e = Config::parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.contains("bogus"), "{e}");
    let bad = GOOD.replace("default_pool_size = 5", "default_pool_size = 5\nmin_pool_size = 9");
    let e = Config::parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.contains("min_pool_size"), "{e}");
}

#[test]
fn routing_options() {
    let c = Config::parse(
        &GOOD.replace(
            "replicas = [\"127.0.0.1:5433\", \"localhost:5434\"]",
            "replicas = [\"127.0.0.1:5433\", { addr = \"localhost:5434\", weight = 3 }]\n\
         load_balancing = \"weighted\"\nprimary_reads = \"always_eligible\"\nread_your_writes = \"off\"\n\
         transaction_routing = \"first_statement\"\nwrite_functions = [\"bump\"]\nmax_lag_ms = 250\n\
         follow_promotion = true",
        ),
        "t.toml",
    )
    .unwrap();
    let db = &c.databases["app"];
    assert_eq!(db.replicas.iter().map(|r| r.weight).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(db.replicas[1].addr.to_string(), "localhost:5434");
    assert_eq!(db.load_balancing, LoadBalancing::Weighted);
    assert_eq!(db.primary_reads, PrimaryReads::AlwaysEligible);
    assert_eq!(db.read_your_writes, ReadYourWrites::Off);
    assert_eq!(db.transaction_routing, TransactionRouting::FirstStatement);
    assert_eq!(db.lag_bound(), Duration::from_millis(250));
    assert!(db.follow_promotion && db.write_functions == ["bump"]);
    let defaults = &Config::parse(GOOD, "t.toml").unwrap().databases["app"];
    assert_eq!((defaults.load_balancing, defaults.primary_reads), (LoadBalancing::RoundRobin, PrimaryReads::Fallback));
    assert_eq!(defaults.lag_bound(), Duration::from_secs(1));
    for (extra, key) in [
        ("load_balancing = \"fastest\"", "load_balancing"),
        ("max_lag = \"2s\"\nmax_lag_ms = 100", "max_lag_ms"),
        ("write_functions = [\"f(int)\"]", "write_functions"),
        ("replicas = [{ addr = \"h:1\", wieght = 2 }]", "wieght"),
    ] {
        let text = GOOD.replace("replicas = [\"127.0.0.1:5433\", \"localhost:5434\"]", extra);
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
}

#[test]
fn sharding_validation_names_the_key() {
    let sharded = |extra: &str| {
        format!(
            "[[users]]\nname = \"app\"\npassword = \"x\"\n[databases.shop]\n\
             shards = [{{ name = \"s0\", primary = \"h:1\" }}, {{ name = \"s1\", primary = \"h:2\" }}]\n{extra}"
        )
    };
    let ok = sharded(
        "tables = [{ name = \"users\", key = \"id\", map = \"m\" }]\n[databases.shop.maps.m]\nkind = \"hash\"\ntype = \"int8\"",
    );
    let c = Config::parse(&ok, "t.toml").unwrap();
    let groups = c.databases["shop"].groups("shop");
    assert_eq!(groups.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), ["shop/s0", "shop/s1"]);
    assert_eq!(groups[1].1.primary_addr().port, 2);
    for (extra, key) in [
        ("primary = \"h:3\"", "shards"),
        ("replicas = [\"h:3\"]", "replicas"),
        ("tables = [{ name = \"t\", key = \"id\", map = \"nope\" }]", "tables[0].map"),
        (
            "[databases.shop.maps.m]\nkind = \"range\"\ntype = \"int4\"\nranges = [{ to = 10, shard = \"s0\" }, { from = 5, shard = \"s1\" }]",
            "maps.m.ranges[1]",
        ),
        (
            "[databases.shop.maps.m]\nkind = \"list\"\ntype = \"text\"\nlists = [{ values = [\"eu\"], shard = \"s9\" }]",
            "maps.m.lists[0].shard",
        ),
        (
            "[databases.shop.maps.m]\nkind = \"list\"\ntype = \"int8\"\nlists = [{ values = [\"eu\"], shard = \"s0\" }]",
            "maps.m.lists[0]",
        ),
        (
            "tables = [{ name = \"t\", key = \"a\", map = \"m\" }, { name = \"T\", key = \"b\", map = \"m\" }]\n[databases.shop.maps.m]\nkind = \"hash\"\ntype = \"text\"",
            "tables[1]",
        ),
    ] {
        let e = Config::parse(&sharded(extra), "t.toml").unwrap_err().to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
    assert!(parse_duration("x").is_err());
}

/// The field names serde expects for struct `T` (a deserializer that
/// stops at `deserialize_struct` and records them).
fn fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Introspect<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Introspect<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut out: &'static [&'static str] = &[];
    let _ = T::deserialize(Introspect(&mut out));
    out
}

/// Every key of the config structs is documented in the annotated
/// reference files (config/pgmux.toml, and config/sharded.toml for the
/// sharding keys), so the reference cannot drift from the code.
#[test]
fn reference_files_document_every_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let reference = std::fs::read_to_string(format!("{root}/config/pgmux.toml")).unwrap();
    let sharded = std::fs::read_to_string(format!("{root}/config/sharded.toml")).unwrap();
    let documented = |text: &str, key: &str| {
        text.contains(&format!("{key} =")) || text.contains(&format!("{key}=")) || text.contains(&format!(".{key}."))
    };
    let checks: [(&str, &[&str], &str); 6] = [
        ("[pgmux]", fields::<General>(), &reference),
        ("[pool]", fields::<PoolDefaults>(), &reference),
        ("[[users]]", fields::<RawUser>(), &reference),
        ("[databases.*]", fields::<Database>(), &reference),
        ("shards", fields::<Shard>(), &sharded),
        ("tables", fields::<ShardedTable>(), &sharded),
    ];
    for (section, keys, text) in checks {
        assert!(keys.len() > 1, "{section}: no fields found");
        for key in keys {
            let sharding =
                ["shards", "tables", "maps", "reference_tables", "allow_cross_shard_writes", "two_phase_commit"];
            let text = if sharding.contains(key) { sharded.as_str() } else { text };
            assert!(documented(text, key), "{section} {key} is not in the reference config");
        }
    }
}

/// The reference config shows the defaults: its [pgmux] and [pool]
/// sections are exactly what an empty file gives.
#[test]
fn reference_file_shows_the_defaults() {
    let root = env!("CARGO_MANIFEST_DIR");
    let reference = Config::load(std::path::Path::new(&format!("{root}/config/pgmux.toml"))).unwrap();
    assert_eq!(reference.general, General::default());
    assert_eq!(reference.pool, PoolDefaults::default());
}
