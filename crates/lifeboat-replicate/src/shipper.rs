//! The agent's side of one replication stream: ships a volume's journal to
//! the server, in order, and closes gaps with resync passes compared by hash.
//!
//! A stream (re)starts with Hello/Welcome: the server says up to which
//! sequence it holds the journal and whether its replica finished an initial
//! sync. Then:
//! * no initial sync yet (or another journal): a *full* pass compares every
//!   chunk by hash; only chunks that differ travel (offline seeding works
//!   the same way: a replica restored from elsewhere sends little);
//! * the journal no longer holds the next record (it overflowed and was
//!   dropped), or the dirty map has chunks pending after a restart: a
//!   *dirty* pass over those chunks only;
//! * otherwise records go out from the first one the server lacks.
//!
//! A pass at `x` (the next journal sequence when it starts) first ships the
//! records below `x` the journal still holds, then the chunks (read now, so
//! they include every write below `x`), then `ResyncEnd{x}`; records from
//! `x` on follow. Replaying records from `x` over a chunk read later is
//! harmless: the last write to each byte wins, as on the source.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_capture::dirtymap::DirtyMap;
use lifeboat_capture::journal::{Cursor, CursorError, Journal};
use lifeboat_format::journal::RecordKind;
use lifeboat_format::proto::{
    batch_head, Frame, RecKind, RecRef, VolumeState, MAX_HASHES, PROTO_VERSION, RECORD_HEADER,
    ZERO_HASH,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWrite, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::framed::{read_frame, BatchEncoder};
use crate::throttle::Throttle;

/// Dirty bits of chunks written within this long stay set (a hot set).
const HOT: Duration = Duration::from_secs(5);
/// And so do the bits of the groups (4 MiB) written to most recently, up
/// to this many (1 GiB), as DRBD's activity log keeps its extents: a
/// working set written again and again is not marked (and synced) again.
const HOT_GROUPS: usize = 256;

/// One volume to ship.
pub struct Source {
    pub item: String,
    pub volume: String,
    pub file: Arc<File>,
    pub size: u64,
    pub journal: Arc<Journal>,
    pub dirty: Arc<DirtyMap>,
}

#[derive(Clone)]
pub struct ShipOptions {
    pub server: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// Bytes per second on the wire (None: unlimited).
    pub bandwidth: crate::throttle::Schedule,
    /// Journal bytes beyond which it is dropped and the dirty map takes over.
    pub journal_max: u64,
    /// Data bytes per batch.
    pub batch_max: usize,
    /// Unacknowledged bytes in flight before waiting (backpressure).
    pub window: u64,
    /// Where app-consistent cut requests from the server go (the agent runs
    /// the item's hooks and answers through [`ShipStatus::outbox`]).
    pub control: Option<mpsc::UnboundedSender<QuiesceRequest>>,
    /// `scan` mode: no splitter; a full pass compared by hash this often.
    pub scan_interval: Option<Duration>,
}

/// The server asks for an app-consistent cut of `item` at `cut_id`.
pub struct QuiesceRequest {
    pub item: String,
    pub cut_id: u64,
    /// The stream that carried the request (the answer goes back on it).
    pub reply: Arc<ShipStatus>,
}

/// Live state of a shipped volume: sent to the server four times a second
/// (the agent toggles `paused` and queues answers in `outbox`).
#[derive(Debug, Default)]
pub struct ShipStatus {
    pub state: Mutex<Option<VolumeState>>,
    pub error: Mutex<Option<String>>,
    pub acked: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub resync_bytes: AtomicU64,
    pub resync_chunks_sent: AtomicU64,
    pub in_flight: AtomicU64,
    pub rpo_ms: AtomicU64,
    /// Frames to send on the stream (answers to the server's requests).
    pub outbox: Mutex<Vec<Frame>>,
    /// Replication paused by the operator: nothing ships, the journal (then
    /// the dirty map) keeps what changes.
    pub paused: std::sync::atomic::AtomicBool,
    /// Progress of the running pass: data bytes it covers and compared.
    pub pass_total_bytes: AtomicU64,
    pub pass_done_bytes: AtomicU64,
    pub pass_started: Mutex<Option<Instant>>,
}

impl ShipStatus {
    fn set_state(&self, s: VolumeState) {
        *self.state.lock().unwrap() = Some(s);
    }
    pub fn state(&self) -> Option<VolumeState> {
        *self.state.lock().unwrap()
    }
}

/// Ship `src` to the server until `stop` turns true, reconnecting after
/// errors (with backoff).
pub async fn ship_forever(
    src: Arc<Source>,
    opts: ShipOptions,
    status: Arc<ShipStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return;
        }
        let r = tokio::select! {
            r = ship_once(&src, &opts, &status) => r,
            _ = stop.changed() => return,
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!("{}/{}: replication stream: {msg}", src.item, src.volume);
                *status.error.lock().unwrap() = Some(msg);
                src.dirty.pass_end(false);
                status.set_state(VolumeState::Error);
            }
        }
        // wait before reconnecting, keeping the journal within its bound
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if let Err(e) = check_overflow(&src, &opts, &status).await {
                tracing::error!("{}/{}: {e:#}", src.item, src.volume);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed() => return,
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Open a TLS connection to the server.
///
/// # Errors
/// Connection or handshake errors.
pub async fn connect(server: &str, tls: Arc<rustls::ClientConfig>) -> Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(server))
        .await
        .map_err(|_| anyhow!("connecting to {server} timed out"))?
        .with_context(|| format!("cannot connect to {server}"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(crate::tls::SERVER_NAME)?;
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake with {server} timed out"))?
    .with_context(|| format!("TLS handshake with {server} failed"))?;
    Ok(s)
}

/// Events from the reading half.
enum Event {
    Want(Vec<u64>),
    ResyncAcked,
}

struct Writer<W> {
    /// Small pieces (frames, record headers, small writes) are gathered
    /// here; pieces as large as it go to the stream as they are.
    w: tokio::io::BufWriter<W>,
    throttle: Throttle,
    status: Arc<ShipStatus>,
    enc: BatchEncoder,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    fn new(w: W, throttle: Throttle, status: Arc<ShipStatus>) -> Self {
        Writer {
            w: tokio::io::BufWriter::with_capacity(64 << 10, w),
            throttle,
            status,
            enc: BatchEncoder::default(),
        }
    }

    async fn send(&mut self, f: &Frame) -> Result<()> {
        let b = f.encode();
        Self::put(&mut self.w, &mut self.throttle, &self.status, &[&b]).await
    }

    /// Send a batch of `recs` (their data is not copied into a payload
    /// first); returns its raw length.
    async fn send_records(&mut self, recs: &[RecRef<'_>]) -> Result<u64> {
        let b = self.enc.encode(recs);
        let head = batch_head(b.codec, b.raw_len, b.len());
        let mut pieces = Vec::with_capacity(b.parts.len() + 1);
        pieces.push(&head[..]);
        pieces.extend_from_slice(&b.parts);
        Self::put(&mut self.w, &mut self.throttle, &self.status, &pieces).await?;
        Ok(b.raw_len as u64)
    }

    /// Write `pieces` (one frame) within the bandwidth limit, counted, and
    /// flush.
    async fn put(
        w: &mut tokio::io::BufWriter<W>,
        throttle: &mut Throttle,
        status: &ShipStatus,
        pieces: &[&[u8]],
    ) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let n = pieces.iter().map(|p| p.len() as u64).sum();
        throttle.take(n).await;
        status.sent_bytes.fetch_add(n, Ordering::Relaxed);
        for p in pieces {
            w.write_all(p).await?;
        }
        w.flush().await?;
        Ok(())
    }
}

/// A journal record as a batch record.
fn rec_of(r: &lifeboat_capture::journal::OwnedRecord) -> RecRef<'_> {
    RecRef {
        kind: kind_of(r.kind),
        seq: r.seq,
        offset: r.offset,
        len: r.len,
        data: &r.data,
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn kind_of(k: RecordKind) -> RecKind {
    match k {
        RecordKind::Write => RecKind::Write,
        RecordKind::Zero => RecKind::Zero,
        RecordKind::Trim => RecKind::Trim,
        RecordKind::Barrier => RecKind::Barrier,
    }
}

/// One connection's life.
async fn ship_once(src: &Arc<Source>, opts: &ShipOptions, status: &Arc<ShipStatus>) -> Result<()> {
    let s = connect(&opts.server, opts.tls.clone()).await?;
    let (mut rd, wr) = tokio::io::split(s);
    let mut w: Writer<WriteHalf<TlsStream<TcpStream>>> =
        Writer::new(wr, Throttle::new(opts.bandwidth.clone()), status.clone());
    w.send(&Frame::Hello {
        version: PROTO_VERSION,
        item: src.item.clone(),
        volume: src.volume.clone(),
        size: src.size,
        chunk_size: src.dirty.chunk_size(),
        journal_id: src.journal.id(),
        // what a restarted server may have applied without acknowledging:
        // any record this journal holds
        durable: src.journal.committed(),
        follows: src.journal.follows(),
    })
    .await?;
    let (applied, synced) = match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd))
        .await
        .map_err(|_| anyhow!("the server did not answer the hello"))??
    {
        Some(Frame::Welcome {
            applied_seq,
            synced,
        }) => (applied_seq, synced),
        Some(Frame::Error { message, .. }) => bail!("the server refused the stream: {message}"),
        Some(f) => bail!(
            "unexpected {} from the server",
            crate::receiver::frame_name(&f)
        ),
        None => bail!("the server closed the connection"),
    };
    *status.error.lock().unwrap() = None;
    status.acked.store(applied, Ordering::Relaxed);
    tracing::info!(
        "{}/{}: connected; server holds seq {applied}, synced {synced}",
        src.item,
        src.volume
    );

    // The reading half: acknowledgements, wants, errors.
    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(4);
    let (ack_tx, mut ack_rx) = watch::channel(applied);
    let rsrc = src.clone();
    let rstatus = status.clone();
    let rcontrol = opts.control.clone();
    let mut reader = tokio::spawn(async move {
        let mut last_clear = Instant::now() - Duration::from_secs(10);
        // (time, committed seq) samples: bits of chunks written in the last
        // HOT seconds stay set, so a busy region is not re-marked (and
        // synced) on every write
        let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd))
                .await
                .map_err(|_| anyhow!("the server has been silent for 30 s"))??;
            let ack = matches!(f, Some(Frame::Ack { .. }));
            if let Some(Frame::Ack { seq, resync_done }) = &f {
                rstatus.acked.store(*seq, Ordering::Relaxed);
                // the memory tail's acknowledged records go at once (cheap)
                rsrc.journal.release(*seq);
                let _ = ack_tx.send(*seq);
                if *resync_done {
                    rsrc.dirty.pass_end(true);
                    // the recovery site holds this journal's state now:
                    // the journal it followed after a crash is forgotten
                    // (before any bit is cleared under this journal)
                    rsrc.journal.forget_follows()?;
                    let _ = ev_tx.send(Event::ResyncAcked).await;
                }
            }
            // On acks and on the pongs that answer the pings (4 per second),
            // so the last ack of a burst is acted on too.
            if ack || matches!(f, Some(Frame::Pong { .. })) {
                let seq = rstatus.acked.load(Ordering::Relaxed);
                let (j, d) = (rsrc.journal.clone(), rsrc.dirty.clone());
                let clear = last_clear.elapsed() > Duration::from_millis(500);
                let mut upto = 0;
                if clear {
                    last_clear = Instant::now();
                    samples.push_back((Instant::now(), j.committed()));
                    while samples.len() > 1 && samples[1].0.elapsed() >= HOT {
                        samples.pop_front();
                    }
                    upto = match samples.front() {
                        Some((t, c)) if t.elapsed() >= HOT => seq.min(*c),
                        _ => 0,
                    };
                }
                // trimming lists segments under the journal lock every
                // writer needs: at most twice a second
                if clear {
                    let f = rsrc.file.clone();
                    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                        j.trim(seq)?;
                        // (upto 0 clears only groups no write of this run
                        // touched: left from before a restart, compared)
                        if d.would_clear(upto, HOT_GROUPS) {
                            // bits are cleared only for writes durable here
                            // too: a machine crash must not lose a write
                            // the recovery site holds without a compare
                            // (the volume is synced only when that clears
                            // something: the sync of a large backlog stalls
                            // the map's own syncs behind it)
                            if !d.volume_sync_seen() || d.volume_synced_upto() < upto {
                                let c = j.committed();
                                f.sync_data()?;
                                d.volume_synced(c);
                            }
                            j.set_cleared(upto)?;
                            d.clear_acked_keeping(upto, HOT_GROUPS)?;
                        }
                        Ok(())
                    })
                    .await??;
                }
            }
            match f {
                Some(Frame::Ack { .. }) => {}
                Some(Frame::Want { chunks }) => {
                    let _ = ev_tx.send(Event::Want(chunks)).await;
                }
                Some(Frame::Pong { .. }) => {}
                Some(Frame::Quiesce { cut_id }) => {
                    let sent = rcontrol.as_ref().is_some_and(|c| {
                        c.send(QuiesceRequest {
                            item: rsrc.item.clone(),
                            cut_id,
                            reply: rstatus.clone(),
                        })
                        .is_ok()
                    });
                    if !sent {
                        rstatus.outbox.lock().unwrap().push(Frame::Quiesced {
                            cut_id,
                            ok: false,
                            message: "this agent takes no app-consistent cuts".into(),
                        });
                    }
                }
                Some(Frame::Error { message, .. }) => {
                    bail!("the server ended the stream: {message}")
                }
                Some(f) => bail!(
                    "unexpected {} from the server",
                    crate::receiver::frame_name(&f)
                ),
                None => bail!("the server closed the connection"),
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    });

    // the reader goes with this connection, however it ends (an aborted
    // shipper must not go on clearing bits of a volume being restarted)
    let _stop_reader = AbortOnDrop(reader.abort_handle());

    // a recovery site that lacks records this journal already removed after
    // acknowledgement (its state was restored from an older copy), or that
    // is ahead of this journal, can only be brought back by a full compare
    let mut need_full =
        !synced || applied < src.journal.floor() || applied > src.journal.committed();
    if synced && need_full {
        tracing::warn!(
            "{}/{}: the recovery site holds seq {applied}, this journal {}..{} (floor {}): a full compare follows",
            src.item,
            src.volume,
            src.journal.oldest(),
            src.journal.committed(),
            src.journal.floor()
        );
    }
    // a journal that follows another after a crash: the replica is not a
    // crash state of this one until a pass (over the dirty map's chunks,
    // however few) is acknowledged
    let mut need_pass = src.journal.follows().is_some();
    let mut cursor = Cursor::new(applied + 1);
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let started = Instant::now();
    let mut flights = Flights::default();
    let mut next_scan = Instant::now();
    let mut last_scan: Option<Instant> = None;
    let result: Result<()> = async {
        loop {
            // scan mode: a full compare by hash on schedule
            if let Some(iv) = opts.scan_interval {
                if Instant::now() >= next_scan {
                    need_full = true;
                    next_scan = Instant::now() + iv;
                }
            }
            // a gap (dropped journal), pending dirty chunks, or no initial sync: a pass
            let gap = src.journal.oldest() > cursor.next_seq();
            if need_full || need_pass || gap || src.dirty.pending() > 0 {
                status.set_state(if need_full {
                    VolumeState::InitialSync
                } else {
                    VolumeState::Resyncing
                });
                let began = Instant::now();
                run_pass(src, opts, status, &mut w, &mut ev_rx, &mut cursor, need_full, &mut ack_rx)
                    .await?;
                if need_full && opts.scan_interval.is_some() {
                    last_scan = Some(began);
                }
                need_full = false;
                need_pass = false;
                continue;
            }
            // paused by the operator: report, keep the journal bounded, ship nothing
            if status.paused.load(Ordering::Relaxed) {
                status.set_state(VolumeState::Paused);
                check_overflow(src, opts, status).await?;
                if last_status.elapsed() >= Duration::from_millis(250) {
                    last_status = Instant::now();
                    update_rpo(src, status, started, opts.scan_interval.map(|_| last_scan));
                    send_status(&mut w, src, status).await?;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    r = &mut reader => return Err(match r { Ok(Err(e)) => e, Ok(Ok(())) => anyhow!("reader ended"), Err(e) => e.into() }),
                }
                continue;
            }
            status.set_state(VolumeState::Protected);
            // overflow: drop the journal; the dirty map bounds the resync
            if check_overflow(src, opts, status).await? {
                continue;
            }
            // backpressure: wait while too much is unacknowledged
            flights.settle(*ack_rx.borrow(), status);
            if flights.bytes > opts.window {
                ack_rx.changed().await.map_err(|_| anyhow!("the connection ended"))?;
                continue;
            }
            let j = src.journal.clone();
            let mut c = std::mem::replace(&mut cursor, Cursor::new(0));
            let max = opts.batch_max;
            let (c, recs) = tokio::task::spawn_blocking(move || {
                // committed records leave at once, durable or not (see the
                // journal's module doc for what a machine crash does)
                let r = c.read(&j, max);
                (c, r)
            })
            .await?;
            cursor = c;
            let recs = match recs {
                Ok(r) => r,
                Err(CursorError::Gap { wanted, oldest }) => {
                    if oldest <= wanted {
                        // a missing or damaged segment, not a drop
                        tracing::error!(
                            "{}/{}: the journal cannot be read at seq {wanted}: a full compare follows",
                            src.item,
                            src.volume
                        );
                        need_full = true;
                    }
                    continue;
                }
                Err(CursorError::Io(e)) => return Err(e).context("reading the journal"),
            };
            // answers to the server's requests
            let out: Vec<Frame> = std::mem::take(&mut *status.outbox.lock().unwrap());
            for f in out {
                w.send(&f).await?;
            }
            // health, four times a second
            if last_status.elapsed() >= Duration::from_millis(250) {
                last_status = Instant::now();
                update_rpo(src, status, started, opts.scan_interval.map(|_| last_scan));
                send_status(&mut w, src, status).await?;
            }
            if recs.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    r = &mut reader => return Err(match r { Ok(Err(e)) => e, Ok(Ok(())) => anyhow!("reader ended"), Err(e) => e.into() }),
                }
                continue;
            }
            let last = recs.last().map(|r| r.seq).unwrap_or(0);
            let refs: Vec<RecRef> = recs.iter().map(rec_of).collect();
            let raw = w.send_records(&refs).await?;
            flights.push(last, raw, status);
        }
    }
    .await;
    reader.abort();
    result
}

/// When the journal holds more than `journal_max`, drop it (the chunks its
/// unacknowledged records touched are flagged for a resync). Returns
/// whether it did.
async fn check_overflow(
    src: &Arc<Source>,
    opts: &ShipOptions,
    status: &ShipStatus,
) -> Result<bool> {
    if src.journal.bytes() <= opts.journal_max {
        return Ok(false);
    }
    let acked = status.acked.load(Ordering::Relaxed);
    let (j, d) = (src.journal.clone(), src.dirty.clone());
    let x = tokio::task::spawn_blocking(move || {
        j.drop_unshipped(acked, |_| d.flag_unacked(acked).map(|_| ()))
    })
    .await??;
    tracing::warn!(
        "{}/{}: journal over {} bytes: dropped; resyncing from the dirty map (next seq {x})",
        src.item,
        src.volume,
        opts.journal_max
    );
    Ok(true)
}

/// RPO: the age of the oldest write the recovery site may lack. Splitter:
/// the oldest unacknowledged record (or the running pass); scan: the start
/// of the last completed scan (writes since may be missing).
fn update_rpo(src: &Source, status: &ShipStatus, started: Instant, scan: Option<Option<Instant>>) {
    let acked = status.acked.load(Ordering::Relaxed);
    let committed = src.journal.committed();
    let rpo = if let Some(last) = scan {
        last.unwrap_or(started).elapsed()
    } else if let Some(p) = *status.pass_started.lock().unwrap() {
        p.elapsed()
    } else if committed > acked {
        src.journal
            .oldest_unacked_time(acked)
            .map(|t| t.elapsed())
            .unwrap_or_else(|| started.elapsed())
    } else {
        Duration::ZERO
    };
    status
        .rpo_ms
        .store(rpo.as_millis() as u64, Ordering::Relaxed);
}

async fn send_status<W: AsyncWrite + Unpin>(
    w: &mut Writer<W>,
    src: &Source,
    status: &ShipStatus,
) -> Result<()> {
    w.send(&Frame::Ping {
        t: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    })
    .await?;
    let (total, done) = (
        status.pass_total_bytes.load(Ordering::Relaxed),
        status.pass_done_bytes.load(Ordering::Relaxed),
    );
    let eta_ms = match *status.pass_started.lock().unwrap() {
        Some(t) if done > 0 && total > done => {
            let el = t.elapsed().as_secs_f64();
            ((total - done) as f64 * el / done as f64 * 1000.0) as u64
        }
        _ => 0,
    };
    let f = Frame::Status(lifeboat_format::proto::Health {
        state: status.state().unwrap_or(VolumeState::Protected),
        rpo_ms: status.rpo_ms.load(Ordering::Relaxed),
        lag_bytes: status.in_flight.load(Ordering::Relaxed),
        journal_bytes: src.journal.bytes(),
        sent_bytes: status.sent_bytes.load(Ordering::Relaxed),
        resync_bytes: status.resync_bytes.load(Ordering::Relaxed),
        written_bytes: src.journal.changed_bytes(),
        pass_total_bytes: total,
        pass_done_bytes: done,
        pass_eta_ms: eta_ms,
    });
    w.send(&f).await
}

/// Batches sent and not yet acknowledged: (last seq, bytes). Their sum is
/// the lag the agent reports and what backpressure bounds.
#[derive(Default)]
struct Flights {
    sent: std::collections::VecDeque<(u64, u64)>,
    bytes: u64,
}

impl Flights {
    fn push(&mut self, seq: u64, bytes: u64, status: &ShipStatus) {
        self.sent.push_back((seq, bytes));
        self.bytes += bytes;
        status.in_flight.store(self.bytes, Ordering::Relaxed);
    }

    /// Forget the batches the server acknowledged.
    fn settle(&mut self, acked: u64, status: &ShipStatus) {
        while self.sent.front().is_some_and(|(s, _)| *s <= acked) {
            let (_, b) = self.sent.pop_front().expect("front exists");
            self.bytes -= b;
        }
        status.in_flight.store(self.bytes, Ordering::Relaxed);
    }
}

/// A chunk read for a resync: number, bytes (empty for a hole), hash.
type ReadChunk = (u64, Vec<u8>, [u8; 32]);

/// Hash of a chunk's bytes, [`ZERO_HASH`] when all zero.
pub fn chunk_hash(b: &[u8]) -> [u8; 32] {
    if b.iter().all(|x| *x == 0) {
        ZERO_HASH
    } else {
        *blake3::hash(b).as_bytes()
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_pass<W: AsyncWrite + Unpin>(
    src: &Arc<Source>,
    opts: &ShipOptions,
    status: &Arc<ShipStatus>,
    w: &mut Writer<W>,
    ev: &mut mpsc::Receiver<Event>,
    cursor: &mut Cursor,
    full: bool,
    ack_rx: &mut watch::Receiver<u64>,
) -> Result<()> {
    let x = src.journal.committed() + 1;
    w.send(&Frame::ResyncBegin { x, full }).await?;
    // the records below x the journal still holds
    if cursor.next_seq() < src.journal.oldest() {
        *cursor = Cursor::new(src.journal.oldest());
    }
    while cursor.next_seq() < x {
        let j = src.journal.clone();
        let mut c = std::mem::replace(cursor, Cursor::new(0));
        let (c, recs) = tokio::task::spawn_blocking(move || {
            let r = c.read(&j, 4 << 20);
            (c, r)
        })
        .await?;
        *cursor = c;
        let recs = match recs {
            Ok(r) => r,
            Err(CursorError::Gap { .. }) => {
                // dropped meanwhile: those chunks are flagged for this or the next pass
                *cursor = Cursor::new(x.max(src.journal.oldest()));
                break;
            }
            Err(CursorError::Io(e)) => return Err(e.into()),
        };
        let refs: Vec<RecRef> = recs.iter().filter(|r| r.seq < x).map(rec_of).collect();
        if recs.iter().any(|r| r.seq >= x) || recs.is_empty() {
            // read past x: start again at x after the pass
            if !refs.is_empty() {
                w.send_records(&refs).await?;
            }
            break;
        }
        w.send_records(&refs).await?;
    }
    *cursor = Cursor::new(x);
    if full {
        src.dirty.flag_all();
    }
    let chunks = src.dirty.pass_begin();
    let cs = src.dirty.chunk_size() as u64;
    let extents = {
        let f = src.file.clone();
        let size = src.size;
        tokio::task::spawn_blocking(move || lifeboat_capture::extents::data_extents(&f, size))
            .await??
    };
    // extents are sorted and disjoint: the first one ending past s decides
    let in_data = |c: u64| {
        let (s, e) = (c * cs, ((c + 1) * cs).min(src.size));
        let i = extents.partition_point(|r| r.end <= s);
        extents.get(i).is_some_and(|r| r.start < e)
    };
    // progress over the data the pass covers (holes cost nothing)
    let total: u64 = chunks
        .iter()
        .filter(|c| in_data(**c))
        .map(|c| cs.min(src.size - c * cs))
        .sum();
    status.pass_total_bytes.store(total, Ordering::Relaxed);
    status.pass_done_bytes.store(0, Ordering::Relaxed);
    *status.pass_started.lock().unwrap() = Some(Instant::now());
    // the status frames go out with the chunk batches
    let mut last_report = Instant::now();
    for group in chunks.chunks(MAX_HASHES.min(512)) {
        if last_report.elapsed() >= Duration::from_millis(250) {
            last_report = Instant::now();
            if opts.scan_interval.is_none() {
                // during a pass the RPO is the pass's age
                update_rpo(src, status, Instant::now(), None);
            }
            send_status(w, src, status).await?;
        }
        // keep the journal bounded during long passes too
        check_overflow(src, opts, status).await?;
        // read and hash (data chunks only; holes hash as zero unread)
        let f = src.file.clone();
        let size = src.size;
        let todo: Vec<(u64, bool)> = group.iter().map(|c| (*c, in_data(*c))).collect();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<ReadChunk>> {
            let mut out = Vec::with_capacity(todo.len());
            for (c, data) in todo {
                let off = c * cs;
                let len = cs.min(size - off) as usize;
                if !data {
                    out.push((c, Vec::new(), ZERO_HASH));
                    continue;
                }
                let mut b = vec![0u8; len];
                f.read_exact_at(&mut b, off)?;
                let h = chunk_hash(&b);
                out.push((c, b, h));
            }
            Ok(out)
        })
        .await??;
        w.send(&Frame::Hashes {
            chunks: read.iter().map(|(c, _, h)| (*c, *h)).collect(),
        })
        .await?;
        let want = match tokio::time::timeout(Duration::from_secs(120), ev.recv()).await {
            Ok(Some(Event::Want(w))) => w,
            Ok(Some(Event::ResyncAcked)) => bail!("unexpected resync acknowledgement"),
            Ok(None) => bail!("the connection ended during a resync"),
            Err(_) => bail!("the server did not answer hashes within 120 s"),
        };
        let mut refs = Vec::new();
        let (mut nbytes, mut pending) = (0u64, 0usize);
        for (c, b, _) in &read {
            if want.contains(c) {
                refs.push(RecRef {
                    kind: RecKind::Chunk,
                    seq: 0,
                    offset: c * cs,
                    len: b.len() as u32,
                    data: b,
                });
                nbytes += b.len() as u64;
                pending += RECORD_HEADER + b.len();
                status.resync_chunks_sent.fetch_add(1, Ordering::Relaxed);
                if pending >= opts.batch_max {
                    w.send_records(&std::mem::take(&mut refs)).await?;
                    pending = 0;
                }
            }
        }
        if !refs.is_empty() {
            w.send_records(&refs).await?;
        }
        status.resync_bytes.fetch_add(nbytes, Ordering::Relaxed);
        let read_bytes: u64 = read.iter().map(|(_, b, _)| b.len() as u64).sum();
        status
            .pass_done_bytes
            .fetch_add(read_bytes, Ordering::Relaxed);
    }
    status.pass_total_bytes.store(0, Ordering::Relaxed);
    status.pass_done_bytes.store(0, Ordering::Relaxed);
    *status.pass_started.lock().unwrap() = None;
    // the chunks were read at or after these records: the replica is a
    // crash state again only once it has applied up to `settle`
    let settle = src.journal.committed();
    w.send(&Frame::ResyncEnd { x, settle }).await?;
    match tokio::time::timeout(Duration::from_secs(120), ev.recv()).await {
        Ok(Some(Event::ResyncAcked)) => {}
        Ok(Some(Event::Want(_))) => bail!("unexpected want"),
        Ok(None) => bail!("the connection ended during a resync"),
        Err(_) => bail!("the server did not acknowledge the resync within 120 s"),
    }
    let _ = ack_rx.borrow_and_update();
    tracing::info!(
        "{}/{}: resync pass to seq {x} done ({} chunks compared, {} sent so far)",
        src.item,
        src.volume,
        chunks.len(),
        status.resync_chunks_sent.load(Ordering::Relaxed)
    );
    Ok(())
}
