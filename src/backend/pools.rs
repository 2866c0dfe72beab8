//! Every pool pgmux has, by (database, user), created on first use and
//! retired on reload; and the statement invalidations each server database
//! shares between its pools.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::pool::Pool;
use crate::protocol::statements::Invalidations;

/// All pools, created on first use.
#[derive(Default)]
pub struct Pools {
    /// Statement invalidations by server database name.
    invalidations: Mutex<HashMap<String, Arc<Invalidations>>>,
    map: Mutex<HashMap<(String, String), Arc<Pool>>>,
}

impl Pools {
    /// The statement invalidations of server database `dbname`, shared by
    /// every pool on it (DDL through one pool stales the statements of all).
    pub fn invalidations(&self, dbname: &str) -> Arc<Invalidations> {
        let mut m = self.invalidations.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(dbname.to_string()).or_default().clone()
    }

    pub fn get_or_create(&self, database: &str, user: &str, make: impl FnOnce() -> Arc<Pool>) -> Arc<Pool> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry((database.to_string(), user.to_string())).or_insert_with(make).clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Take the pools `retire` picks out of use (reload): they are drained —
    /// idle connections closed now, the others when given back — and new
    /// checkouts go to pools made afresh.
    pub fn retire(&self, mut retire: impl FnMut(&Pool) -> bool) -> usize {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<_> = map.iter().filter(|(_, p)| retire(p)).map(|(k, _)| k.clone()).collect();
        for k in &gone {
            if let Some(p) = map.remove(k) {
                p.retired.store(true, Ordering::Relaxed);
                p.reconnect();
            }
        }
        gone.len()
    }
}
