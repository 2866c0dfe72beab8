//! The server side: pools of server connections (checkout, return, the
//! janitor; every pool by database and user in `pools`), one server connection (connect, authenticate, sync settings,
//! reset), and the replica monitor (health and lag of every backend).

pub mod pool;
pub mod pools;
pub mod replicas;
pub mod server;
