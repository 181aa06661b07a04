//! An NBD server for one volume: the IO splitter's front end. With a
//! [`Journal`], every change is appended to it, in order, before the volume
//! sees it and before it is acknowledged; FLUSH and FUA become barriers that
//! are durable in the volume and the journal before they return. Fixed newstyle handshake, simple and structured
//! replies, `base:allocation` block status from SEEK_DATA/SEEK_HOLE, and
//! READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES, CACHE, DISC over TCP or a
//! Unix socket. Per connection, one thread reads requests and a few serve
//! them concurrently, replying as each is done. The wire format is in `lifeboat_format::nbd`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use lifeboat_format::nbd::*;

use crate::extents::{data_extents_at_most, read_full};

pub use crate::splitter::Export;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_exact<S: Read>(s: &mut S, n: usize) -> io::Result<Vec<u8>> {
    // not zeroed first: read_to_end fills spare capacity
    let mut v = Vec::with_capacity(n);
    s.take(n as u64).read_to_end(&mut v)?;
    if v.len() < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(v)
}

/// Serve one client until it disconnects. Protocol violations end the
/// connection with an error naming them; nothing is written to the volume
/// for a request that was not understood.
///
/// # Errors
/// I/O errors on the socket and protocol violations.
pub fn handle<S: Conn>(mut s: S, export: &Export, shutdown: &AtomicBool) -> io::Result<()> {
    // --- handshake
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(invalid("client does not speak fixed newstyle NBD"));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut h)?;
        let oh = parse_option_header(&h).map_err(|e| invalid(e.to_string()))?;
        let payload = read_exact(&mut s, oh.len as usize)?;
        let name_ok = |n: &str| n.is_empty() || n == export.name;
        match oh.option {
            OPT_EXPORT_NAME => {
                if !name_ok(&String::from_utf8_lossy(&payload)) {
                    return Err(invalid("unknown export name"));
                }
                let mut v = export.size.to_be_bytes().to_vec();
                v.extend_from_slice(&export.tflags().to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)?;
                break;
            }
            OPT_ABORT => {
                s.write_all(&option_reply(oh.option, REP_ACK, &[]))?;
                return Ok(());
            }
            OPT_LIST => {
                let mut p = (export.name.len() as u32).to_be_bytes().to_vec();
                p.extend_from_slice(export.name.as_bytes());
                s.write_all(&option_reply(oh.option, REP_SERVER, &p))?;
                s.write_all(&option_reply(oh.option, REP_ACK, &[]))?;
            }
            OPT_INFO | OPT_GO => {
                let Ok((name, _infos)) = parse_go(&payload) else {
                    s.write_all(&option_reply(oh.option, REP_ERR_INVALID, &[]))?;
                    continue;
                };
                if !name_ok(&name) {
                    s.write_all(&option_reply(oh.option, REP_ERR_UNKNOWN, &[]))?;
                    continue;
                }
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&export.size.to_be_bytes());
                p.extend_from_slice(&export.tflags().to_be_bytes());
                s.write_all(&option_reply(oh.option, REP_INFO, &p))?;
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&4096u32.to_be_bytes());
                b.extend_from_slice(&MAX_IO_LEN.to_be_bytes());
                s.write_all(&option_reply(oh.option, REP_INFO, &b))?;
                s.write_all(&option_reply(oh.option, REP_ACK, &[]))?;
                if oh.option == OPT_GO {
                    break;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if oh.len != 0 {
                    s.write_all(&option_reply(oh.option, REP_ERR_INVALID, &[]))?;
                } else {
                    structured = true;
                    s.write_all(&option_reply(oh.option, REP_ACK, &[]))?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let parsed = parse_meta_context(&payload);
                match parsed {
                    Ok((name, queries)) if structured && name_ok(&name) => {
                        let list = oh.option == OPT_LIST_META_CONTEXT;
                        let wanted = queries.iter().any(|q| {
                            q == BASE_ALLOCATION || (list && (q == "base:" || q.is_empty()))
                        }) || (list && queries.is_empty());
                        if wanted {
                            let mut p = 1u32.to_be_bytes().to_vec();
                            p.extend_from_slice(BASE_ALLOCATION.as_bytes());
                            s.write_all(&option_reply(oh.option, REP_META_CONTEXT, &p))?;
                            if !list {
                                base_allocation = true;
                            }
                        }
                        s.write_all(&option_reply(oh.option, REP_ACK, &[]))?;
                    }
                    _ => s.write_all(&option_reply(oh.option, REP_ERR_INVALID, &[]))?,
                }
            }
            OPT_STARTTLS => s.write_all(&option_reply(oh.option, REP_ERR_POLICY, &[]))?,
            _ => s.write_all(&option_reply(oh.option, REP_ERR_UNSUP, &[]))?,
        }
    }

    // --- transmission
    transmission(s, export, structured, base_allocation, shutdown)
}

/// Requests of one connection served at once (reads in parallel; writes
/// meet at the journal lock, which keeps the journal and the volume in the
/// same order).
const WORKERS: usize = 4;

/// Requests up to this size are served by the reading thread itself:
/// handing them to a worker costs more than serving them.
const INLINE_MAX: u32 = 64 << 10;

/// The transmission phase: this thread reads requests (through a buffer,
/// so several small requests cost one read), serves small ones itself and
/// hands large ones and flushes to `WORKERS` threads; each reply is sent as
/// soon as it is ready, in any order, as NBD allows. A request is
/// acknowledged only after it is done; DISC and end of input wait for every
/// request in flight.
fn transmission<S: Conn>(
    s: S,
    export: &Export,
    structured: bool,
    base_allocation: bool,
    shutdown: &AtomicBool,
) -> io::Result<()> {
    let out = Mutex::new(s.dup()?);
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    let (tx, rx) = mpsc::sync_channel::<(Request, Vec<u8>)>(WORKERS);
    let rx = Mutex::new(rx);
    // small enough that little of a large write's payload is read into it
    // (and copied out again) with the request before it
    let mut r = io::BufReader::with_capacity(64 << 10, s);
    let run = |req: Request, payload: Vec<u8>| {
        let reply = match serve(export, &req, payload, structured, base_allocation) {
            Ok(v) => v,
            Err((errno, msg)) if structured => structured_error(req.cookie, errno, &msg),
            Err((errno, _)) => simple_reply(req.cookie, errno).to_vec(),
        };
        if let Err(e) = out.lock().unwrap().write_all(&reply) {
            failed.lock().unwrap().get_or_insert(e);
        }
    };
    let res = std::thread::scope(|sc| {
        for _ in 0..WORKERS {
            sc.spawn(|| loop {
                let job = rx.lock().unwrap().recv();
                let Ok((req, payload)) = job else { return };
                run(req, payload);
            });
        }
        let res = read_requests(&mut r, &tx, shutdown, &run);
        drop(tx);
        res
    });
    match failed.into_inner().unwrap() {
        Some(e) if res.is_ok() => Err(e),
        _ => res,
    }
}

fn read_requests<R: Read>(
    r: &mut R,
    tx: &mpsc::SyncSender<(Request, Vec<u8>)>,
    shutdown: &AtomicBool,
    inline: &dyn Fn(Request, Vec<u8>),
) -> io::Result<()> {
    loop {
        if shutdown.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut h = [0u8; REQUEST_LEN];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = parse_request(&h).map_err(|e| invalid(e.to_string()))?;
        if req.kind == CMD_WRITE && req.len > MAX_IO_LEN {
            return Err(invalid(format!(
                "write of {} bytes is over the limit",
                req.len
            )));
        }
        let payload = if req.kind == CMD_WRITE {
            read_exact(r, req.len as usize)?
        } else {
            Vec::new()
        };
        if req.kind == CMD_DISC {
            return Ok(());
        }
        let quick = matches!(
            req.kind,
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE | CMD_BLOCK_STATUS
        ) && req.len <= INLINE_MAX
            && req.flags & CMD_FLAG_FUA == 0;
        if quick {
            inline(req, payload);
        } else if tx.send((req, payload)).is_err() {
            return Ok(());
        }
    }
}

/// A connection whose two directions can be used from two threads.
pub trait Conn: Read + Write + Send + Sized {
    /// Another handle on the same connection.
    ///
    /// # Errors
    /// As `try_clone`.
    fn dup(&self) -> io::Result<Self>;
    /// Shut both directions (a thread blocked reading it returns).
    fn shut(&self);
}

impl Conn for std::os::unix::net::UnixStream {
    fn dup(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Conn for std::net::TcpStream {
    fn dup(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

type Served = Result<Vec<u8>, (u32, String)>;

fn io_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) => ENOSPC,
        Some(1) | Some(13) => EPERM,
        _ => EIO,
    }
}

fn ok(cookie: u64, structured: bool) -> Vec<u8> {
    if structured {
        structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec()
    } else {
        simple_reply(cookie, 0).to_vec()
    }
}

fn serve(
    export: &Export,
    req: &Request,
    payload: Vec<u8>,
    structured: bool,
    base_allocation: bool,
) -> Served {
    let end = req.offset.checked_add(req.len as u64);
    if end.is_none_or(|e| e > export.size) {
        return Err((
            EINVAL,
            format!(
                "request {}+{} is past the end ({})",
                req.offset, req.len, export.size
            ),
        ));
    }
    let f = &export.file;
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only {
        return Err((EPERM, "the export is read-only".into()));
    }
    let err = |e: io::Error| (io_errno(&e), e.to_string());
    let fua = || -> Result<(), (u32, String)> {
        if req.flags & CMD_FLAG_FUA != 0 {
            export.flush().map_err(err)?;
        }
        Ok(())
    };
    match req.kind {
        CMD_READ => {
            if req.len > MAX_IO_LEN {
                return Err((EOVERFLOW, "read too large".into()));
            }
            let mut v;
            if structured {
                v = structured_header(
                    req.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + req.len,
                )
                .to_vec();
                v.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                v = simple_reply(req.cookie, 0).to_vec();
            }
            let at = v.len();
            v.resize(at + req.len as usize, 0);
            read_full(f, &mut v[at..], req.offset).map_err(|e| (io_errno(&e), e.to_string()))?;
            Ok(v)
        }
        CMD_WRITE => {
            export
                .write_shared(req.offset, std::sync::Arc::new(payload))
                .map_err(err)?;
            fua()?;
            Ok(ok(req.cookie, structured))
        }
        CMD_FLUSH => {
            export.flush().map_err(err)?;
            Ok(ok(req.cookie, structured))
        }
        CMD_TRIM => {
            export.trim(req.offset, req.len as u64).map_err(err)?;
            fua()?;
            Ok(ok(req.cookie, structured))
        }
        CMD_WRITE_ZEROES => {
            let may_punch = req.flags & CMD_FLAG_NO_HOLE == 0;
            if !may_punch && req.flags & CMD_FLAG_FAST_ZERO != 0 {
                return Err((ENOTSUP, "no fast zeroing here".into()));
            }
            export
                .zero(req.offset, req.len as u64, may_punch)
                .map_err(err)?;
            fua()?;
            Ok(ok(req.cookie, structured))
        }
        CMD_CACHE => {
            let _ = rustix::fs::fadvise(
                f,
                req.offset,
                std::num::NonZeroU64::new(req.len as u64),
                rustix::fs::Advice::WillNeed,
            );
            Ok(ok(req.cookie, structured))
        }
        CMD_BLOCK_STATUS => {
            if !structured || !base_allocation {
                return Err((
                    EINVAL,
                    "negotiate structured replies and base:allocation first".into(),
                ));
            }
            let descs = block_status(
                f,
                req.offset,
                req.len as u64,
                req.flags & CMD_FLAG_REQ_ONE != 0,
            )
            .map_err(|e| (io_errno(&e), e.to_string()))?;
            let mut v = structured_header(
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                4 + 8 * descs.len() as u32,
            )
            .to_vec();
            v.extend_from_slice(&1u32.to_be_bytes());
            for (len, flags) in descs {
                v.extend_from_slice(&len.to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
            }
            Ok(v)
        }
        k => Err((EINVAL, format!("unknown command {k}"))),
    }
}

/// `base:allocation` descriptors for `[offset, offset+len)`: data is 0, holes
/// are HOLE|ZERO.
fn block_status(f: &File, offset: u64, len: u64, one: bool) -> io::Result<Vec<(u32, u32)>> {
    let end = offset + len;
    // Only the window asked about, and at most MAX_EXTENTS of it (REQ_ONE:
    // one): clients such as `qemu-img map` ask about the whole rest of the
    // image at every step, and NBD lets a reply cover a prefix of the range.
    const MAX_EXTENTS: usize = 1024;
    let limit = if one { 1 } else { MAX_EXTENTS };
    let data = data_extents_at_most(f, offset, end, limit)?;
    let complete = data.len() < limit;
    let mut out = Vec::new();
    let mut pos = offset;
    for r in data.iter().filter(|r| r.end > offset && r.start < end) {
        let s = r.start.max(offset);
        if s > pos {
            out.push(((s - pos) as u32, STATE_HOLE | STATE_ZERO));
        }
        let e = r.end.min(end);
        out.push(((e - s) as u32, 0));
        pos = e;
        if one {
            break;
        }
    }
    // the hole after the last extent found is known only if the scan
    // reached the end of the window
    if pos < end && complete && (!one || out.is_empty()) {
        out.push(((end - pos) as u32, STATE_HOLE | STATE_ZERO));
    }
    if one {
        out.truncate(1);
    }
    Ok(out)
}

/// Accept connections until `shutdown` is set, one thread per client;
/// then shut the clients' connections and wait (up to `STOP_WAIT`) for
/// their threads, so no request is still being served when this returns.
pub fn serve_listener<L, S>(accept: L, export: Arc<Export>, shutdown: Arc<AtomicBool>)
where
    L: Fn() -> io::Result<S>,
    S: Conn + 'static,
{
    type Live<S> = Arc<(Mutex<std::collections::HashMap<u64, S>>, std::sync::Condvar)>;
    let live: Live<S> = Arc::default();
    let mut next_id = 0u64;
    while !shutdown.load(Ordering::Relaxed) {
        match accept() {
            Ok(stream) => {
                let export = export.clone();
                let shutdown = shutdown.clone();
                let id = next_id;
                next_id += 1;
                match stream.dup() {
                    Ok(ctl) => {
                        live.0.lock().unwrap().insert(id, ctl);
                    }
                    Err(e) => {
                        tracing::warn!("nbd client refused: {e}");
                        continue;
                    }
                }
                let live = live.clone();
                std::thread::spawn(move || {
                    // gone from the live set however this thread ends
                    struct Gone<S>(Live<S>, u64);
                    impl<S> Drop for Gone<S> {
                        fn drop(&mut self) {
                            self.0 .0.lock().unwrap().remove(&self.1);
                            self.0 .1.notify_all();
                        }
                    }
                    let _gone = Gone(live, id);
                    match handle(stream, &export, &shutdown) {
                        Ok(()) => {}
                        // a probe or a client that went away
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::BrokenPipe
                                    | io::ErrorKind::UnexpectedEof
                                    | io::ErrorKind::ConnectionReset
                            ) =>
                        {
                            tracing::debug!("nbd client went away: {e}")
                        }
                        Err(e) => tracing::warn!("nbd client disconnected: {e}"),
                    }
                });
            }
            Err(e) => tracing::warn!("nbd accept failed: {e}"),
        }
    }
    let (set, cv) = &*live;
    let mut g = set.lock().unwrap();
    for c in g.values() {
        c.shut();
    }
    let t = std::time::Instant::now();
    while !g.is_empty() && t.elapsed() < STOP_WAIT {
        g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
    }
    if !g.is_empty() {
        tracing::warn!(
            "{} NBD connection(s) still busy {} s after the stop",
            g.len(),
            STOP_WAIT.as_secs()
        );
    }
}

/// How long a stopping export waits for its NBD connections' threads.
const STOP_WAIT: Duration = Duration::from_secs(10);
