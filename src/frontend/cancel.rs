//! Cancel keys: pgmux hands each client its own BackendKeyData and maps it
//! to the server connection currently running that client's query. The
//! secret is always pgmux's own; the pid is random in transaction mode and
//! the real backend pid of the client's server connection in session mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::backend::server::CancelKey;

/// Where a client's cancel goes right now: (server, backend pid, secret).
#[derive(Default)]
pub struct CancelSlot(Mutex<Option<CancelKey>>);

impl CancelSlot {
    pub fn set(&self, target: CancelKey) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(target);
        }
    }

    pub fn clear(&self) {
        if let Ok(mut s) = self.0.lock() {
            *s = None;
        }
    }

    pub fn get(&self) -> Option<CancelKey> {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// Removes the client's key from the registry when the client goes.
pub struct CancelGuard<'a> {
    registry: &'a CancelRegistry,
    key: (i32, i32),
    pub slot: Arc<CancelSlot>,
}

impl CancelGuard<'_> {
    pub fn key(&self) -> (i32, i32) {
        self.key
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.map.lock() {
            m.remove(&self.key);
        }
    }
}

impl CancelRegistry {
    /// A fresh, unique (pid, secret) for a client.
    pub fn register(&self) -> CancelGuard<'_> {
        self.register_with(|| rand::random::<i32>() & 0x7fff_ffff)
    }

    /// A unique key whose pid is `pid` (the backend pid of the server
    /// connection the client keeps, in session mode) and whose secret is
    /// pgmux's own: a pid may repeat across servers, the secret keeps the
    /// keys apart.
    pub fn register_pid(&self, pid: i32) -> CancelGuard<'_> {
        self.register_with(|| pid)
    }

    fn register_with(&self, pid: impl Fn() -> i32) -> CancelGuard<'_> {
        let slot = Arc::new(CancelSlot::default());
        loop {
            let key = (pid(), rand::random::<i32>());
            let Ok(mut m) = self.map.lock() else {
                return CancelGuard { registry: self, key, slot };
            };
            if let std::collections::hash_map::Entry::Vacant(e) = m.entry(key) {
                e.insert(slot.clone());
                return CancelGuard { registry: self, key, slot };
            }
        }
    }

    /// Where a CancelRequest with this key should go, if anywhere.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelKey> {
        let slot = self.map.lock().ok()?.get(&(pid, secret)).cloned()?;
        slot.get()
    }
}
