//! A set of session settings (name → value): what a client chose, what it
//! was told, what a server connection has applied. Shared, copy on write:
//! thousands of clients with the same startup parameters hold one map (see
//! [`Interner`]), a connection that took a client's settings holds that
//! client's map, and comparing two maps that are one is a pointer check —
//! the checkout's "does this connection have my settings?" on every
//! transaction.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// Session settings, shared until changed.
#[derive(Debug, Clone)]
pub struct Settings(Arc<BTreeMap<String, String>>);

/// The empty set every session and connection starts from: one map for
/// all (no allocation per client for what it was told, per connection
/// for what it applied).
static EMPTY: std::sync::LazyLock<Arc<BTreeMap<String, String>>> = std::sync::LazyLock::new(Arc::default);

impl Default for Settings {
    fn default() -> Settings {
        Settings(EMPTY.clone())
    }
}

impl Settings {
    /// Set `k` to `v` (a copy of the map first if it is shared, unless it
    /// has that value already).
    pub fn set(&mut self, k: String, v: String) {
        if self.0.get(&k) != Some(&v) {
            Arc::make_mut(&mut self.0).insert(k, v);
        }
    }

    pub fn remove(&mut self, k: &str) {
        if self.0.contains_key(k) {
            Arc::make_mut(&mut self.0).remove(k);
        }
    }

    pub fn clear(&mut self) {
        if !self.0.is_empty() {
            self.0 = EMPTY.clone();
        }
    }
}

impl Deref for Settings {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl PartialEq for Settings {
    fn eq(&self, other: &Settings) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl From<BTreeMap<String, String>> for Settings {
    fn from(m: BTreeMap<String, String>) -> Settings {
        Settings(Arc::new(m))
    }
}

/// How many distinct maps an [`Interner`] remembers.
const REMEMBERED: usize = 16;

/// The maps recently seen (e.g. by a pool's logins): an equal map is
/// given back as the one already held, so clients that log in alike share
/// their settings.
#[derive(Debug, Default)]
pub struct Interner(Mutex<Vec<Settings>>);

impl Interner {
    pub fn intern(&self, s: Settings) -> Settings {
        let Ok(mut seen) = self.0.lock() else { return s };
        if let Some(at) = seen.iter().position(|x| *x == s) {
            let found = seen.remove(at);
            seen.push(found.clone());
            return found;
        }
        if seen.len() >= REMEMBERED {
            seen.remove(0);
        }
        seen.push(s.clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> Settings {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>().into()
    }

    #[test]
    fn shared_until_changed() {
        let a = map(&[("datestyle", "ISO")]);
        let mut b = a.clone();
        assert!(Arc::ptr_eq(&a.0, &b.0));
        b.set("datestyle".into(), "ISO".into());
        assert!(Arc::ptr_eq(&a.0, &b.0), "the same value copies nothing");
        b.set("datestyle".into(), "SQL".into());
        assert_eq!(a.get("datestyle").map(String::as_str), Some("ISO"));
        assert_eq!(b.get("datestyle").map(String::as_str), Some("SQL"));
        assert!(a != b);
        b.remove("datestyle");
        b.remove("nothing");
        assert!(b.is_empty());
    }

    #[test]
    fn empty_sets_are_one_map() {
        let (a, mut b) = (Settings::default(), Settings::default());
        assert!(Arc::ptr_eq(&a.0, &b.0), "no allocation per empty set");
        b.set("x".into(), "1".into());
        assert!(a.is_empty() && b.len() == 1, "the shared empty map is never written");
        b.clear();
        assert!(Arc::ptr_eq(&a.0, &b.0));
    }

    #[test]
    fn equal_maps_are_interned_as_one() {
        let i = Interner::default();
        let a = i.intern(map(&[("x", "1")]));
        let b = i.intern(map(&[("x", "1")]));
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let c = i.intern(map(&[("x", "2")]));
        assert!(!Arc::ptr_eq(&a.0, &c.0));
        for n in 0..REMEMBERED * 2 {
            i.intern(map(&[("n", &n.to_string())]));
        }
        assert!(i.0.lock().map(|s| s.len()).unwrap_or(0) <= REMEMBERED);
    }
}
