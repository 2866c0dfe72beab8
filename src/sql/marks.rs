//! The one pass over every statement text pgmux relays: which of the words
//! pooling watches for begin a word of it ([`Marks`]). A statement with
//! none of them (nearly every one) needs no other look: it changes no
//! session state and reads no prepared-statement view. The passes that
//! find what a marked statement does ([`crate::sql::effects`], the
//! `pg_prepared_statements` rewrite) run only on marked ones.
//!
//! A word starts at an ASCII letter, digit, `_` or `$` that does not follow
//! one; quotes and comments are not skipped (a word inside them marks the
//! statement too: the later passes decide, the marks only rule out).

/// A watched word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Set,
    Reset,
    Role,
    Authorization,
    Characteristics,
    Listen,
    Load,
    Temp,
    Hold,
    Prepare,
    Advisory,
    TryAdvisory,
    /// `pg_prepared_statement` (the view, or the function behind it).
    PreparedView,
}

/// The words, in [`Mark`]'s order (lowercase ASCII).
const WORDS: [&[u8]; 13] = [
    b"set",
    b"reset",
    b"role",
    b"authorization",
    b"characteristics",
    b"listen",
    b"load",
    b"temp",
    b"hold",
    b"prepare",
    b"pg_advisory",
    b"pg_try_advisory",
    b"pg_prepared_statement",
];

/// The marks that may change session state ([`crate::sql::effects`]).
const EFFECTS: u16 = (1 << WORDS.len()) - 1 - (1 << Mark::PreparedView as u16);

/// For each of a word's first three positions and each byte, the words
/// with that byte there (either case): every watched word is at least
/// three bytes long, so a word of the text is compared with the words its
/// first three bytes leave, nearly always none.
const AT: [[u16; 256]; 3] = {
    let mut t = [[0u16; 256]; 3];
    let mut i = 0;
    while i < WORDS.len() {
        let mut p = 0;
        while p < 3 {
            let c = WORDS[i][p];
            t[p][c as usize] |= 1 << i;
            t[p][c.to_ascii_uppercase() as usize] |= 1 << i;
            p += 1;
        }
        i += 1;
    }
    t
};

/// Bytes that continue a word.
const IDENT: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
        c += 1;
    }
    t
};

/// Which watched words begin a word of a statement text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks(u16);

impl Marks {
    /// The one pass: look only where a word begins, and compare only the
    /// words that begin with its first three bytes.
    pub fn of(sql: &[u8]) -> Marks {
        let at = |i: usize| sql.get(i).map_or(0, |&c| c as usize);
        let mut found = 0u16;
        let mut i = 0;
        while i < sql.len() {
            if !IDENT[sql[i] as usize] {
                i += 1;
                continue;
            }
            let mut candidates = AT[0][at(i)] & AT[1][at(i + 1)] & AT[2][at(i + 2)] & !found;
            while candidates != 0 {
                let w = candidates.trailing_zeros() as usize;
                candidates &= candidates - 1;
                let word = WORDS[w];
                if sql.get(i..i + word.len()).is_some_and(|t| t.eq_ignore_ascii_case(word)) {
                    found |= 1 << w;
                }
            }
            i += 1;
            while i < sql.len() && IDENT[sql[i] as usize] {
                i += 1;
            }
        }
        Marks(found)
    }

    pub fn has(self, mark: Mark) -> bool {
        self.0 & (1 << mark as u16) != 0
    }

    /// Whether the statement may change session state.
    pub fn effects(self) -> bool {
        self.0 & EFFECTS != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_where_a_word_begins_in_any_case() {
        let m = Marks::of(b"x LiStEn y");
        assert!(m.has(Mark::Listen) && m.effects());
        let m = Marks::of(b"SELECT pg_catalog.set_config('a', 'b', false)");
        assert!(m.has(Mark::Set) && !m.has(Mark::Reset));
        let m = Marks::of(b"SELECT * FROM pg_catalog.pg_prepared_statements");
        assert!(m.has(Mark::PreparedView) && !m.effects());
        assert!(Marks::of(b"select pg_try_advisory_lock(1)").has(Mark::TryAdvisory));
        assert!(Marks::of(b"SET ROLE x").has(Mark::Role));
        assert!(Marks::of(b"\"set\"").has(Mark::Set));
    }

    #[test]
    fn nothing_inside_a_word_or_in_plain_statements() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "SELECT offset_x FROM unset",
            "SELECT xpg_prepared_statement, my_temp, 1set FROM t",
            "",
            "s",
            "pg_prepared",
        ] {
            assert_eq!(Marks::of(sql.as_bytes()), Marks::default(), "{sql}");
        }
    }

    #[test]
    fn every_word_is_found_and_only_it() {
        for (i, w) in WORDS.iter().enumerate() {
            let sql = format!("select 1; {} x", String::from_utf8_lossy(w).to_uppercase());
            let m = Marks::of(sql.as_bytes());
            assert_eq!(m.0, 1 << i, "{sql}");
        }
    }

    #[test]
    fn non_ascii_bytes_end_a_word() {
        // As PostgreSQL's identifiers may hold them, but the marks only rule
        // out: a word after one is looked at.
        assert!(Marks::of("éset".as_bytes()).has(Mark::Set));
    }
}
