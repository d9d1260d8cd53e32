//! The store on a PostgreSQL that admits its role over TLS only: the
//! control plane connects with a verified certificate (`sslmode=verify-full`
//! and `sslrootcert` in the URL, as a managed PostgreSQL asks), and refuses
//! to start on a certificate it cannot verify.

use isocloud_controlplane::{ControlPlane, ControlPlaneOptions};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::support::{Backend, TestServer, postgres, postgres_available};

/// Whether the server sees this connection encrypted.
async fn encrypted(connection: &mut PgConnection) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(connection)
        .await
        .expect("pg_stat_ssl")
}

#[tokio::test]
async fn the_store_works_over_verified_tls_and_refuses_a_certificate_it_cannot_verify() {
    let Some((url, ca)) = postgres_available(postgres::fresh_tls_only_database().await) else {
        return;
    };
    // The probe: unencrypted, this role is turned away, so whatever gets in
    // below came over TLS.
    let plain = PgConnection::connect(&format!("{url}?sslmode=disable")).await.expect_err("no TLS, no entry");
    assert!(plain.to_string().contains("no encryption"), "{plain}");

    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let mut check = PgConnection::connect(&verified).await.expect("verified TLS connection");
    assert!(encrypted(&mut check).await);

    // The control plane on that URL: migrations, the admin token, the API.
    let server = TestServer::start(Backend::Postgres { url: verified.clone() }).await;
    assert_eq!(server.create_project("over-tls").await["name"], "over-tls");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM projects WHERE name = 'over-tls'")
        .fetch_one(&mut check)
        .await
        .expect("count");
    assert_eq!(stored, 1, "the project went to the TLS-only database");

    // The system's roots do not hold the test CA: verify-full without
    // sslrootcert must not start, and says why.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = ControlPlaneOptions::new(dir.path().join("data"));
    options.database_url = Some(format!("{url}?sslmode=verify-full"));
    let refused = ControlPlane::open(options).await.err().expect("an unverifiable certificate is refused");
    let message = format!("{refused:#}");
    assert!(message.contains("invalid peer certificate: UnknownIssuer"), "{message}");

    // `require` encrypts without checking the certificate (libpq's meaning).
    let mut unverified = PgConnection::connect(&format!("{url}?sslmode=require")).await.expect("sslmode=require");
    assert!(encrypted(&mut unverified).await);
}
