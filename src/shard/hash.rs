//! Bit-exact port of PostgreSQL 15's `PARTITION BY HASH` row routing for a single key column.
//!
//! PostgreSQL (`compute_partition_hash_value` in `src/backend/partitioning/partbounds.c`) computes
//!
//! ```text
//! row_hash = 0
//! for each non-NULL key column: row_hash = hash_combine64(row_hash, <type>_extended(value, HASH_PARTITION_SEED))
//! ```
//!
//! and a row belongs to the partition `FOR VALUES WITH (MODULUS m, REMAINDER r)` iff `row_hash % m == r`.
//! The per-type hashes all end in Bob Jenkins' lookup3 as vendored in `src/common/hashfn.c`
//! (`hash_bytes_extended`, `hash_bytes_uint32_extended`):
//!
//! * `int2`: `hashint2extended` sign-extends to `int32` first (`-1::int2` hashes like `-1::int4`).
//! * `int4`: `hashint4extended` hashes the value's bits as a `uint32`.
//! * `int8`: `hashint8extended` folds to 32 bits (`lo ^ hi`, or `lo ^ !hi` when negative), so every `int8`
//!   that fits in `int4` hashes exactly like that `int4`.
//! * `text` / `varchar`: `hashtextextended` hashes the raw bytes in the server encoding, but only for a
//!   *deterministic* collation (the default collation, `"C"`, libc collations, deterministic ICU). This module
//!   assumes a UTF-8 database; a nondeterministic ICU collation hashes the ICU sort key instead and is not
//!   supported. `char(n)`/`bpchar` uses a different function (trailing blanks are stripped) and is not covered.
//! * `uuid`: `uuid_hash_extended` hashes the 16 bytes in RFC 4122 (textual) order.
//!
//! Results are those of a little-endian server (x86_64, aarch64); big-endian servers hash byte strings
//! differently. A NULL key hashes to `0` (remainder 0) and is not represented by [`KeyValue`].

/// `HASH_PARTITION_SEED` from `src/include/catalog/partition.h`.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// One non-NULL partition key value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValue<'a> {
    /// `smallint` / `int2`.
    Int2(i16),
    /// `integer` / `int4`.
    Int4(i32),
    /// `bigint` / `int8`.
    Int8(i64),
    /// `text` or `varchar` with a deterministic collation, in a UTF-8 database. PostgreSQL rejects NUL bytes.
    Text(&'a str),
    /// `uuid`, bytes in textual order (`00112233-4455-...` is `[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, ...]`).
    Uuid([u8; 16]),
}

/// The 64-bit row hash PostgreSQL computes for a one-column hash partition key.
pub fn partition_hash(v: &KeyValue) -> u64 {
    hash_combine64(0, column_hash(v, HASH_PARTITION_SEED))
}

/// The remainder of the partition PostgreSQL routes `v` to, for a partition of the given modulus.
///
/// PostgreSQL requires `modulus >= 1`; for `modulus == 0` this returns 0 rather than panicking.
pub fn hash_remainder(v: &KeyValue, modulus: u64) -> u64 {
    partition_hash(v).checked_rem(modulus).unwrap_or(0)
}

/// The type's extended hash support function (`hashint4extended` etc.) with an explicit seed.
pub fn column_hash(v: &KeyValue, seed: u64) -> u64 {
    match *v {
        KeyValue::Int2(x) => hash_uint32_extended(i32::from(x) as u32, seed),
        KeyValue::Int4(x) => hash_uint32_extended(x as u32, seed),
        KeyValue::Int8(x) => {
            let lo = x as u32;
            let hi = (x >> 32) as u32;
            hash_uint32_extended(if x >= 0 { lo ^ hi } else { lo ^ !hi }, seed)
        }
        KeyValue::Text(s) => hash_bytes_extended(s.as_bytes(), seed),
        KeyValue::Uuid(ref u) => hash_bytes_extended(u, seed),
    }
}

/// `hash_combine64` from `src/include/common/hashfn.h`.
#[inline]
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b.wrapping_add(0x49a0_f4dd_15e5_a8e3).wrapping_add(a << 54).wrapping_add(a >> 7)
}

/// lookup3 internal state `(a, b, c)`.
#[derive(Clone, Copy)]
struct State(u32, u32, u32);

impl State {
    /// Initial state for a key of `len` bytes, perturbed by a non-zero seed as in PostgreSQL.
    #[inline(always)]
    fn new(len: u32, seed: u64) -> Self {
        let init = 0x9e37_79b9_u32.wrapping_add(len).wrapping_add(3_923_095);
        let mut s = State(init, init, init);
        if seed != 0 {
            s.0 = s.0.wrapping_add((seed >> 32) as u32);
            s.1 = s.1.wrapping_add(seed as u32);
            s.mix();
        }
        s
    }

    #[inline(always)]
    fn add(&mut self, a: u32, b: u32, c: u32) {
        self.0 = self.0.wrapping_add(a);
        self.1 = self.1.wrapping_add(b);
        self.2 = self.2.wrapping_add(c);
    }

    /// `mix(a, b, c)`.
    #[inline(always)]
    fn mix(&mut self) {
        let State(mut a, mut b, mut c) = *self;
        for (r1, r2, r3) in [(4, 6, 8), (16, 19, 4)] {
            a = a.wrapping_sub(c) ^ c.rotate_left(r1);
            c = c.wrapping_add(b);
            b = b.wrapping_sub(a) ^ a.rotate_left(r2);
            a = a.wrapping_add(c);
            c = c.wrapping_sub(b) ^ b.rotate_left(r3);
            b = b.wrapping_add(a);
        }
        *self = State(a, b, c);
    }

    /// `final(a, b, c)`, returning PostgreSQL's 64-bit result `((uint64) b << 32) | c`.
    #[inline(always)]
    fn finish(self) -> u64 {
        let State(mut a, mut b, mut c) = self;
        c = (c ^ b).wrapping_sub(b.rotate_left(14));
        a = (a ^ c).wrapping_sub(c.rotate_left(11));
        b = (b ^ a).wrapping_sub(a.rotate_left(25));
        c = (c ^ b).wrapping_sub(b.rotate_left(16));
        a = (a ^ c).wrapping_sub(c.rotate_left(4));
        b = (b ^ a).wrapping_sub(a.rotate_left(14));
        c = (c ^ b).wrapping_sub(b.rotate_left(24));
        (u64::from(b) << 32) | u64::from(c)
    }
}

#[inline(always)]
fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// `hash_bytes_extended` (formerly `hash_any_extended`) on a little-endian machine.
///
/// PostgreSQL has an aligned (word loads) and an unaligned (byte loads) path; on little endian both add the
/// same values: whole 12-byte blocks as three little-endian words, then the 0..=11 byte tail zero-padded,
/// with the tail's third word shifted left by 8 because the lowest byte of `c` is reserved for the length.
/// Keys longer than `u32::MAX` bytes (impossible for PostgreSQL, whose limit is 1 GB) wrap the length.
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let mut s = State::new(k.len() as u32, seed);
    let mut blocks = k.chunks_exact(12);
    for blk in &mut blocks {
        s.add(le32(blk, 0), le32(blk, 4), le32(blk, 8));
        s.mix();
    }
    let tail = blocks.remainder();
    let mut pad = [0u8; 12];
    pad[..tail.len()].copy_from_slice(tail);
    s.add(le32(&pad, 0), le32(&pad, 4), le32(&pad, 8) << 8);
    s.finish()
}

/// `hash_bytes_uint32_extended` (formerly `hash_uint32_extended`): same result as hashing the 4 bytes.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut s = State::new(4, seed);
    s.add(k, 0, 0);
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_I64: u64 = HASH_PARTITION_SEED; // 8816678312871386365 in SQL

    fn uuid(s: &str) -> [u8; 16] {
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(std::str::from_utf8(&hex[2 * i..2 * i + 2]).unwrap(), 16).unwrap();
        }
        out
    }

    /// `SELECT hash<type>extended(v, 8816678312871386365)` on PostgreSQL 15.18 (x86_64, UTF8 database).
    #[test]
    fn column_hash_matches_server() {
        let cases: &[(KeyValue, i64)] = &[
            (KeyValue::Int2(0), -4403592609991167795),
            (KeyValue::Int2(1), 5968994663651403477),
            (KeyValue::Int2(-1), -5017072347659237694),
            (KeyValue::Int2(32767), -6436696229286267413),
            (KeyValue::Int2(-32768), 5885242512097991578),
            (KeyValue::Int2(12345), 3476363059597467753),
            (KeyValue::Int4(-1), -5017072347659237694),
            (KeyValue::Int4(i32::MAX), -6050265599104649060),
            (KeyValue::Int4(i32::MIN), 4938542303000433043),
            (KeyValue::Int4(123456789), -922921598128084246),
            (KeyValue::Int8(0), -4403592609991167795),
            (KeyValue::Int8(-1), -5017072347659237694),
            (KeyValue::Int8(i64::MAX), 4938542303000433043),
            (KeyValue::Int8(i64::MIN), -6050265599104649060),
            (KeyValue::Int8(1234567890123456789), -9105224441813162067),
            (KeyValue::Int8(4294967296), 5968994663651403477),
            (KeyValue::Text(""), -5700645584453517373),
            (KeyValue::Text("a"), -6705225459120232837),
            (KeyValue::Text("abc"), 3628778498291917250),
            (KeyValue::Text("abcd"), 4029384952263848046),
            (KeyValue::Text("hello world"), 7664296498819024037),
            (KeyValue::Text("hello world!"), -1886269529411655687),
            (KeyValue::Text("hello world!!"), 7458898085804086944),
            (KeyValue::Text("héllo wörld ✓ 日本語 🦀"), 7102079514483573114),
            (KeyValue::Text("The quick brown fox jumps over the lazy dog"), 5870222023910117606),
            (KeyValue::Uuid([0; 16]), -5281082146396728638),
            (KeyValue::Uuid(uuid("00112233-4455-6677-8899-aabbccddeeff")), -8699738442285490013),
            (KeyValue::Uuid([0xff; 16]), -148986464341306210),
        ];
        for (v, want) in cases {
            assert_eq!(column_hash(v, SEED_I64) as i64, *want, "{v:?}");
            assert_eq!(partition_hash(v), hash_combine64(0, *want as u64), "{v:?}");
        }
    }

    /// Seed 0 skips the seed mixing; the low 32 bits then equal the classic 32-bit `hashtext`/`hashint4`.
    #[test]
    fn unseeded_matches_server() {
        assert_eq!(hash_bytes_extended(b"abc", 0) as i64, -6747756470228489321);
        assert_eq!(hash_bytes_extended(b"abc", 0) as u32, -785388649_i32 as u32); // hashtext('abc')
        assert_eq!(hash_uint32_extended(42, 0) as i64, 8010225493015854792);
        assert_eq!(hash_uint32_extended(42, 0) as u32, 1509752520); // hashint4(42)
    }

    /// Partitions chosen by a real `PARTITION BY HASH` table with 7 partitions (`tableoid::regclass`).
    #[test]
    fn remainder_matches_server_routing() {
        let u = uuid("00112233-4455-6677-8899-aabbccddeeff");
        let cases: &[(KeyValue, u64)] = &[
            (KeyValue::Int2(-1), 0),
            (KeyValue::Int2(-32768), 0),
            (KeyValue::Int2(12345), 3),
            (KeyValue::Int2(32767), 5),
            (KeyValue::Int4(i32::MIN), 3),
            (KeyValue::Int4(0), 4),
            (KeyValue::Int4(123456789), 4),
            (KeyValue::Int4(1), 5),
            (KeyValue::Int8(i64::MAX), 3),
            (KeyValue::Int8(4294967296), 5),
            (KeyValue::Int8(1234567890123456789), 6),
            (KeyValue::Text(""), 1),
            (KeyValue::Text("héllo wörld ✓ 日本語 🦀"), 1),
            (KeyValue::Text("abc"), 3),
            (KeyValue::Text("hello world!"), 5),
            (KeyValue::Uuid([0xff; 16]), 0),
            (KeyValue::Uuid([0; 16]), 2),
            (KeyValue::Uuid(u), 4),
        ];
        for (v, want) in cases {
            assert_eq!(hash_remainder(v, 7), *want, "{v:?}");
        }
    }

    #[test]
    fn word_and_byte_paths_agree() {
        for k in [0u32, 1, 42, 0xdead_beef, u32::MAX] {
            for seed in [0, 1, HASH_PARTITION_SEED] {
                assert_eq!(hash_uint32_extended(k, seed), hash_bytes_extended(&k.to_le_bytes(), seed));
            }
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        assert_eq!(hash_remainder(&KeyValue::Int4(5), 0), 0);
        assert_eq!(hash_remainder(&KeyValue::Int4(5), 1), 0);
        let _ = hash_remainder(&KeyValue::Text("\0"), u64::MAX);
        let long = "x".repeat(100_003);
        let _ = partition_hash(&KeyValue::Text(&long));
    }
}
