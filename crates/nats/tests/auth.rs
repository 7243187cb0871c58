//! Authentication and TLS against a real `nats-server`: user and password,
//! token, TLS with a private CA; and the clear errors when they are wrong.

use eventplane_core::{Event, Identity, Notice, Scope};
use eventplane_nats::{NatsAuth, NatsError, NatsOptions, NatsTls, NatsTransport};
use eventplane_testkit::nats::{NatsConfig, NatsServer, TlsFiles};
use std::time::Duration;

fn options(url: &str, auth: NatsAuth) -> NatsOptions {
    NatsOptions {
        servers: vec![url.to_owned()],
        auth,
        connect_timeout: Duration::from_secs(3),
        ..NatsOptions::default()
    }
}

/// A publisher and a subscriber through `opts` see each other.
async fn round_trip(opts: NatsOptions) {
    let a = NatsTransport::connect(opts.clone()).await.unwrap();
    let b = NatsTransport::connect(opts).await.unwrap();
    let ch = Scope::new("ns", "c").unwrap().channel("t").unwrap();
    let p = a.publisher(&ch, Identity::new(1)).await.unwrap();
    let mut s = b.subscriber(&ch).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.recv())
            .await
            .unwrap()
        {
            Some(Event::Notice(Notice::Joined { .. })) => break,
            Some(_) => {}
            None => panic!("subscriber closed"),
        }
    }
    p.publish_bytes(b"x").unwrap();
    loop {
        if let Some(Event::Message(m)) = s.recv().await {
            assert_eq!(&m.payload[..], b"x");
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let server = NatsServer::start_with(NatsConfig {
        config: "authorization {\n  user: ep\n  password: s3cret\n}".into(),
    });
    let good = NatsAuth::UserPassword {
        user: "ep".into(),
        password: "s3cret".into(),
    };
    round_trip(options(&server.url(), good)).await;
    let bad = NatsAuth::UserPassword {
        user: "ep".into(),
        password: "wrong".into(),
    };
    let e = NatsTransport::connect(options(&server.url(), bad))
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, NatsError::Connect { .. }), "{text}");
    assert!(
        text.contains(&server.url()) || text.contains("127.0.0.1"),
        "{text}"
    );
    // The password is never printed.
    assert!(!text.contains("wrong"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let server = NatsServer::start_with(NatsConfig {
        config: "authorization {\n  token: t0ken\n}".into(),
    });
    round_trip(options(&server.url(), NatsAuth::Token("t0ken".into()))).await;
    assert!(
        NatsTransport::connect(options(&server.url(), NatsAuth::None))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::create(dir.path());
    let server = NatsServer::start_with(NatsConfig {
        config: files.server_config(),
    });
    let url = format!("tls://127.0.0.1:{}", server.port());
    let mut opts = options(&url, NatsAuth::None);
    opts.tls = NatsTls {
        required: true,
        ca: Some(files.ca.clone()),
        client_cert: None,
    };
    round_trip(opts).await;
    // Without our CA the server's certificate is not trusted: a clear error.
    let e = NatsTransport::connect(options(&url, NatsAuth::None))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("NATS_SERVER"), "{e}");
}

#[tokio::test]
async fn a_missing_credentials_file_is_named() {
    let e = NatsTransport::connect(options(
        "nats://127.0.0.1:1",
        NatsAuth::CredentialsFile("/nonexistent/ep.creds".into()),
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, NatsError::Credentials { .. }));
    let text = e.to_string();
    assert!(
        text.contains("/nonexistent/ep.creds") && text.contains("NATS_CREDS"),
        "{text}"
    );
}
