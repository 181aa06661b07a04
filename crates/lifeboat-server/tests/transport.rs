//! The server's agent port against peers that must be refused: no client
//! certificate, garbage, an old protocol version, a truncated frame, a
//! certificate from another CA. Each gets a clear error and changes nothing.

use std::time::Duration;

use lifeboat_format::proto::{code, Frame, PROTO_VERSION};
use lifeboat_replicate::framed::{read_frame, write_frame};
use lifeboat_replicate::shipper::connect;
use lifeboat_replicate::tls::{self, Ca};
use lifeboat_server::{Bound, ServerConfig};
use tokio::io::AsyncWriteExt;

async fn server(dir: &std::path::Path) -> (Bound, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".into(),
        api: "127.0.0.1:0".into(),
        ..Default::default()
    };
    lifeboat_server::init(dir, &cfg).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let h = tokio::spawn(lifeboat_server::run(
        dir.to_path_buf(),
        None,
        tx,
        std::future::pending(),
    ));
    (rx.await.unwrap(), h)
}

fn hello() -> Frame {
    Frame::Hello {
        version: PROTO_VERSION,
        item: "db".into(),
        volume: "disk0".into(),
        size: 1 << 20,
        chunk_size: 65536,
        journal_id: [1; 16],
        durable: 0,
        follows: None,
    }
}

async fn answer(
    addr: &str,
    cfg: std::sync::Arc<rustls::ClientConfig>,
    bytes: Vec<u8>,
) -> Option<Frame> {
    let s = connect(addr, cfg).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(s);
    wr.write_all(&bytes).await.unwrap();
    wr.flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(40), read_frame(&mut rd))
        .await
        .unwrap()
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_with_a_reason_and_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (b, _h) = server(d.path()).await;
    let addr = b.listen.to_string();
    let ca_der = std::fs::read(d.path().join("tls/ca.crt")).unwrap();
    let anon = tls::enroll_config(&tls::fingerprint(&ca_der)).unwrap();

    // no client certificate
    let f = answer(&addr, anon.clone(), hello().encode()).await;
    assert!(
        matches!(&f, Some(Frame::Error { code: c, message }) if *c == code::UNAUTHENTICATED && message.contains("enroll")),
        "{f:?}"
    );
    // garbage and an absurd length
    let f = answer(&addr, anon.clone(), b"\x00\x00\x00\x05\xffjunk".to_vec()).await;
    assert!(
        matches!(
            f,
            Some(Frame::Error {
                code: code::PROTOCOL,
                ..
            })
        ),
        "{f:?}"
    );
    let f = answer(&addr, anon.clone(), vec![0xff; 8]).await;
    assert!(
        matches!(
            f,
            Some(Frame::Error {
                code: code::PROTOCOL,
                ..
            })
        ),
        "{f:?}"
    );
    // an old protocol version
    let mut old = hello().encode();
    old[4 + 1 + 8] = 0; // version 0
    let f = answer(&addr, anon.clone(), old).await;
    assert!(
        matches!(&f, Some(Frame::Error { message, .. }) if message.contains("version")),
        "{f:?}"
    );
    // a truncated frame: the server gives up on it and closes
    let mut t = hello().encode();
    t.truncate(t.len() - 3);
    let s = connect(&addr, anon.clone()).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(s);
    wr.write_all(&t).await.unwrap();
    wr.shutdown().await.unwrap();
    let f = read_frame(&mut rd).await;
    assert!(
        matches!(&f, Ok(Some(Frame::Error { message, .. })) if message.contains("truncated")),
        "{f:?}"
    );
    // a bad token
    let f = answer(&addr, anon.clone(), {
        let token = tls::Token::new(&ca_der).to_string();
        let (_, public_key, proof) = tls::enrollment_key(&token).unwrap();
        Frame::Enroll {
            version: PROTO_VERSION,
            token,
            agent: "x".into(),
            public_key,
            proof,
        }
        .encode()
    })
    .await;
    assert!(
        matches!(
            f,
            Some(Frame::Error {
                code: code::BAD_TOKEN,
                ..
            })
        ),
        "{f:?}"
    );
    // a certificate from another CA does not even complete the handshake
    let other = Ca::create("other").unwrap();
    let (c, k) = other.issue_agent("intruder").unwrap();
    let cfg = tls::agent_config(&ca_der, &c, &k).unwrap();
    let refused = match connect(&addr, cfg).await {
        Err(_) => true,
        Ok(s) => {
            let (mut rd, mut wr) = tokio::io::split(s);
            let _ = write_frame(&mut wr, &hello()).await;
            !matches!(read_frame(&mut rd).await, Ok(Some(Frame::Welcome { .. })))
        }
    };
    assert!(refused);
    // a server whose CA does not match the token's pin is refused by the agent
    let wrong = tls::enroll_config(&tls::fingerprint(&other.cert_der)).unwrap();
    assert!(connect(&addr, wrong).await.is_err());
    // nothing was created
    let db = lifeboat_server::open_db(d.path()).unwrap();
    assert!(db.volumes().unwrap().is_empty());
    assert!(db.agents().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_makes_its_key_and_a_bad_proof_leaves_the_token_unused() {
    let d = tempfile::tempdir().unwrap();
    let (b, _h) = server(d.path()).await;
    let addr = b.listen.to_string();
    let (token, _) = lifeboat_server::create_token(d.path(), "primary").unwrap();
    let token = token.to_string();
    let anon = tls::enroll_config(&token.parse::<tls::Token>().unwrap().ca_pin).unwrap();
    let enroll = |public_key: Vec<u8>, proof: Vec<u8>| {
        Frame::Enroll {
            version: PROTO_VERSION,
            token: token.clone(),
            agent: "web01".into(),
            public_key,
            proof,
        }
        .encode()
    };
    // a proof made with another key, and a key that is no P-256 point
    let (_, pk, _) = tls::enrollment_key(&token).unwrap();
    let (_, _, other_proof) = tls::enrollment_key(&token).unwrap();
    for (k, p) in [(pk, other_proof.clone()), (vec![4; 10], other_proof)] {
        let f = answer(&addr, anon.clone(), enroll(k, p)).await;
        assert!(
            matches!(&f, Some(Frame::Error { code: code::PROTOCOL, message }) if message.contains("proof")),
            "{f:?}"
        );
    }
    // the token is still good: the certificate is for the agent's own key
    let (key_der, pk, proof) = tls::enrollment_key(&token).unwrap();
    let f = answer(&addr, anon.clone(), enroll(pk, proof)).await;
    let Some(Frame::Enrolled {
        cert_der, ca_der, ..
    }) = f
    else {
        panic!("{f:?}")
    };
    let cfg = tls::agent_config(&ca_der, &cert_der, &key_der).unwrap();
    let f = answer(&addr, cfg, hello().encode()).await;
    assert!(matches!(f, Some(Frame::Welcome { .. })), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_stays_with_the_agent_that_replicates_it() {
    let d = tempfile::tempdir().unwrap();
    let (b, _h) = server(d.path()).await;
    let addr = b.listen.to_string();
    let cfg = ServerConfig::load(d.path()).unwrap();
    let ca = lifeboat_server::load_ca(d.path(), &cfg).unwrap();
    let db = lifeboat_server::open_db(d.path()).unwrap();
    let mut agents = Vec::new();
    for name in ["a1", "a2"] {
        let (c, k) = ca.issue_agent(name).unwrap();
        db.add_agent(name, name, "primary", &tls::fingerprint(&c))
            .unwrap();
        agents.push(tls::agent_config(&ca.cert_der, &c, &k).unwrap());
    }
    let f = answer(&addr, agents[0].clone(), hello().encode()).await;
    assert!(matches!(f, Some(Frame::Welcome { .. })), "{f:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let f = answer(&addr, agents[1].clone(), hello().encode()).await;
    assert!(
        matches!(&f, Some(Frame::Error { code: code::REFUSED, message }) if message.contains("replicated by agent a1")),
        "{f:?}"
    );
    // once the owner is revoked, the volume may move
    db.revoke("a1").unwrap();
    let f = answer(&addr, agents[1].clone(), hello().encode()).await;
    assert!(matches!(f, Some(Frame::Welcome { .. })), "{f:?}");
}
