//! PostgreSQL password authentication for pgmux, in both directions, sans-IO.
//!
//! Client-facing (pgmux acting as the *server*): verify connecting clients with
//! SCRAM-SHA-256 ([`ScramServer`]), md5 ([`md5_verify`]) or cleartext
//! ([`cleartext_verify`]) against a configured [`Secret`] (plain text, a PostgreSQL
//! md5 hash, or a SCRAM verifier in `pg_authid` format).
//!
//! Server-facing (pgmux acting as the *client* towards PostgreSQL): log in with
//! SCRAM-SHA-256 ([`ScramClient`]) or md5 ([`md5_salted_response`]). SCRAM supports
//! "ClientKey passthrough": while verifying a client, [`ScramServer`] recovers its
//! ClientKey (ClientProof XOR ClientSignature); together with the stored verifier
//! (salt, iterations, StoredKey, ServerKey) that is enough to compute a valid proof
//! for PostgreSQL, so pgmux can log in without ever knowing the plain password.
//!
//! Message formats follow RFC 5802 / RFC 7677 as implemented by PostgreSQL: no
//! channel binding (`SCRAM-SHA-256-PLUS` is not offered), the `n=` username is
//! ignored, and passwords are SASLprep'ed with a fallback to raw bytes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use rand::RngCore;
use sha2::Sha256;

/// The only SASL mechanism pgmux supports.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";
const DEFAULT_ITERATIONS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("malformed authentication message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SASL mechanism {0:?}")]
    UnsupportedMechanism(String),
    #[error("SCRAM channel binding is not supported")]
    ChannelBindingUnsupported,
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("invalid SCRAM client proof")]
    InvalidProof,
    #[error("SCRAM server signature mismatch")]
    ServerSignatureMismatch,
    #[error("server's SCRAM salt/iterations differ from the stored verifier")]
    VerifierMismatch,
    #[error("SCRAM server error: {0}")]
    ServerError(String),
}

/// A secret as written in pgmux's config: plain text, PostgreSQL md5 hash ("md5" + 32
/// lowercase hex), or a SCRAM verifier as pg_authid stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    Md5(String),
    Scram(ScramVerifier),
}

impl Secret {
    /// "md5"+32 hex → Md5; "SCRAM-SHA-256$..." → Scram (Err if that prefix but
    /// malformed); anything else → Plain.
    pub fn parse(s: &str) -> Result<Secret, AuthError> {
        if is_md5_hash(s) {
            Ok(Secret::Md5(s.to_string()))
        } else if s.starts_with(VERIFIER_PREFIX) {
            ScramVerifier::parse(s).map(Secret::Scram)
        } else {
            Ok(Secret::Plain(s.to_string()))
        }
    }

    /// For SCRAM verification of clients: Plain → derive a verifier with a random
    /// 16-byte salt and 4096 iterations (caller caches it); Scram → clone; Md5 → None
    /// (md5 hashes can't do SCRAM, like PostgreSQL).
    pub fn scram_verifier(&self) -> Option<ScramVerifier> {
        match self {
            Secret::Plain(p) => {
                let salt = random_bytes::<16>();
                Some(ScramVerifier::from_password(p, &salt, DEFAULT_ITERATIONS))
            }
            Secret::Md5(_) => None,
            Secret::Scram(v) => Some(v.clone()),
        }
    }
}

fn is_md5_hash(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A SCRAM-SHA-256 verifier (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let bad = AuthError::Malformed("invalid SCRAM verifier");
        let rest = s.strip_prefix(VERIFIER_PREFIX).ok_or(bad)?;
        let bad = || AuthError::Malformed("invalid SCRAM verifier");
        let (iter_salt, keys) = rest.split_once('$').ok_or_else(bad)?;
        let (iter, salt) = iter_salt.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        let iterations: u32 = iter.parse().map_err(|_| bad())?;
        let salt = B64.decode(salt).map_err(|_| bad())?;
        if iterations == 0 || salt.is_empty() {
            return Err(bad());
        }
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored).ok_or_else(bad)?,
            server_key: decode_key(server).ok_or_else(bad)?,
        })
    }

    /// Derive a verifier like PostgreSQL does: SASLprep the password, falling back
    /// to the raw bytes if SASLprep rejects it.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }
}

impl std::fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

fn decode_key(s: &str) -> Option<[u8; 32]> {
    B64.decode(s).ok()?.try_into().ok()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC zero-pads keys up to the block size (64) and hashes longer ones, so doing
    // that here is equivalent and lets us use the infallible fixed-size constructor.
    let mut k = [0u8; 64];
    if key.len() > k.len() {
        k[..32].copy_from_slice(&sha256(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&k.into());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SaltedPassword = Hi(SASLprep(password), salt, i) (PBKDF2-HMAC-SHA-256, one block).
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepped = stringprep::saslprep(password);
    let pw = match &prepped {
        Ok(p) => p.as_bytes(),
        Err(_) => password.as_bytes(),
    };
    let mut u = hmac(pw, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(pw, &[&u]);
        out = xor(&out, &u);
    }
    out
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Constant-time equality (the length itself is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// "md5" + hex(md5(password ++ user)), as stored in pg_authid.
pub fn md5_password_hash(user: &str, password: &str) -> String {
    format!("md5{}", md5_hex(&[password.as_bytes(), user.as_bytes()]))
}

/// What a client sends in PasswordMessage for md5 auth:
/// "md5" + hex(md5(hex_part_of(md5_hash) ++ salt)).
pub fn md5_salted_response(md5_hash: &str, salt: [u8; 4]) -> String {
    let hex = md5_hash.strip_prefix("md5").unwrap_or(md5_hash);
    format!("md5{}", md5_hex(&[hex.as_bytes(), &salt]))
}

/// Verify a client's md5 PasswordMessage (without trailing NUL) against a Plain or Md5
/// secret. Scram secret → false. Constant-time compare.
pub fn md5_verify(secret: &Secret, user: &str, salt: [u8; 4], response: &str) -> bool {
    let expected = match secret {
        Secret::Plain(p) => md5_salted_response(&md5_password_hash(user, p), salt),
        Secret::Md5(h) => md5_salted_response(h, salt),
        Secret::Scram(_) => return false,
    };
    ct_eq(expected.as_bytes(), response.as_bytes())
}

/// Verify a cleartext password (PasswordMessage) against any secret kind.
/// Constant-time compares.
pub fn cleartext_verify(secret: &Secret, user: &str, password: &str) -> bool {
    match secret {
        Secret::Plain(p) => ct_eq(p.as_bytes(), password.as_bytes()),
        Secret::Md5(h) => ct_eq(h.as_bytes(), md5_password_hash(user, password).as_bytes()),
        Secret::Scram(v) => {
            let derived = ScramVerifier::from_password(password, &v.salt, v.iterations);
            ct_eq(&derived.stored_key, &v.stored_key)
        }
    }
}

/// Value of the `name=value` attribute `part` of a SCRAM message, else `Malformed(err)`.
/// Mandatory extensions ("m=") are not supported (PostgreSQL rejects them too).
fn attr<'a>(part: Option<&'a str>, name: u8, err: &'static str) -> Result<&'a str, AuthError> {
    match part {
        Some(p) if p.starts_with("m=") => Err(AuthError::Malformed("SCRAM extensions unsupported")),
        Some(p) if p.as_bytes().get(..2) == Some(&[name, b'=']) => Ok(&p[2..]),
        _ => Err(AuthError::Malformed(err)),
    }
}

fn b64(s: &str, err: &'static str) -> Result<Vec<u8>, AuthError> {
    B64.decode(s).map_err(|_| AuthError::Malformed(err))
}

fn utf8(data: &[u8]) -> Result<&str, AuthError> {
    std::str::from_utf8(data).map_err(|_| AuthError::Malformed("SCRAM message is not UTF-8"))
}

/// RFC 5802 `printable`: 0x21..=0x7E except ','.
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

enum ServerState {
    Initial,
    FirstSent { gs2_header: String, client_first_bare: String, server_first: String, nonce: String },
    Done,
}

/// Server side of SCRAM-SHA-256 (pgmux authenticating a connecting client). Sans-IO.
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    state: ServerState,
}

impl ScramServer {
    pub fn new(verifier: ScramVerifier) -> Self {
        Self::with_nonce(verifier, &B64.encode(random_bytes::<18>()))
    }

    fn with_nonce(verifier: ScramVerifier, server_nonce: &str) -> Self {
        ScramServer { verifier, server_nonce: server_nonce.to_string(), state: ServerState::Initial }
    }

    /// Handle SASLInitialResponse: `mechanism` must be "SCRAM-SHA-256", `data` is the
    /// client-first-message. Returns the server-first-message.
    pub fn handle_client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(std::mem::replace(&mut self.state, ServerState::Done), ServerState::Initial) {
            return Err(AuthError::Malformed("unexpected client-first-message"));
        }
        if mechanism != SCRAM_SHA_256 {
            return Err(AuthError::UnsupportedMechanism(mechanism.to_string()));
        }
        let msg = utf8(data)?;
        // gs2 header: "n" (no channel binding) or "y" (client could, but we didn't offer
        // it); "p=..." demands channel binding. An authzid is not supported.
        let (gs2_header, bare) = match msg.get(..3) {
            Some(h @ ("n,," | "y,,")) => (h, &msg[3..]),
            _ if msg.starts_with("p=") => return Err(AuthError::ChannelBindingUnsupported),
            _ => return Err(AuthError::Malformed("invalid gs2 header or authzid")),
        };
        let mut parts = bare.split(',');
        attr(parts.next(), b'n', "missing username")?; // ignored, like PostgreSQL
        let client_nonce = attr(parts.next(), b'r', "missing nonce")?;
        if !valid_nonce(client_nonce) {
            return Err(AuthError::Malformed("invalid client nonce"));
        }
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let v = &self.verifier;
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&v.salt), v.iterations);
        self.state = ServerState::FirstSent {
            gs2_header: gs2_header.to_string(),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first.into_bytes())
    }

    /// Handle the client-final-message. Returns the server-final-message and the
    /// client's recovered ClientKey (for passthrough).
    pub fn handle_client_final(&mut self, data: &[u8]) -> Result<(Vec<u8>, [u8; 32]), AuthError> {
        let ServerState::FirstSent { gs2_header, client_first_bare, server_first, nonce } =
            std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(AuthError::Malformed("unexpected client-final-message"));
        };
        let msg = utf8(data)?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(AuthError::Malformed("missing client proof"))?;
        let mut parts = without_proof.split(',');
        let cbind = attr(parts.next(), b'c', "missing channel binding")?;
        if b64(cbind, "invalid channel binding")? != gs2_header.as_bytes() {
            return Err(AuthError::Malformed("channel binding data mismatch"));
        }
        if attr(parts.next(), b'r', "missing nonce")? != nonce {
            return Err(AuthError::NonceMismatch);
        }
        let proof: [u8; 32] = b64(proof, "invalid client proof")?
            .try_into()
            .map_err(|_| AuthError::Malformed("invalid client proof length"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &client_signature);
        if !ct_eq(&sha256(&client_key), &self.verifier.stored_key) {
            return Err(AuthError::InvalidProof);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        let server_final = format!("v={}", B64.encode(server_signature));
        Ok((server_final.into_bytes(), client_key))
    }
}

/// Credentials pgmux uses to log into PostgreSQL over SCRAM.
#[derive(Clone, Debug)]
pub enum ScramCredentials {
    Password(String),
    ClientKey { client_key: [u8; 32], verifier: ScramVerifier },
}

/// Client side of SCRAM-SHA-256 (pgmux → PostgreSQL). Sans-IO.
pub struct ScramClient {
    creds: ScramCredentials,
    client_first_bare: String,
    nonce: String,
    /// Expected ServerSignature once the client-final-message has been produced.
    server_signature: Option<[u8; 32]>,
    first_handled: bool,
}

impl ScramClient {
    pub fn new(creds: ScramCredentials) -> Self {
        Self::with_nonce(creds, "", &B64.encode(random_bytes::<18>()))
    }

    /// `user` must not contain ',' or '=' (only used by tests; PostgreSQL ignores it).
    fn with_nonce(creds: ScramCredentials, user: &str, nonce: &str) -> Self {
        ScramClient {
            creds,
            client_first_bare: format!("n={user},r={nonce}"),
            nonce: nonce.to_string(),
            server_signature: None,
            first_handled: false,
        }
    }

    /// The client-first-message: "n,,n=,r=<nonce>".
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Handle the server-first-message (its nonce must extend ours); returns the
    /// client-final-message. With `ClientKey` credentials the server's salt and
    /// iteration count must equal the verifier's (else `VerifierMismatch`); the proof is
    /// ClientKey XOR HMAC(StoredKey, AuthMessage) with StoredKey = SHA256(ClientKey).
    pub fn handle_server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        if std::mem::replace(&mut self.first_handled, true) {
            return Err(AuthError::Malformed("unexpected server-first-message"));
        }
        let msg = utf8(data)?;
        let mut parts = msg.split(',');
        let nonce = attr(parts.next(), b'r', "missing nonce")?;
        if !valid_nonce(nonce) || nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(AuthError::NonceMismatch);
        }
        let salt = b64(attr(parts.next(), b's', "missing salt")?, "invalid salt")?;
        let iterations: u32 = attr(parts.next(), b'i', "missing iteration count")?
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(AuthError::Malformed("invalid iteration count"))?;

        let (client_key, stored_key, server_key) = match &self.creds {
            ScramCredentials::Password(pw) => {
                let salted = salted_password(pw, &salt, iterations);
                let ck = hmac(&salted, &[b"Client Key"]);
                (ck, sha256(&ck), hmac(&salted, &[b"Server Key"]))
            }
            ScramCredentials::ClientKey { client_key, verifier } => {
                let stored = sha256(client_key);
                if salt != verifier.salt || iterations != verifier.iterations || !ct_eq(&stored, &verifier.stored_key) {
                    return Err(AuthError::VerifierMismatch);
                }
                (*client_key, stored, verifier.server_key)
            }
        };
        let without_proof = format!("c={},r={nonce}", B64.encode("n,,"));
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let proof = xor(&client_key, &hmac(&stored_key, &[auth_message.as_bytes()]));
        self.server_signature = Some(hmac(&server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Verify the server-final-message ("v=" signature, or "e=" error).
    pub fn handle_server_final(&self, data: &[u8]) -> Result<(), AuthError> {
        let expected = self.server_signature.ok_or(AuthError::Malformed("unexpected server-final-message"))?;
        let msg = utf8(data)?;
        let first = msg.split(',').next();
        if let Ok(err) = attr(first, b'e', "") {
            return Err(AuthError::ServerError(err.to_string()));
        }
        let sig = attr(first, b'v', "missing server signature")?;
        if !ct_eq(&b64(sig, "invalid server signature")?, &expected) {
            return Err(AuthError::ServerSignatureMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
