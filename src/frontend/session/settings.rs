//! A client's session settings in transaction mode: `SET` / `RESET` seen
//! in its queries mark the server connection for re-sync at once (nothing
//! leaks to the next client) and become the client's own once the server
//! confirms them, to follow it to every server connection it gets.

use super::{Session, UNKNOWN_SETTING};
use crate::backend::server::ServerConn;
use crate::protocol::messages::TxStatus;
use crate::sql::effects;

/// A server reply that decides whether pending SET/RESETs took effect.
#[derive(Debug, Clone, Copy)]
pub(super) enum Settle {
    /// An ErrorResponse: the transaction (and its SETs) will not commit.
    Error,
    /// A ROLLBACK completed.
    Rollback,
    /// ReadyForQuery with this status.
    Ready(TxStatus),
}

impl Session {
    /// A client's SET/RESET in transaction mode: this server is marked for
    /// re-sync at once (nothing leaks to the next client); the client's own
    /// settings change when the server confirms (ReadyForQuery idle, no
    /// error, no rollback), and then follow it to every server it gets.
    pub(super) fn note_settings(&mut self, conn: &mut ServerConn, changes: Vec<effects::SettingChange>) {
        use effects::SettingChange;
        for change in &changes {
            let keys: Vec<String> = match change {
                SettingChange::Set { name, .. } | SettingChange::Reset(name) => vec![name.to_ascii_lowercase()],
                SettingChange::ResetAll => conn.applied.keys().chain(self.startup.keys()).cloned().collect(),
            };
            for k in keys {
                conn.applied.set(k, UNKNOWN_SETTING.to_string());
            }
        }
        self.pending_settings.extend(changes);
    }

    /// Settle pending SET/RESETs on the server's replies.
    pub(super) fn settle_settings(&mut self, events: &[Settle]) {
        use effects::SettingChange;
        for ev in events {
            match ev {
                Settle::Error | Settle::Rollback | Settle::Ready(TxStatus::Failed) => self.settings_failed = true,
                Settle::Ready(TxStatus::Idle) => {
                    let changes = std::mem::take(&mut self.pending_settings);
                    if !std::mem::take(&mut self.settings_failed) {
                        for change in changes {
                            match change {
                                SettingChange::Set { name, value: Some(v) } => {
                                    self.wanted.set(name.to_ascii_lowercase(), v);
                                }
                                SettingChange::Set { name, value: None } | SettingChange::Reset(name) => {
                                    let k = name.to_ascii_lowercase();
                                    match self.startup.get(&k) {
                                        Some(v) => self.wanted.set(k, v.clone()),
                                        None => self.wanted.remove(&k),
                                    };
                                }
                                SettingChange::ResetAll => self.wanted = self.startup.clone(),
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
