//! SCRAM-SHA-256 both ways on arbitrary messages: the server side never
//! panics and never accepts a final message it did not derive; the client
//! side never panics on what a server sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmux::protocol::auth::{ScramClient, ScramCredentials, ScramServer, ScramVerifier};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (first, last) = data.split_at(split);
    // Few iterations: the exchange, not the key derivation, is under test.
    let verifier = ScramVerifier::from_password("pw", b"saltsaltsalt", 16);
    let mut server = ScramServer::new(verifier.clone());
    let _ = server.handle_client_first("SCRAM-SHA-256", first);
    let _ = server.handle_client_final(last);
    let mut server = ScramServer::new(verifier);
    let client = ScramClient::new(ScramCredentials::Password("pw".into()));
    if server.handle_client_first("SCRAM-SHA-256", &client.client_first()).is_ok() {
        assert!(server.handle_client_final(last).is_err(), "a forged client-final accepted");
    }
    let mut client = ScramClient::new(ScramCredentials::Password("pw".into()));
    let _ = client.handle_server_first(first);
    let _ = client.handle_server_final(last);
});
