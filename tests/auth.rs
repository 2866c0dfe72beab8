//! Authentication both ways against real PostgreSQL: clients to pgmux
//! (SCRAM-SHA-256, md5, cleartext, trust; plain and verifier secrets) and
//! pgmux to servers (whatever pg_hba asks).

mod support;

use support::{code, conn_str, scalar, APP, MD5USER, PWUSER, TRUSTUSER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_method_and_server_method() {
    let db = support::fresh_db("auth_methods");
    let p = support::proxy(&db, "default_pool_size = 2").await;
    let port = p.addr.port();
    // Each user's client method is also what its server pg_hba line asks
    // for: scram, md5, password, trust.
    for (user, pw) in [APP, MD5USER, PWUSER, TRUSTUSER] {
        let c = support::connect_str(&conn_str(port, user, pw, &db)).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(scalar(&c, "SELECT current_user").await, user);
    }
    // Wrong password → 28P01, for every password method.
    for (user, _) in [APP, MD5USER, PWUSER] {
        let e = support::refused(&conn_str(port, user, "wrong", &db)).await;
        assert_eq!(code(&e), "28P01", "{user}: {e}");
        assert!(
            support::text(&e).contains(&format!("password authentication failed for user \"{user}\"")),
            "{}",
            support::text(&e)
        );
    }
    // Unknown user → 28000; unknown database → 3D000.
    let e = support::refused(&conn_str(port, "nobody", "x", &db)).await;
    assert_eq!(code(&e), "28000");
    let e = support::refused(&conn_str(port, APP.0, APP.1, "nodb")).await;
    assert_eq!(code(&e), "3D000");
    assert!(support::text(&e).contains("database \"nodb\" does not exist"), "{}", support::text(&e));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifiers_from_pg_authid_need_no_plaintext() {
    let db = support::fresh_db("auth_verifiers");
    let c = support::cluster();
    let scram = c
        .psql(&c.primary, "postgres", &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{}'", APP.0))
        .unwrap();
    let md5 = c
        .psql(&c.primary, "postgres", &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{}'", MD5USER.0))
        .unwrap();
    assert!(scram.starts_with("SCRAM-SHA-256$"), "{scram}");
    assert!(md5.starts_with("md5"), "{md5}");
    let text = support::config_text(&db, "default_pool_size = 2", "")
        .replace(&format!("password = \"{}\"", APP.1), &format!("password = \"{scram}\""))
        .replace(&format!("password = \"{}\"", MD5USER.1), &format!("password = \"{md5}\""));
    assert!(!text.contains(APP.1) && !text.contains(MD5USER.1));
    let p = support::start_proxy(&text).await;
    // SCRAM: the client's proof lets pgmux log into PostgreSQL (ClientKey
    // passthrough); md5: the stored hash is enough.
    for (user, pw) in [APP, MD5USER] {
        let cl = support::connect_str(&conn_str(p.addr.port(), user, pw, &db))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(scalar(&cl, "SELECT current_user").await, user);
        let e = support::refused(&conn_str(p.addr.port(), user, "bad", &db)).await;
        assert_eq!(code(&e), "28P01");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rejection_is_relayed() {
    let db = support::fresh_db("auth_server_reject");
    // pgmux accepts the client, but the password it uses for PostgreSQL is wrong.
    let text = support::config_text(&db, "", "").replace(
        &format!("name = \"{}\"\nauth_method = \"trust\"\nserver_password = \"{}\"", TRUSTUSER.0, TRUSTUSER.1),
        &format!("name = \"{}\"\nauth_method = \"trust\"\nserver_password = \"{}\"", PWUSER.0, "not-it"),
    );
    let text = text.replacen(
        &format!("[[users]]\nname = \"{}\"\npassword = \"{}\"\nauth_method = \"password\"\n", PWUSER.0, PWUSER.1),
        "",
        1,
    );
    let p = support::start_proxy(&text).await;
    let e = support::refused(&conn_str(p.addr.port(), PWUSER.0, "anything", &db)).await;
    assert_eq!(code(&e), "28P01", "{}", support::text(&e));
    // A database that exists in pgmux's config but not on the server.
    let text = support::config_text(&db, "", "[databases.ghostdb]\nprimary = \"PRIMARY\"")
        .replace("PRIMARY", &support::cluster().primary.addr());
    let p2 = support::start_proxy(&text).await;
    let e = support::refused(&conn_str(p2.addr.port(), APP.0, APP.1, "ghostdb")).await;
    assert_eq!(code(&e), "3D000", "{}", support::text(&e));
    p.stop().await;
    p2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_looks_up_users_on_the_server() {
    let db = support::fresh_db("auth_query");
    let c = support::cluster();
    let role = format!("dyn_{}", std::process::id());
    c.psql(
        &c.primary,
        &db,
        &format!("CREATE ROLE {role} LOGIN PASSWORD 'dyn-secret'; GRANT ALL ON SCHEMA public TO {role}"),
    )
    .unwrap();
    c.psql(
        &c.primary,
        &db,
        "CREATE FUNCTION pgmux_lookup(u text) RETURNS TABLE (usename name, passwd text) LANGUAGE sql SECURITY DEFINER \
         AS $$ SELECT rolname, rolpassword FROM pg_authid WHERE rolname = u $$; \
         REVOKE ALL ON FUNCTION pgmux_lookup(text) FROM PUBLIC; GRANT EXECUTE ON FUNCTION pgmux_lookup(text) TO app",
    )
    .unwrap();
    let cfg = support::config_text(&db, "", "").replacen(
        "log_level = \"warn\"\n",
        "log_level = \"warn\"\nauth_user = \"app\"\nauth_query = \"SELECT * FROM pgmux_lookup($1)\"\n",
        1,
    );
    let p = support::start_proxy(&cfg).await;
    let url = |user: &str, pw: &str| support::conn_str(p.addr.port(), user, pw, &db);
    // A user pgmux's config does not list, with its SCRAM verifier from the
    // server: logs in, and pgmux logs in to PostgreSQL as that user.
    let dynamic = support::connect_str(&url(&role, "dyn-secret")).await.unwrap();
    assert_eq!(scalar(&dynamic, "SELECT current_user").await, role);
    dynamic.batch_execute("CREATE TABLE mine (x int); INSERT INTO mine VALUES (1)").await.unwrap();
    assert_eq!(scalar(&dynamic, "SELECT count(*) FROM mine").await, "1");
    // Wrong password, unknown role: the same error PostgreSQL gives.
    let e = support::connect_str(&url(&role, "wrong")).await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    let e = support::connect_str(&url("nobody_at_all", "x")).await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    p.stop().await;
}
