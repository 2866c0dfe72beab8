//! The admin console's command language: PgBouncer's words (`SHOW POOLS`,
//! `PAUSE db`, ...) plus pgmux's own (`SHARD MOVE`), parsed from a simple
//! Query's text.

use std::time::Duration;

use crate::protocol::error::{sqlstate, PgError};

/// One console command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `SHOW what` (lowercased).
    Show(String),
    /// `SET ...`: accepted and ignored (drivers set things at start).
    Set,
    /// `SHARD MOVE database map key TO shard [GRACE ms]`.
    ShardMove { database: String, map: String, key: String, to: String, grace: Duration },
    /// `PAUSE [db]`: hold new transactions, wait for running ones.
    Pause(Option<String>),
    /// `RESUME [db]`.
    Resume(Option<String>),
    /// `KILL db`: drop its clients and server connections.
    Kill(String),
    /// `RECONNECT [db]`: replace its server connections.
    Reconnect(Option<String>),
    /// `BAN replica` / `UNBAN replica` (true: ban).
    Ban(String, bool),
    /// `RELOAD`: re-read the config file.
    Reload,
    /// `SHUTDOWN`: stop gracefully.
    Shutdown,
    /// Nothing (an empty query).
    Empty,
}

impl Command {
    /// Changes state (not for stats-only users).
    pub fn is_admin(&self) -> bool {
        !matches!(self, Command::Show(_) | Command::Set | Command::Empty)
    }
}

/// What the console knows, for error hints.
pub const HELP: &str =
    "SHOW POOLS | CLIENTS | SERVERS | STATS | DATABASES | CONFIG | REPLICAS | SHARDS | ROUTES | VERSION | HELP; \
     PAUSE [db]; RESUME [db]; KILL db; RECONNECT [db]; BAN replica; UNBAN replica; RELOAD; SHUTDOWN; \
     SHARD MOVE database map key TO shard [GRACE ms]";

fn syntax(message: impl Into<String>) -> PgError {
    PgError::error(sqlstate::SYNTAX_ERROR, message).with_hint(format!("Commands: {HELP}"))
}

/// Words of a command: bare words lowercased, 'literals' and "identifiers"
/// as written.
fn words(sql: &str) -> Result<Vec<String>, PgError> {
    let mut out = Vec::new();
    let mut chars = sql.trim().trim_end_matches(';').chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '\'' || c == '"' {
            chars.next();
            let mut word = String::new();
            loop {
                match chars.next() {
                    Some(q) if q == c && chars.peek() == Some(&c) => {
                        chars.next();
                        word.push(c);
                    }
                    Some(q) if q == c => break,
                    Some(other) => word.push(other),
                    None => return Err(syntax("unterminated quoted string")),
                }
            }
            out.push(word);
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c.to_ascii_lowercase());
                chars.next();
            }
            out.push(word);
        }
    }
    Ok(out)
}

/// Parse one command (the text of one statement).
pub fn parse(sql: &str) -> Result<Command, PgError> {
    let w = words(sql)?;
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    match w.as_slice() {
        [] => Ok(Command::Empty),
        ["show", what] => Ok(Command::Show(what.to_string())),
        ["show", ..] => Err(syntax("SHOW takes one word")),
        ["set", ..] => Ok(Command::Set),
        ["pause"] => Ok(Command::Pause(None)),
        ["pause", db] => Ok(Command::Pause(Some(db.to_string()))),
        ["resume"] => Ok(Command::Resume(None)),
        ["resume", db] => Ok(Command::Resume(Some(db.to_string()))),
        ["kill", db] => Ok(Command::Kill(db.to_string())),
        ["reconnect"] => Ok(Command::Reconnect(None)),
        ["reconnect", db] => Ok(Command::Reconnect(Some(db.to_string()))),
        ["ban", replica] => Ok(Command::Ban(replica.to_string(), true)),
        ["unban", replica] => Ok(Command::Ban(replica.to_string(), false)),
        ["reload"] => Ok(Command::Reload),
        ["shutdown"] => Ok(Command::Shutdown),
        [w @ ("pause" | "resume" | "kill" | "reconnect" | "ban" | "unban" | "reload" | "shutdown"), ..] => {
            Err(syntax(format!("wrong arguments for {}", w.to_uppercase())))
        }
        ["shard", "move", database, map, key, "to", to, rest @ ..] => {
            let grace = match rest {
                [] => Duration::from_secs(1),
                ["grace", ms] => Duration::from_millis(ms.parse().map_err(|_| syntax("GRACE takes milliseconds"))?),
                _ => return Err(syntax("SHARD MOVE database map key TO shard [GRACE ms]")),
            };
            Ok(Command::ShardMove {
                database: database.to_string(),
                map: map.to_string(),
                key: key.to_string(),
                to: to.to_string(),
                grace,
            })
        }
        ["shard", ..] => Err(syntax("SHARD MOVE database map key TO shard [GRACE ms]")),
        [first, ..] => Err(syntax(format!("unknown admin command \"{first}\""))),
    }
}

/// The statements of a Query's text, split at semicolons outside quotes.
pub fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote) = (0, None);
    for (i, c) in sql.char_indices() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            (';', None) => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.retain(|s| !s.trim().is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse("show POOLS;").unwrap(), Command::Show("pools".into()));
        assert_eq!(parse("  ").unwrap(), Command::Empty);
        assert_eq!(parse("SET application_name = 'psql'").unwrap(), Command::Set);
        assert_eq!(
            parse("SHARD MOVE shop by_tenant 'Acme ''Inc''' TO s1 GRACE 200").unwrap(),
            Command::ShardMove {
                database: "shop".into(),
                map: "by_tenant".into(),
                key: "Acme 'Inc'".into(),
                to: "s1".into(),
                grace: Duration::from_millis(200),
            }
        );
        let e = parse("FROB").unwrap_err();
        assert_eq!(e.code, sqlstate::SYNTAX_ERROR);
        assert!(parse("SHARD MOVE shop m k TO").is_err());
        assert!(parse("SHOW 'unterminated").is_err());
        assert!(!parse("SHOW x").unwrap().is_admin());
        assert!(parse("SHARD MOVE a b c TO d").unwrap().is_admin());
        assert_eq!(parse("pause shop").unwrap(), Command::Pause(Some("shop".into())));
        assert_eq!(parse("RESUME").unwrap(), Command::Resume(None));
        assert_eq!(parse("BAN \"db/replica1\"").unwrap(), Command::Ban("db/replica1".into(), true));
        assert_eq!(parse("unban db/replica1").unwrap(), Command::Ban("db/replica1".into(), false));
        assert!(parse("KILL").is_err());
        assert!(parse("RELOAD now").is_err());
    }

    #[test]
    fn splits_statements() {
        assert_eq!(statements("SHOW a; SHOW 'b;c';"), vec!["SHOW a", " SHOW 'b;c'"]);
        assert!(statements(" ; ").is_empty());
    }
}
