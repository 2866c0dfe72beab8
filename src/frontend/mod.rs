//! The client side: the listener, login (startup packet, TLS negotiation, client
//! authentication, `auth_query`), cancel keys, the registry of the clients
//! connected now, the session that serves one client after login, and
//! the spare read buffers sessions share.

pub mod authquery;
pub mod buffers;
pub mod cancel;
pub mod listener;
pub mod login;
pub mod registry;
pub mod session;
