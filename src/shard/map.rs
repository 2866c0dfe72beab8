//! Shard maps compiled from the config: a typed key value picks its shard
//! by hash (PostgreSQL `PARTITION BY HASH` compatible), range or list.

use std::cmp::Ordering;

use crate::config::{KeyType, MapConfig, RawKey};
use crate::shard::hash::{hash_remainder, KeyValue};

/// A key value, typed by its map.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Int(i64),
    Text(String),
    Uuid([u8; 16]),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("invalid value for shard key of type {0:?}: {1:?}")]
    Invalid(KeyType, String),
    #[error("no shard for key {0}")]
    NoShard(String),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Int(i) => write!(f, "{i}"),
            Key::Text(s) => write!(f, "'{s}'"),
            Key::Uuid(u) => write!(f, "'{}'", format_uuid(u)),
        }
    }
}

fn format_uuid(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Parse a UUID in PostgreSQL's accepted text forms (hyphens anywhere
/// between hex pairs, optional braces).
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    let s = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')).unwrap_or(s);
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

impl Key {
    /// The key as the directory stores it (text).
    pub fn directory_text(&self) -> String {
        match self {
            Key::Int(i) => i.to_string(),
            Key::Text(s) => s.clone(),
            Key::Uuid(u) => format_uuid(u),
        }
    }

    /// A value written as text (a literal, or a text-format parameter).
    pub fn from_text(kt: KeyType, s: &str) -> Result<Key, KeyError> {
        let bad = || KeyError::Invalid(kt, s.to_string());
        match kt {
            KeyType::Int2 => s.trim().parse::<i16>().map(|v| Key::Int(v.into())).map_err(|_| bad()),
            KeyType::Int4 => s.trim().parse::<i32>().map(|v| Key::Int(v.into())).map_err(|_| bad()),
            KeyType::Int8 => s.trim().parse::<i64>().map(Key::Int).map_err(|_| bad()),
            KeyType::Text => Ok(Key::Text(s.to_string())),
            KeyType::Uuid => parse_uuid(s).map(Key::Uuid).ok_or_else(bad),
        }
    }

    /// A binary-format parameter (integers of any width the client sent).
    pub fn from_binary(kt: KeyType, b: &[u8]) -> Result<Key, KeyError> {
        let bad = || KeyError::Invalid(kt, format!("{b:02x?}"));
        match kt {
            KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => {
                let v = match b.len() {
                    2 => i64::from(i16::from_be_bytes([b[0], b[1]])),
                    4 => i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                    8 => i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                    _ => return Err(bad()),
                };
                let fits = match kt {
                    KeyType::Int2 => i16::try_from(v).is_ok(),
                    KeyType::Int4 => i32::try_from(v).is_ok(),
                    _ => true,
                };
                fits.then_some(Key::Int(v)).ok_or_else(bad)
            }
            KeyType::Text => std::str::from_utf8(b).map(|s| Key::Text(s.to_string())).map_err(|_| bad()),
            KeyType::Uuid => <[u8; 16]>::try_from(b).map(Key::Uuid).map_err(|_| bad()),
        }
    }

    fn from_raw(kt: KeyType, r: &RawKey) -> Result<Key, KeyError> {
        match r {
            RawKey::Int(i) => Key::from_text(kt, &i.to_string()),
            RawKey::Text(s) => Key::from_text(kt, s),
        }
    }
}

/// Text keys compare as PostgreSQL's "C" collation does (bytes).
fn cmp_key(a: &Key, b: &Key) -> Ordering {
    match (a, b) {
        (Key::Text(x), Key::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        _ => a.cmp(b),
    }
}

/// A compiled shard map.
#[derive(Debug)]
pub enum ShardMap {
    Hash {
        key_type: KeyType,
        shards: u64,
    },
    Range {
        key_type: KeyType,
        ranges: Vec<(Option<Key>, Option<Key>, usize)>,
    },
    List {
        key_type: KeyType,
        lists: Vec<(Key, usize)>,
        default: Option<usize>,
    },
    /// Looked up in the map's [`crate::shard::directory::Directory`].
    Directory {
        key_type: KeyType,
    },
}

impl ShardMap {
    /// Compile `cfg`; `shard` resolves a shard name (validated before).
    pub fn compile(cfg: &MapConfig, shards: usize, shard: impl Fn(&str) -> usize) -> Result<ShardMap, KeyError> {
        Ok(match cfg {
            MapConfig::Hash { key_type } => ShardMap::Hash { key_type: *key_type, shards: shards as u64 },
            MapConfig::Range { key_type, ranges } => {
                let key = |r: &Option<RawKey>| r.as_ref().map(|r| Key::from_raw(*key_type, r)).transpose();
                let ranges = ranges
                    .iter()
                    .map(|r| Ok((key(&r.from)?, key(&r.to)?, shard(&r.shard))))
                    .collect::<Result<_, KeyError>>()?;
                ShardMap::Range { key_type: *key_type, ranges }
            }
            MapConfig::List { key_type, lists, default } => {
                let mut out = Vec::new();
                for l in lists {
                    for v in &l.values {
                        out.push((Key::from_raw(*key_type, v)?, shard(&l.shard)));
                    }
                }
                ShardMap::List { key_type: *key_type, lists: out, default: default.as_deref().map(&shard) }
            }
            MapConfig::Directory { key_type, .. } => ShardMap::Directory { key_type: *key_type },
        })
    }

    pub fn key_type(&self) -> KeyType {
        match self {
            ShardMap::Hash { key_type, .. }
            | ShardMap::Range { key_type, .. }
            | ShardMap::List { key_type, .. }
            | ShardMap::Directory { key_type } => *key_type,
        }
    }

    /// The shard (index) of `key`.
    pub fn shard_of(&self, key: &Key) -> Result<usize, KeyError> {
        match self {
            ShardMap::Hash { key_type, shards } => {
                let v = match (key_type, key) {
                    (KeyType::Int2, Key::Int(i)) => KeyValue::Int2(*i as i16),
                    (KeyType::Int4, Key::Int(i)) => KeyValue::Int4(*i as i32),
                    (KeyType::Int8, Key::Int(i)) => KeyValue::Int8(*i),
                    (KeyType::Text, Key::Text(s)) => KeyValue::Text(s),
                    (KeyType::Uuid, Key::Uuid(u)) => KeyValue::Uuid(*u),
                    (kt, k) => return Err(KeyError::Invalid(*kt, k.to_string())),
                };
                Ok(hash_remainder(&v, *shards) as usize)
            }
            ShardMap::Range { ranges, .. } => ranges
                .iter()
                .find(|(from, to, _)| {
                    from.as_ref().is_none_or(|f| cmp_key(f, key) != Ordering::Greater)
                        && to.as_ref().is_none_or(|t| cmp_key(key, t) == Ordering::Less)
                })
                .map(|r| r.2)
                .ok_or_else(|| KeyError::NoShard(key.to_string())),
            ShardMap::List { lists, default, .. } => lists
                .iter()
                .find(|(v, _)| v == key)
                .map(|l| l.1)
                .or(*default)
                .ok_or_else(|| KeyError::NoShard(key.to_string())),
            ShardMap::Directory { .. } => Err(KeyError::NoShard(key.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::shards::{ListEntry, RangeEntry};

    #[test]
    fn range_and_list_maps() {
        let cfg = MapConfig::Range {
            key_type: KeyType::Int8,
            ranges: vec![
                RangeEntry { from: None, to: Some(RawKey::Int(100)), shard: "a".into() },
                RangeEntry { from: Some(RawKey::Int(100)), to: Some(RawKey::Int(200)), shard: "b".into() },
                RangeEntry { from: Some(RawKey::Int(300)), to: None, shard: "a".into() },
            ],
        };
        let m = ShardMap::compile(&cfg, 2, |s| usize::from(s == "b")).unwrap();
        assert_eq!(m.shard_of(&Key::Int(-5)), Ok(0));
        assert_eq!(m.shard_of(&Key::Int(99)), Ok(0));
        assert_eq!(m.shard_of(&Key::Int(100)), Ok(1));
        assert_eq!(m.shard_of(&Key::Int(199)), Ok(1));
        assert!(matches!(m.shard_of(&Key::Int(250)), Err(KeyError::NoShard(_))));
        assert_eq!(m.shard_of(&Key::Int(i64::MAX)), Ok(0));
        let cfg = MapConfig::List {
            key_type: KeyType::Text,
            lists: vec![ListEntry {
                values: vec![RawKey::Text("eu".into()), RawKey::Text("ch".into())],
                shard: "b".into(),
            }],
            default: Some("a".into()),
        };
        let m = ShardMap::compile(&cfg, 2, |s| usize::from(s == "b")).unwrap();
        assert_eq!(m.shard_of(&Key::Text("ch".into())), Ok(1));
        assert_eq!(m.shard_of(&Key::Text("us".into())), Ok(0));
    }

    #[test]
    fn keys_from_text_and_binary() {
        assert_eq!(Key::from_text(KeyType::Int4, " 42 "), Ok(Key::Int(42)));
        assert!(Key::from_text(KeyType::Int2, "70000").is_err());
        assert_eq!(Key::from_binary(KeyType::Int8, &7i32.to_be_bytes()), Ok(Key::Int(7)));
        assert!(Key::from_binary(KeyType::Int4, &(1i64 << 40).to_be_bytes()).is_err());
        let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        let k = Key::from_text(KeyType::Uuid, u).unwrap();
        assert_eq!(k.to_string(), format!("'{u}'"));
        assert_eq!(Key::from_text(KeyType::Uuid, "{A0EEBC999C0B4EF8BB6D6BB9BD380A11}"), Ok(k));
    }
}
