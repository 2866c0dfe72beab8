use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use AuthError as E;

const RFC_CF: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const RFC_SF: &[u8] = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CFINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                            p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const RFC_SFINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

fn verifier(pw: &str) -> ScramVerifier {
    ScramVerifier::from_password(pw, b"0123456789abcdef", 4096)
}

fn pw(p: &str) -> ScramCredentials {
    ScramCredentials::Password(p.into())
}

/// Runs a full exchange (including the client's server-final check); returns the
/// ClientKey recovered by the server.
fn exchange(client: &mut ScramClient, server: &mut ScramServer) -> Result<[u8; 32], E> {
    let sf = server.handle_client_first(SCRAM_SHA_256, &client.client_first())?;
    let (fin, key) = server.handle_client_final(&client.handle_server_first(&sf)?)?;
    client.handle_server_final(&fin)?;
    Ok(key)
}

#[test]
fn rfc7677_vector() {
    let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    let v = ScramVerifier::from_password("pencil", &salt, 4096);
    let mut server = ScramServer::with_nonce(v.clone(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
    assert_eq!(server.handle_client_first(SCRAM_SHA_256, RFC_CF).unwrap(), RFC_SF);
    let (fin, key) = server.handle_client_final(RFC_CFINAL).unwrap();
    assert_eq!((fin.as_slice(), sha256(&key)), (RFC_SFINAL, v.stored_key));

    let mut client = ScramClient::with_nonce(pw("pencil"), "user", "rOprNGfwEbeRWgbNEkqO");
    assert_eq!(client.client_first(), RFC_CF);
    assert_eq!(client.handle_server_first(RFC_SF).unwrap(), RFC_CFINAL);
    client.handle_server_final(RFC_SFINAL).unwrap();
}

#[test]
fn verifier_roundtrip_and_postgres_protocol_compat() {
    let v = verifier("secret");
    assert_eq!(ScramVerifier::parse(&v.to_string()).unwrap(), v);
    // A non-ASCII space (SASLprep maps it) and a control char (SASLprep fails).
    for pw in ["secret", "pass\u{00A0}word", "bell\u{0007}"] {
        let theirs = postgres_protocol::password::scram_sha_256(pw.as_bytes());
        let parsed = ScramVerifier::parse(&theirs).unwrap();
        assert_eq!(parsed.to_string(), theirs);
        let ours = ScramVerifier::from_password(pw, &parsed.salt, parsed.iterations);
        assert_eq!(ours, parsed, "password {pw:?}");
    }
}

#[test]
fn server_accepts_postgres_protocol_client() {
    let v = verifier("secret");
    let cases = [
        (&b"secret"[..], ChannelBinding::unsupported(), true), // "n,,"
        (b"secret", ChannelBinding::unrequested(), true),      // "y,,"
        (b"wrong", ChannelBinding::unsupported(), false),
    ];
    for (password, cb, ok) in cases {
        let mut client = ScramSha256::new(password, cb);
        let mut server = ScramServer::new(v.clone());
        let sf = server.handle_client_first(SCRAM_SHA_256, client.message());
        client.update(&sf.unwrap()).unwrap();
        match server.handle_client_final(client.message()) {
            Ok((fin, _)) if ok => client.finish(&fin).unwrap(),
            Err(E::InvalidProof) if !ok => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn our_client_and_server() {
    let v = Secret::Plain("pw".into()).scram_verifier().unwrap();
    let mut c = ScramClient::new(pw("pw"));
    assert!(c.client_first().starts_with(b"n,,n=,r="));
    exchange(&mut c, &mut ScramServer::new(v.clone())).unwrap();
    let err = exchange(&mut ScramClient::new(pw("nope")), &mut ScramServer::new(v));
    assert!(matches!(err, Err(E::InvalidProof)), "{err:?}");
}

#[test]
fn client_key_passthrough() {
    let v = verifier("hunter2");
    let mut user = ScramClient::new(pw("hunter2"));
    let client_key = exchange(&mut user, &mut ScramServer::new(v.clone())).unwrap();
    let creds = ScramCredentials::ClientKey { client_key, verifier: v.clone() };
    // `exchange` also verifies the second server's server-final-message.
    let mut pgmux = ScramClient::new(creds.clone());
    let key2 = exchange(&mut pgmux, &mut ScramServer::new(v)).unwrap();
    assert_eq!(key2, client_key);
    // Upstream verifier with another salt → VerifierMismatch.
    let other = ScramVerifier::from_password("hunter2", b"another salt....", 4096);
    let err = exchange(&mut ScramClient::new(creds), &mut ScramServer::new(other));
    assert!(matches!(err, Err(E::VerifierMismatch)), "{err:?}");
}

#[test]
fn client_rejects_bad_server_messages() {
    let (mut c, mut s) = (ScramClient::new(pw("pw")), ScramServer::new(verifier("pw")));
    let sf = s.handle_client_first(SCRAM_SHA_256, &c.client_first()).unwrap();
    let (fin, _) = s.handle_client_final(&c.handle_server_first(&sf).unwrap()).unwrap();
    let mut sig = B64.decode(&fin[2..]).unwrap();
    sig[0] ^= 1;
    let bad = format!("v={}", B64.encode(sig));
    let err = c.handle_server_final(bad.as_bytes());
    assert!(matches!(err, Err(E::ServerSignatureMismatch)), "{err:?}");
    let err = c.handle_server_final(b"e=invalid-proof");
    assert!(matches!(err, Err(E::ServerError(ref e)) if e == "invalid-proof"));
    c.handle_server_final(&fin).unwrap();
    // The server nonce must extend ours.
    for sf in ["r=abc,s=c2FsdA==,i=1", "r=abXd,s=c2FsdA==,i=1", "r=Xabc,s=c2FsdA==,i=1"] {
        let mut c = ScramClient::with_nonce(pw("pw"), "", "abc");
        let err = c.handle_server_first(sf.as_bytes());
        assert!(matches!(err, Err(E::NonceMismatch)), "{err:?}");
    }
}

#[test]
fn server_rejects_bad_messages() {
    let v = verifier("pw");
    let first =
        |mech: &str, msg: &str| ScramServer::new(v.clone()).handle_client_first(mech, msg.as_bytes()).unwrap_err();
    let err = first(SCRAM_SHA_256, "p=tls-server-end-point,,n=,r=abc");
    assert!(matches!(err, E::ChannelBindingUnsupported));
    let err = first("SCRAM-SHA-256-PLUS", "n,,n=,r=abc");
    assert!(matches!(err, E::UnsupportedMechanism(m) if m == "SCRAM-SHA-256-PLUS"));
    assert!(matches!(first(SCRAM_SHA_256, "n,,m=ext,n=,r=abc"), E::Malformed(_)));
    assert!(matches!(first(SCRAM_SHA_256, "n,a=bob,n=,r=abc"), E::Malformed(_)));
    // client-final with the wrong channel-binding data ("y,,"), then the wrong nonce.
    let proof = B64.encode([0u8; 32]);
    for (cf, want_nonce_err) in [("c=eSws,{r},p=", false), ("c=biws,r=abcXYZ,p=", true)] {
        let mut s = ScramServer::new(v.clone());
        let sf = s.handle_client_first(SCRAM_SHA_256, b"n,,n=,r=abc").unwrap();
        let r = std::str::from_utf8(&sf).unwrap().split(',').next().unwrap();
        let cf = format!("{}{proof}", cf.replace("{r}", r));
        match s.handle_client_final(cf.as_bytes()) {
            Err(E::NonceMismatch) if want_nonce_err => {}
            Err(E::Malformed(_)) if !want_nonce_err => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn garbage_never_panics() {
    let v = ScramVerifier::from_password("pw", b"salt", 1);
    let inputs: Vec<&[u8]> = b"|\xff\xfe\x00|n|n,|n,,|n,,n=|n,,n=,r=|n,,n=,r=abc|y,,n=,r=\xc3\xa9\
        |n,,\xc3\xa9|\xc3|,,,,|=|c=,r=,p=|p=|c=biws,r=abc,p=AAAA|r=x,s=!!,i=1|r=xy,s=c2FsdA==,i=1\
        |r=xy,s=c2FsdA==,i=-1|r=xy,s=,i=0|v=|v=AAAA|e=|m=1|r=xy,m=1"
        .split(|&b| b == b'|')
        .collect();
    for a in &inputs {
        for b in &inputs {
            let mut s = ScramServer::new(v.clone());
            if s.handle_client_first(SCRAM_SHA_256, a).is_ok() {
                assert!(s.handle_client_final(b).is_err());
            }
            assert!(s.handle_client_first(SCRAM_SHA_256, b).is_err()); // second call
            let mut s = ScramServer::new(v.clone());
            assert!(s.handle_client_final(a).is_err()); // out of order
            let _ = ScramServer::new(v.clone()).handle_client_first("", a);
            let mut c = ScramClient::with_nonce(pw("pw"), "", "x");
            assert!(c.handle_server_final(a).is_err()); // out of order
            let _ = c.handle_server_first(a);
            assert!(c.handle_server_final(b).is_err());
            assert!(c.handle_server_first(b).is_err()); // second call
        }
    }
}

#[test]
fn md5_functions() {
    let hash = md5_password_hash("alice", "s3cret");
    assert_eq!(hash, postgres_protocol::password::md5(b"s3cret", "alice"));
    let (plain, md5) = (Secret::Plain("s3cret".into()), Secret::Md5(hash.clone()));
    let salt = [1, 2, 3, 4];
    let resp = md5_salted_response(&hash, salt);
    let theirs = postgres_protocol::authentication::md5_hash(b"alice", b"s3cret", salt);
    assert_eq!(resp, theirs);
    assert!(md5_verify(&plain, "alice", salt, &resp));
    assert!(md5_verify(&md5, "alice", salt, &resp));
    assert!(!md5_verify(&md5, "alice", [0; 4], &resp));
    assert!(!md5_verify(&plain, "bob", salt, &resp));
    let wrong = md5_salted_response(&md5_password_hash("alice", "nope"), salt);
    assert!(!md5_verify(&plain, "alice", salt, &wrong));
    assert!(!md5_verify(&md5, "alice", salt, &wrong));
    assert!(!md5_verify(&Secret::Scram(verifier("s3cret")), "alice", salt, &resp));
}

#[test]
fn cleartext_all_kinds() {
    let secrets =
        [Secret::Plain("pw".into()), Secret::Md5(md5_password_hash("u", "pw")), Secret::Scram(verifier("pw"))];
    for s in &secrets {
        assert!(cleartext_verify(s, "u", "pw"), "{s:?}");
        assert!(!cleartext_verify(s, "u", "pw2"), "{s:?}");
        assert!(!cleartext_verify(s, "u", ""), "{s:?}");
    }
    assert!(!cleartext_verify(&secrets[1], "other", "pw"));
}

#[test]
fn secret_parse() {
    let parse = |s: &str| Secret::parse(s).unwrap();
    let md5 = md5_password_hash("u", "pw");
    assert_eq!(parse(&md5), Secret::Md5(md5.clone()));
    assert!(parse(&md5).scram_verifier().is_none());
    let upper = md5.to_uppercase().replacen("MD5", "md5", 1);
    for plain in [upper.as_str(), "md5abc", "hunter2", "", "SCRAM-SHA-256"] {
        assert_eq!(parse(plain), Secret::Plain(plain.into()));
    }
    let v = verifier("pw");
    assert_eq!(parse(&v.to_string()), Secret::Scram(v.clone()));
    assert_eq!(Secret::Scram(v.clone()).scram_verifier(), Some(v.clone()));
    let good = v.to_string();
    let (head, _) = good.rsplit_once(':').unwrap();
    for bad in [
        "SCRAM-SHA-256$",
        "SCRAM-SHA-256$4096:c2FsdA==",
        &format!("{head}:c2hvcnQ="), // ServerKey not 32 bytes
        &good.replacen("4096", "0", 1),
        &good.replacen("4096", "x", 1),
    ] {
        assert!(Secret::parse(bad).is_err(), "{bad}");
    }
    let derived = parse("pw").scram_verifier().unwrap();
    assert_eq!((derived.iterations, derived.salt.len()), (4096, 16));
    assert!(cleartext_verify(&Secret::Scram(derived), "u", "pw"));
}
