//! One agent connection: enrollment, or a replication stream of one volume.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use lifeboat_format::proto::{code, Frame, PROTO_VERSION};
use lifeboat_replicate::framed::{read_frame_body, write_frame};
use lifeboat_replicate::receiver::{frame_name, Receiver};
use lifeboat_replicate::tls::{fingerprint, Token};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::replica::{Io, Replica};
use crate::{LiveVolume, State};

fn err(code: u16, message: impl Into<String>) -> Frame {
    Frame::Error {
        code,
        message: message.into(),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
}

pub async fn handle(s: TcpStream, acceptor: TlsAcceptor, st: Arc<State>) -> Result<()> {
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(s))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))??;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| fingerprint(c));
    let (mut rd, mut wr) = tokio::io::split(tls);
    // before authentication only small frames (hello, enroll) are read
    let first_max = if peer.is_some() { usize::MAX } else { 64 << 10 };
    let first = match tokio::time::timeout(
        Duration::from_secs(30),
        lifeboat_replicate::framed::read_frame_max(&mut rd, first_max),
    )
    .await
    {
        Err(_) => bail!("no first frame within 30 s"),
        Ok(Err(e)) => {
            let _ = write_frame(&mut wr, &err(code::PROTOCOL, format!("{e:#}"))).await;
            bail!("refused: {e:#}");
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(f))) => f,
    };
    match first {
        Frame::Enroll {
            token,
            agent,
            public_key,
            proof,
            ..
        } => {
            let reply = enroll(&st, &token, &agent, &public_key, &proof, peer.is_some()).await;
            let refused = matches!(reply, Frame::Error { .. });
            if let Frame::Error { message, .. } = &reply {
                tracing::warn!("enrollment of {agent:?} refused: {message}");
            }
            write_frame(&mut wr, &reply).await?;
            if refused {
                bail!("enrollment refused");
            }
            Ok(())
        }
        Frame::Hello {
            version,
            item,
            volume,
            size,
            chunk_size,
            journal_id,
            durable,
            follows,
        } => {
            let Some(fp) = peer else {
                write_frame(
                    &mut wr,
                    &err(
                        code::UNAUTHENTICATED,
                        "no client certificate: enroll this agent first (lifeboat agent enroll)",
                    ),
                )
                .await?;
                bail!("refused a stream without a client certificate");
            };
            let agent = match st.db.agent_by_fingerprint(&fp)? {
                Some(a) if a.revoked.is_none() => a,
                Some(a) => {
                    write_frame(
                        &mut wr,
                        &err(
                            code::REVOKED,
                            format!("the certificate of agent {} ({}) is revoked", a.name, a.id),
                        ),
                    )
                    .await?;
                    bail!("refused revoked agent {} ({})", a.name, a.id);
                }
                None => {
                    write_frame(
                        &mut wr,
                        &err(code::UNAUTHENTICATED, "unknown client certificate"),
                    )
                    .await?;
                    bail!("refused an unknown client certificate");
                }
            };
            if version != PROTO_VERSION {
                write_frame(
                    &mut wr,
                    &err(code::PROTOCOL, "unsupported protocol version"),
                )
                .await?;
                bail!("protocol version {version}");
            }
            if !valid_name(&item) || !valid_name(&volume) {
                write_frame(
                    &mut wr,
                    &err(
                        code::PROTOCOL,
                        "item and volume names: letters, digits, - _ . (up to 64)",
                    ),
                )
                .await?;
                bail!("bad names {item:?}/{volume:?}");
            }
            if !(4096..=(16 << 20)).contains(&chunk_size) || !chunk_size.is_power_of_two() {
                write_frame(
                    &mut wr,
                    &err(
                        code::PROTOCOL,
                        "chunk size must be a power of two from 4 KiB to 16 MiB",
                    ),
                )
                .await?;
                bail!("bad chunk size {chunk_size}");
            }
            replicate(
                st,
                &mut rd,
                &mut wr,
                agent.id,
                item,
                volume,
                size,
                chunk_size,
                (journal_id, durable, follows),
            )
            .await
        }
        other => {
            write_frame(
                &mut wr,
                &err(
                    code::PROTOCOL,
                    format!(
                        "a stream must start with hello or enroll, not {}",
                        frame_name(&other)
                    ),
                ),
            )
            .await?;
            bail!("unexpected first frame {}", frame_name(&other))
        }
    }
}

async fn enroll(
    st: &State,
    token: &str,
    agent: &str,
    public_key: &[u8],
    proof: &[u8],
    has_cert: bool,
) -> Frame {
    if has_cert {
        return err(
            code::REFUSED,
            "already enrolled (a certificate was presented)",
        );
    }
    if !valid_name(agent) {
        return err(
            code::PROTOCOL,
            "agent name: letters, digits, - _ . (up to 64)",
        );
    }
    let t: Token = match token.parse() {
        Ok(t) => t,
        Err(e) => return err(code::BAD_TOKEN, format!("{e:#}")),
    };
    // before the token is used up: a bad key or proof leaves it valid
    if let Err(e) = lifeboat_replicate::tls::verify_enrollment(token, public_key, proof) {
        return err(code::PROTOCOL, format!("{e:#}"));
    }
    let site = match st.db.use_token(&Token::secret_hash(&t.secret), agent) {
        Ok(Ok(site)) => site,
        Ok(Err(why)) => return err(code::BAD_TOKEN, why),
        Err(e) => return err(code::IO, format!("{e:#}")),
    };
    let id = format!(
        "agent-{}",
        hex::encode(lifeboat_replicate::tls::random::<6>())
    );
    let cert = match st.ca.issue_agent_for(&id, token, public_key, proof) {
        Ok(x) => x,
        Err(e) => return err(code::PROTOCOL, format!("{e:#}")),
    };
    if let Err(e) = st.db.add_agent(&id, agent, &site, &fingerprint(&cert)) {
        return err(code::IO, format!("{e:#}"));
    }
    tracing::info!("enrolled agent {agent} as {id} (site {site})");
    Frame::Enrolled {
        agent_id: id,
        cert_der: cert,
        ca_der: st.ca.cert_der.clone(),
    }
}

/// The agent's journal as its Hello gives it: identity, last sequence held,
/// and the journal it follows after a machine crash.
type AgentJournal = ([u8; 16], u64, Option<([u8; 16], u64)>);

#[allow(clippy::too_many_arguments)]
async fn replicate<R, W>(
    st: Arc<State>,
    rd: &mut R,
    wr: &mut W,
    agent_id: String,
    item: String,
    volume: String,
    size: u64,
    chunk_size: u32,
    journal: AgentJournal,
) -> Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let key = (item.clone(), volume.clone());
    let path = st
        .cfg
        .replica_dir(&st.dir)
        .join(&item)
        .join(format!("{volume}.img"));
    // a volume belongs to the agent that first replicated it (until that
    // agent is revoked): another agent must not overwrite its replica
    if let Some(owner) = st.db.volume_owner(&item, &volume)? {
        if owner != agent_id && !st.db.is_revoked(&owner)? {
            let m = format!(
                "{item}/{volume} is replicated by agent {owner}; revoke it first to move the volume to {agent_id}"
            );
            let _ = write_frame(wr, &err(code::REFUSED, m.clone())).await;
            bail!("{m}");
        }
    }
    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel::<Frame>();
    // one stream per volume
    let claimed: std::result::Result<Arc<Mutex<Replica>>, (u16, String)> = (|| {
        let mut vols = st.volumes.lock().unwrap();
        if vols.get(&key).is_some_and(|v| v.connected) {
            return Err((
                code::REFUSED,
                format!("{item}/{volume} is already being replicated by another connection"),
            ));
        }
        let existing = vols.get(&key).map(|v| v.replica.clone());
        let replica = match existing {
            Some(r) if r.lock().unwrap().size == size => r,
            _ => Arc::new(Mutex::new(
                Replica::open(&path, size).map_err(|e| (code::IO, e.to_string()))?,
            )),
        };
        let e = vols.entry(key.clone()).or_insert_with(|| LiveVolume {
            item: item.clone(),
            volume: volume.clone(),
            agent: agent_id.clone(),
            replica: replica.clone(),
            connected: false,
            last_contact: None,
            report: None,
            error: None,
            bytes_received: 0,
            resync_chunks_compared: 0,
            resync_chunks_received: 0,
            resync_bytes_received: 0,
            throughput: 0.0,
            last_bytes: 0,
            control: None,
            quiesced: None,
        });
        e.replica = replica.clone();
        e.connected = true;
        e.control = Some(ctl_tx.clone());
        e.quiesced = None;
        e.agent = agent_id.clone();
        e.last_contact = Some(Instant::now());
        e.error = None;
        Ok(replica)
    })();
    let replica = match claimed {
        Ok(r) => r,
        Err((c, m)) => {
            let _ = write_frame(wr, &err(c, m.clone())).await;
            bail!("{item}/{volume}: {m}");
        }
    };
    let result = stream(
        &st, rd, wr, &agent_id, &item, &volume, size, chunk_size, journal, &path, replica, ctl_rx,
    )
    .await;
    let mut vols = st.volumes.lock().unwrap();
    if let Some(v) = vols.get_mut(&key) {
        v.connected = false;
        v.control = None;
        v.error = result.as_ref().err().map(|e| format!("{e:#}"));
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn stream<R, W>(
    st: &Arc<State>,
    rd: &mut R,
    wr: &mut W,
    agent_id: &str,
    item: &str,
    volume: &str,
    size: u64,
    chunk_size: u32,
    journal: AgentJournal,
    path: &std::path::Path,
    replica: Arc<Mutex<Replica>>,
    mut ctl: tokio::sync::mpsc::UnboundedReceiver<Frame>,
) -> Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    st.db.volume(
        item,
        volume,
        agent_id,
        size,
        chunk_size,
        &path.to_string_lossy(),
    )?;
    let saved = st.db.stream_state(item, volume)?;
    let (mut rx, welcome) = Receiver::new(
        saved.clone(),
        size,
        chunk_size,
        journal.0,
        journal.1,
        journal.2,
    );
    {
        let mut r = replica.lock().unwrap();
        r.applied_seq = rx.state().applied_seq;
        r.consistent = rx.consistent();
    }
    write_frame(wr, &welcome).await?;
    tracing::info!(
        "{item}/{volume}: stream from {agent_id} at seq {}",
        rx.state().applied_seq
    );
    let key = (item.to_string(), volume.to_string());
    let mut last_revoke_check = Instant::now();
    // one buffer for every frame of the stream (batches are applied from it)
    let mut buf = Vec::new();
    loop {
        // read the next frame; requests for the agent (app-consistent cuts)
        // go out meanwhile (the read is never dropped half-way)
        let got = {
            let read = read_frame_body(rd, &mut buf);
            tokio::pin!(read);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                tokio::select! {
                    r = &mut read => break r,
                    Some(c) = ctl.recv() => write_frame(wr, &c).await?,
                    _ = tokio::time::sleep_until(deadline) => {
                        bail!("{item}/{volume}: the agent has been silent for 60 s")
                    }
                }
            }
        };
        let body = match got {
            Ok(Some(n)) => &buf[..n],
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = write_frame(wr, &err(code::PROTOCOL, format!("{e:#}"))).await;
                bail!("{item}/{volume}: {e:#}");
            }
        };
        // a batch is applied from the buffer; other frames are decoded
        let (f, batch) = match Frame::batch_parts(body) {
            Some(parts) => (None, Some(parts)),
            None => match Frame::decode(body) {
                Ok(f) => (Some(f), None),
                Err(e) => {
                    let _ = write_frame(wr, &err(code::PROTOCOL, format!("{e:#}"))).await;
                    bail!("{item}/{volume}: {e:#}");
                }
            },
        };
        if let Some(Frame::Quiesced {
            cut_id,
            ok,
            message,
        }) = &f
        {
            let mut vols = st.volumes.lock().unwrap();
            if let Some(v) = vols.get_mut(&key) {
                v.quiesced = Some((*cut_id, *ok, message.clone()));
            }
            continue;
        }
        if last_revoke_check.elapsed() > Duration::from_secs(2) {
            last_revoke_check = Instant::now();
            if st.db.is_revoked(agent_id)? {
                let _ = write_frame(
                    wr,
                    &err(code::REVOKED, "this agent's certificate was revoked"),
                )
                .await;
                bail!("{item}/{volume}: agent {agent_id} was revoked; stream closed");
            }
        }
        if let Some(Frame::Status(h)) = &f {
            let mut vols = st.volumes.lock().unwrap();
            if let Some(v) = vols.get_mut(&key) {
                v.report = Some(h.clone());
                v.last_contact = Some(Instant::now());
            }
            continue;
        }
        let db = st.db.clone();
        let rep = replica.clone();
        let res = tokio::task::block_in_place(|| {
            let mut r = rep.lock().unwrap();
            rx.set_park(r.park_target);
            let mut io = Io {
                replica: &mut r,
                db: &db,
                item,
                volume,
            };
            let out = match (batch, f) {
                (Some((codec, raw_len, payload)), _) => {
                    rx.on_batch(codec, raw_len, payload, &mut io)
                }
                (None, Some(f)) => rx.on_frame(f, &mut io),
                (None, None) => Ok(vec![]),
            };
            r.parked_at = rx.parked();
            r.last_marker = rx.last_marker();
            out
        });
        {
            let mut vols = st.volumes.lock().unwrap();
            if let Some(v) = vols.get_mut(&key) {
                v.last_contact = Some(Instant::now());
                v.bytes_received = rx.stats.bytes_written + rx.stats.resync_bytes_received;
                v.resync_chunks_compared = rx.stats.resync_chunks_compared;
                v.resync_chunks_received = rx.stats.resync_chunks_received;
                v.resync_bytes_received = rx.stats.resync_bytes_received;
            }
        }
        answer(wr, res, item, volume).await?;
        lifeboat_replicate::receiver::release_if_large(&mut buf);
        // parked at a consistency-group cut marker: hold the stream (and,
        // through TCP, the agent) until the point is cut
        if rx.parked().is_some() {
            // (try_lock: a point cut holds the lock while it scans, and
            // blocking here would stall a runtime worker)
            let t = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let released = match replica.try_lock() {
                    Ok(r) => r.park_target.is_none(),
                    Err(_) => false,
                };
                if released || t.elapsed() > Duration::from_secs(300) {
                    break;
                }
            }
            let res = tokio::task::block_in_place(|| {
                let mut r = rep.lock().unwrap();
                r.parked_at = None;
                let mut io = Io {
                    replica: &mut r,
                    db: &db,
                    item,
                    volume,
                };
                rx.resume(&mut io)
            });
            answer(wr, res, item, volume).await?;
        }
    }
}

/// Send the receiver's answers, or its error (and end the stream).
async fn answer<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    res: Result<Vec<Frame>, lifeboat_replicate::receiver::ReceiveError>,
    item: &str,
    volume: &str,
) -> Result<()> {
    match res {
        Ok(out) => {
            for o in out {
                write_frame(wr, &o).await?;
            }
            Ok(())
        }
        Err(e) => {
            let _ = write_frame(wr, &e.frame()).await;
            bail!("{item}/{volume}: {e}");
        }
    }
}
