//! The client side: login (startup packet, TLS negotiation, client
//! authentication, `auth_query`), cancel keys, the registry of the clients
//! connected now, and the session that serves one client after login.

pub mod authquery;
pub mod cancel;
pub mod login;
pub mod registry;
pub mod session;
