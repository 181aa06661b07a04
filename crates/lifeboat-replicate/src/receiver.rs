//! The server's side of one replication stream, without I/O of its own: it
//! takes frames, applies them through a [`ReplicaIo`] and returns the
//! frames to send back (the tokio driver in the server does the sockets).
//!
//! Invariants:
//! * records are applied strictly in sequence order; a record at or below
//!   the applied sequence is a resend after a reconnect and is skipped; a
//!   record past the next expected one is a gap and ends the stream (the
//!   agent then resyncs), except inside a resync pass, where the agent said
//!   which records may be missing;
//! * an [`Frame::Ack`] is sent only after the replica is synced and the new
//!   applied sequence persisted, so an acknowledged write survives a crash
//!   of the server;
//! * the replica is *consistent* (a valid crash state of the source, fit
//!   for a recovery point) outside resync passes and after an initial sync.

use std::io;

use lifeboat_format::proto::{code, Frame, RecKind, MAX_HASHES, ZERO_HASH};

use crate::framed::open_batch_ref;
use lifeboat_format::proto::RecRef;

/// What the receiver needs from the replica volume and the state store.
pub trait ReplicaIo {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make `[offset, offset+len)` read as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// BLAKE3 of chunk `chunk` (`len` bytes), or [`ZERO_HASH`] if all zero.
    fn chunk_hash(&mut self, offset: u64, len: u64) -> io::Result<[u8; 32]>;
    /// Make applied data durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Persist the stream position (after [`ReplicaIo::sync`]).
    fn persist(&mut self, st: &StreamState) -> io::Result<()>;
}

/// The durable position of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub applied_seq: u64,
    /// An initial sync against `journal_id` finished.
    pub synced: bool,
    /// No resync pass is half done.
    pub consistent: bool,
    pub journal_id: [u8; 16],
    /// After a resync pass the replica is a crash state again only once
    /// records up to here are applied (chunks were read later than `x`).
    pub settle: u64,
}

impl StreamState {
    /// A valid crash state of the source: synced, no pass half done, settled.
    pub fn is_consistent(&self) -> bool {
        self.synced && self.consistent && self.applied_seq >= self.settle
    }
}

/// Why a stream is ended.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("replica I/O: {0}")]
    Io(#[from] io::Error),
}

impl ReceiveError {
    /// The error frame to send before closing.
    pub fn frame(&self) -> Frame {
        let code = match self {
            ReceiveError::Protocol(_) => code::PROTOCOL,
            ReceiveError::Gap { .. } => code::GAP,
            ReceiveError::Io(_) => code::IO,
        };
        Frame::Error {
            code,
            message: self.to_string(),
        }
    }
}

/// Counters of what a stream did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReceiveStats {
    pub records: u64,
    pub bytes_written: u64,
    pub resync_chunks_compared: u64,
    pub resync_chunks_received: u64,
    pub resync_bytes_received: u64,
}

pub struct Receiver {
    st: StreamState,
    size: u64,
    chunk_size: u64,
    /// Inside a resync pass that ends at this sequence.
    resync: Option<u64>,
    /// Chunks the last Want asked for (only those may come as Chunk records).
    wanted: std::collections::HashSet<u64>,
    /// Stop at the first consistency-group cut marker at or past this id.
    park_at: Option<u64>,
    /// Stopped at this cut marker; `pending` holds the records after it.
    parked: Option<u64>,
    pending: Vec<lifeboat_format::proto::Rec>,
    /// Decompressed batches, reused.
    scratch: Vec<u8>,
    last_marker: u64,
    pub stats: ReceiveStats,
}

impl Receiver {
    /// A receiver for a volume of `size` bytes whose stored position is
    /// `st`; `journal_id` is the agent's. Returns it and the Welcome frame.
    pub fn new(
        mut st: StreamState,
        size: u64,
        chunk_size: u32,
        journal_id: [u8; 16],
        durable: u64,
        follows: Option<([u8; 16], u64)>,
    ) -> (Receiver, Frame) {
        let continues = follows.is_some_and(|(old, cleared)| {
            old == st.journal_id && st.synced && st.applied_seq >= cleared
        });
        if st.journal_id != journal_id && continues {
            // the agent's machine crashed and its journal started over; the
            // replica holds the old journal as far as the agent's dirty map
            // forgot, so the dirty map covers every chunk that may differ:
            // a dirty pass (which the agent starts) brings it back
            tracing::info!(
                "the agent's journal starts over after a machine crash; the replica \
                 continues from its dirty map"
            );
            st = StreamState {
                applied_seq: 0,
                synced: true,
                consistent: false,
                journal_id,
                settle: 0,
            };
        } else if st.journal_id != journal_id {
            // another journal: its sequence numbers mean nothing here, and
            // only a full compare by hash can tell what differs
            st = StreamState {
                applied_seq: 0,
                synced: false,
                consistent: st.consistent,
                journal_id,
                settle: 0,
            };
        }
        // the replica may hold records past `applied_seq` that were applied
        // but not acknowledged (the server stopped in between), in any order:
        // it is a crash state again only once the stream has replayed every
        // record the agent holds
        if durable > st.applied_seq {
            st.settle = st.settle.max(durable);
        }
        let welcome = Frame::Welcome {
            applied_seq: st.applied_seq,
            synced: st.synced,
        };
        (
            Receiver {
                st,
                size,
                chunk_size: chunk_size as u64,
                resync: None,
                wanted: Default::default(),
                park_at: None,
                parked: None,
                pending: Vec::new(),
                scratch: Vec::new(),
                last_marker: 0,
                stats: ReceiveStats::default(),
            },
            welcome,
        )
    }

    pub fn state(&self) -> &StreamState {
        &self.st
    }

    /// Stop applying at the first group cut marker with an id at or past
    /// `target` (None: do not stop).
    pub fn set_park(&mut self, target: Option<u64>) {
        self.park_at = target;
    }

    /// The last periodic cut marker applied (0: none yet).
    pub fn last_marker(&self) -> u64 {
        self.last_marker
    }

    /// The cut marker the stream stopped at, if it did.
    pub fn parked(&self) -> Option<u64> {
        self.parked
    }

    /// Go on after a park: apply the records held back.
    ///
    /// # Errors
    /// As [`Receiver::on_frame`].
    pub fn resume(&mut self, io: &mut dyn ReplicaIo) -> Result<Vec<Frame>, ReceiveError> {
        self.parked = None;
        self.park_at = None;
        let recs = std::mem::take(&mut self.pending);
        if recs.is_empty() {
            return Ok(vec![]);
        }
        self.apply(recs.iter().map(|r| r.as_ref()).collect(), io)?;
        Ok(vec![self.ack(io, false)?])
    }

    /// Whether the replica is a valid crash state now (a point may be cut).
    pub fn consistent(&self) -> bool {
        self.st.is_consistent() && self.resync.is_none()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(ReceiveError::Protocol(format!(
                "record {offset}+{len} is past the end of the volume ({})",
                self.size
            )));
        }
        Ok(())
    }

    fn ack(&mut self, io: &mut dyn ReplicaIo, resync_done: bool) -> Result<Frame, ReceiveError> {
        io.sync()?;
        io.persist(&self.st)?;
        Ok(Frame::Ack {
            seq: self.st.applied_seq,
            resync_done,
        })
    }

    fn apply(&mut self, recs: Vec<RecRef<'_>>, io: &mut dyn ReplicaIo) -> Result<(), ReceiveError> {
        let mut it = recs.into_iter();
        while let Some(r) = it.next() {
            if r.kind == RecKind::Chunk {
                let c = r.offset / self.chunk_size.max(1);
                if self.resync.is_none()
                    || r.offset % self.chunk_size != 0
                    || !self.wanted.remove(&c)
                {
                    return Err(ReceiveError::Protocol(format!(
                        "chunk at {} was not asked for",
                        r.offset
                    )));
                }
                self.check_range(r.offset, r.len as u64)?;
                io.write_at(r.offset, r.data)?;
                self.stats.resync_chunks_received += 1;
                self.stats.resync_bytes_received += r.len as u64;
                continue;
            }
            let expected = self.st.applied_seq + 1;
            if r.seq < expected {
                continue; // a resend after a reconnect
            }
            if r.seq > expected {
                let allowed = self.resync.is_some_and(|x| r.seq < x);
                if !allowed {
                    return Err(ReceiveError::Gap {
                        expected,
                        got: r.seq,
                    });
                }
            }
            match r.kind {
                RecKind::Write => {
                    self.check_range(r.offset, r.len as u64)?;
                    io.write_at(r.offset, r.data)?;
                    self.stats.bytes_written += r.len as u64;
                }
                RecKind::Zero | RecKind::Trim => {
                    self.check_range(r.offset, r.len as u64)?;
                    io.zero(r.offset, r.len as u64)?;
                }
                RecKind::Barrier | RecKind::Chunk => {}
            }
            self.stats.records += 1;
            self.st.applied_seq = r.seq;
            if r.kind == RecKind::Barrier
                && r.offset != 0
                && r.offset < lifeboat_format::proto::APP_CUT
            {
                self.last_marker = self.last_marker.max(r.offset);
            }
            // a consistency-group cut marker the server waits for
            if r.kind == RecKind::Barrier
                && r.offset != 0
                && self.resync.is_none()
                && self.park_at.is_some_and(|t| r.offset >= t)
            {
                self.parked = Some(r.offset);
                self.pending = it.map(|r| r.to_rec()).collect();
                return Ok(());
            }
        }
        Ok(())
    }

    /// [`Receiver::on_frame`] for a batch frame's parts (see
    /// [`Frame::batch_parts`]): its records are applied from the payload
    /// without copying it.
    ///
    /// # Errors
    /// As [`Receiver::on_frame`].
    pub fn on_batch(
        &mut self,
        codec: u8,
        raw_len: u32,
        payload: &[u8],
        io: &mut dyn ReplicaIo,
    ) -> Result<Vec<Frame>, ReceiveError> {
        if self.parked.is_some() {
            return Err(ReceiveError::Protocol("a batch while parked".into()));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = match open_batch_ref(codec, raw_len, payload, &mut scratch) {
            Ok(recs) => self.apply(recs, io),
            Err(e) => Err(ReceiveError::Protocol(e.to_string())),
        };
        self.scratch = scratch;
        release_if_large(&mut self.scratch);
        res?;
        Ok(vec![self.ack(io, false)?])
    }

    /// Handle one frame from the agent; returns the frames to send back.
    ///
    /// # Errors
    /// A protocol violation, a sequence gap or replica I/O errors: send
    /// [`ReceiveError::frame`] and close the stream.
    pub fn on_frame(
        &mut self,
        f: Frame,
        io: &mut dyn ReplicaIo,
    ) -> Result<Vec<Frame>, ReceiveError> {
        match f {
            Frame::Batch {
                codec,
                raw_len,
                payload,
            } => self.on_batch(codec, raw_len, &payload, io),
            Frame::ResyncBegin { x, full } => {
                if self.resync.is_some() {
                    return Err(ReceiveError::Protocol("resync pass already open".into()));
                }
                if x == 0 {
                    return Err(ReceiveError::Protocol("resync to seq 0".into()));
                }
                // a full pass may move the position back (the agent's
                // journal is behind this replica); a dirty pass may not
                if !full && x <= self.st.applied_seq {
                    return Err(ReceiveError::Protocol(format!(
                        "resync to {x} is behind the replica ({})",
                        self.st.applied_seq
                    )));
                }
                if !full && !self.st.synced {
                    return Err(ReceiveError::Protocol(
                        "the replica needs a full sync first".into(),
                    ));
                }
                self.resync = Some(x);
                self.st.consistent = false;
                io.persist(&self.st)?;
                Ok(vec![])
            }
            Frame::Hashes { chunks } => {
                if self.resync.is_none() {
                    return Err(ReceiveError::Protocol(
                        "hashes outside a resync pass".into(),
                    ));
                }
                if chunks.len() > MAX_HASHES {
                    return Err(ReceiveError::Protocol("too many hashes".into()));
                }
                let mut want = Vec::new();
                for (c, h) in chunks {
                    let off = c.saturating_mul(self.chunk_size);
                    if off >= self.size {
                        return Err(ReceiveError::Protocol(format!("chunk {c} is past the end")));
                    }
                    let len = self.chunk_size.min(self.size - off);
                    let mine = io.chunk_hash(off, len)?;
                    self.stats.resync_chunks_compared += 1;
                    if mine == h {
                        continue;
                    }
                    if h == ZERO_HASH {
                        io.zero(off, len)?;
                    } else {
                        want.push(c);
                        self.wanted.insert(c);
                    }
                }
                Ok(vec![Frame::Want { chunks: want }])
            }
            Frame::ResyncEnd { x, settle } => {
                let Some(open) = self.resync.take() else {
                    return Err(ReceiveError::Protocol("resync end without a begin".into()));
                };
                if x != open || !self.wanted.is_empty() {
                    return Err(ReceiveError::Protocol(format!(
                        "resync end {x} does not close the pass to {open} ({} chunks still wanted)",
                        self.wanted.len()
                    )));
                }
                self.st.applied_seq = x - 1;
                self.st.synced = true;
                self.st.consistent = true;
                self.st.settle = settle;
                Ok(vec![self.ack(io, true)?])
            }
            Frame::Ping { t } => Ok(vec![Frame::Pong { t }]),
            Frame::Status(_) | Frame::Pong { .. } => Ok(vec![]),
            Frame::Error { code, message } => Err(ReceiveError::Protocol(format!(
                "the agent ended the stream (code {code}): {message}"
            ))),
            other => Err(ReceiveError::Protocol(format!(
                "unexpected frame in a replication stream: {}",
                frame_name(&other)
            ))),
        }
    }
}

/// Buffers up to this size are kept from frame to frame (batches are at
/// most a few MiB; a larger one, a single large write, is rare).
const KEEP_BUFFER: usize = 8 << 20;

/// Drop a frame buffer over [`KEEP_BUFFER`] (a rare large frame does not
/// keep its memory for the stream's life); keep a smaller one for reuse.
pub fn release_if_large(buf: &mut Vec<u8>) {
    if buf.len() > KEEP_BUFFER {
        *buf = Vec::new();
    }
}

/// A short name of a frame for messages.
pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Welcome { .. } => "welcome",
        Frame::Enroll { .. } => "enroll",
        Frame::Enrolled { .. } => "enrolled",
        Frame::Batch { .. } => "batch",
        Frame::ResyncBegin { .. } => "resync-begin",
        Frame::Hashes { .. } => "hashes",
        Frame::Want { .. } => "want",
        Frame::ResyncEnd { .. } => "resync-end",
        Frame::Ack { .. } => "ack",
        Frame::Status(_) => "status",
        Frame::Ping { .. } => "ping",
        Frame::Pong { .. } => "pong",
        Frame::Error { .. } => "error",
        Frame::Quiesce { .. } => "quiesce",
        Frame::Quiesced { .. } => "quiesced",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framed::batch;
    use lifeboat_format::proto::{encode_records, Rec};

    /// An in-memory replica that counts syncs and persists.
    struct Mem {
        data: Vec<u8>,
        persisted: Option<StreamState>,
        syncs: u32,
    }
    impl ReplicaIo for Mem {
        fn write_at(&mut self, o: u64, d: &[u8]) -> io::Result<()> {
            self.data[o as usize..o as usize + d.len()].copy_from_slice(d);
            Ok(())
        }
        fn zero(&mut self, o: u64, l: u64) -> io::Result<()> {
            self.data[o as usize..(o + l) as usize].fill(0);
            Ok(())
        }
        fn chunk_hash(&mut self, o: u64, l: u64) -> io::Result<[u8; 32]> {
            let b = &self.data[o as usize..(o + l) as usize];
            Ok(if b.iter().all(|x| *x == 0) {
                ZERO_HASH
            } else {
                *blake3::hash(b).as_bytes()
            })
        }
        fn sync(&mut self) -> io::Result<()> {
            self.syncs += 1;
            Ok(())
        }
        fn persist(&mut self, st: &StreamState) -> io::Result<()> {
            self.persisted = Some(st.clone());
            Ok(())
        }
    }

    fn w(seq: u64, off: u64, d: &[u8]) -> Rec {
        Rec {
            kind: RecKind::Write,
            seq,
            offset: off,
            len: d.len() as u32,
            data: d.to_vec(),
        }
    }

    fn fresh() -> StreamState {
        StreamState {
            applied_seq: 0,
            synced: false,
            consistent: true,
            journal_id: [0; 16],
            settle: 0,
        }
    }

    #[test]
    fn initial_sync_then_records_in_order_with_resends_skipped() {
        let mut io = Mem {
            data: vec![0; 8192],
            persisted: None,
            syncs: 0,
        };
        io.data[5000] = 9; // the replica holds stale data the source lacks
        let (mut r, welcome) = Receiver::new(fresh(), 8192, 4096, [1; 16], 0, None);
        assert_eq!(
            welcome,
            Frame::Welcome {
                applied_seq: 0,
                synced: false
            }
        );
        assert!(r
            .on_frame(Frame::ResyncBegin { x: 1, full: false }, &mut io)
            .is_err());
        let mut r = Receiver::new(fresh(), 8192, 4096, [1; 16], 0, None).0;
        r.on_frame(Frame::ResyncBegin { x: 3, full: true }, &mut io)
            .unwrap();
        assert!(!r.consistent());
        let source_c0 = [7u8; 4096];
        let out = r
            .on_frame(
                Frame::Hashes {
                    chunks: vec![(0, *blake3::hash(&source_c0).as_bytes()), (1, ZERO_HASH)],
                },
                &mut io,
            )
            .unwrap();
        assert_eq!(out, vec![Frame::Want { chunks: vec![0] }]);
        assert_eq!(io.data[5000], 0, "a zero chunk is zeroed without transfer");
        let chunk = Rec {
            kind: RecKind::Chunk,
            seq: 0,
            offset: 0,
            len: 4096,
            data: source_c0.to_vec(),
        };
        r.on_frame(batch(encode_records(std::slice::from_ref(&chunk))), &mut io)
            .unwrap();
        // a chunk nobody asked for is a protocol error
        assert!(r
            .on_frame(batch(encode_records(&[chunk])), &mut io)
            .is_err());
        let mut r2 = Receiver::new(io.persisted.clone().unwrap(), 8192, 4096, [1; 16], 0, None).0;
        assert!(!r2.consistent(), "a half-done pass is not consistent");
        // the real stream goes on
        let syncs = io.syncs;
        let out = r
            .on_frame(Frame::ResyncEnd { x: 3, settle: 2 }, &mut io)
            .unwrap();
        // the ack goes out only after the replica is synced and the position persisted
        assert_eq!(io.syncs, syncs + 1);
        assert_eq!(io.persisted.as_ref().unwrap().applied_seq, 2);
        assert_eq!(
            out,
            vec![Frame::Ack {
                seq: 2,
                resync_done: true
            }]
        );
        assert!(r.consistent());
        let out = r
            .on_frame(
                batch(encode_records(&[w(2, 0, b"old"), w(3, 10, b"abc")])),
                &mut io,
            )
            .unwrap();
        assert_eq!(
            out,
            vec![Frame::Ack {
                seq: 3,
                resync_done: false
            }]
        );
        assert_eq!(&io.data[10..13], b"abc");
        assert_eq!(io.data[0], 7, "seq 2 was a resend and skipped");
        let e = r
            .on_frame(batch(encode_records(&[w(5, 0, b"x")])), &mut io)
            .unwrap_err();
        assert!(matches!(
            e,
            ReceiveError::Gap {
                expected: 4,
                got: 5
            }
        ));
        let e = r2
            .on_frame(batch(encode_records(&[w(1, 8190, b"xyz")])), &mut io)
            .unwrap_err();
        assert!(matches!(e, ReceiveError::Protocol(_)), "{e}");
    }

    #[test]
    fn another_journal_means_a_full_sync() {
        let st = StreamState {
            applied_seq: 50,
            synced: true,
            consistent: true,
            journal_id: [1; 16],
            settle: 0,
        };
        let (_, w1) = Receiver::new(st.clone(), 10, 4096, [1; 16], 0, None);
        assert_eq!(
            w1,
            Frame::Welcome {
                applied_seq: 50,
                synced: true
            }
        );
        let (_, w2) = Receiver::new(st.clone(), 10, 4096, [2; 16], 0, None);
        assert_eq!(
            w2,
            Frame::Welcome {
                applied_seq: 0,
                synced: false
            }
        );
        // a journal that follows this one after a machine crash continues it
        // (the dirty map holds the rest) when the replica holds the old one
        // as far as the map forgot; not otherwise
        let (r3, w3) = Receiver::new(st.clone(), 10, 4096, [2; 16], 0, Some(([1; 16], 50)));
        assert_eq!(
            w3,
            Frame::Welcome {
                applied_seq: 0,
                synced: true
            }
        );
        assert!(!r3.st.consistent, "not a crash state before the dirty pass");
        for follows in [([1; 16], 51), ([3; 16], 0)] {
            let (_, w) = Receiver::new(st.clone(), 10, 4096, [2; 16], 0, Some(follows));
            assert_eq!(
                w,
                Frame::Welcome {
                    applied_seq: 0,
                    synced: false
                },
                "{follows:?}"
            );
        }
    }

    #[test]
    fn a_park_stops_at_the_first_cut_marker_and_resumes_after() {
        let mut io = Mem {
            data: vec![0; 8192],
            persisted: None,
            syncs: 0,
        };
        let st = StreamState {
            applied_seq: 0,
            synced: true,
            consistent: true,
            journal_id: [1; 16],
            settle: 0,
        };
        let (mut r, _) = Receiver::new(st, 8192, 4096, [1; 16], 0, None);
        let cut = |seq, id| Rec {
            kind: RecKind::Barrier,
            seq,
            offset: id,
            len: 0,
            data: vec![],
        };
        r.set_park(Some(100));
        let out = r
            .on_frame(
                batch(encode_records(&[
                    w(1, 0, b"a"),
                    cut(2, 50),
                    w(3, 1, b"b"),
                    cut(4, 150),
                    w(5, 2, b"c"),
                ])),
                &mut io,
            )
            .unwrap();
        assert_eq!(
            r.parked(),
            Some(150),
            "a marker before the target is passed"
        );
        assert_eq!(
            out,
            vec![Frame::Ack {
                seq: 4,
                resync_done: false
            }]
        );
        assert_eq!(
            &io.data[..3],
            b"ab\0",
            "nothing after the marker is applied"
        );
        assert!(r.on_frame(Frame::Ping { t: 1 }, &mut io).is_ok());
        let out = r.resume(&mut io).unwrap();
        assert_eq!(
            out,
            vec![Frame::Ack {
                seq: 5,
                resync_done: false
            }]
        );
        assert_eq!(&io.data[..3], b"abc");
        assert_eq!(r.parked(), None);
    }

    #[test]
    fn after_a_reconnect_the_replica_settles_before_it_counts_as_consistent() {
        let mut io = Mem {
            data: vec![0; 8192],
            persisted: None,
            syncs: 0,
        };
        let st = StreamState {
            applied_seq: 2,
            synced: true,
            consistent: true,
            journal_id: [1; 16],
            settle: 0,
        };
        // the agent holds records up to 4: the server may have applied some
        // of them without acknowledging them before it stopped
        let (mut r, _) = Receiver::new(st, 8192, 4096, [1; 16], 4, None);
        assert!(!r.consistent());
        r.on_frame(batch(encode_records(&[w(3, 0, b"a")])), &mut io)
            .unwrap();
        assert!(!r.consistent());
        r.on_frame(batch(encode_records(&[w(4, 1, b"b")])), &mut io)
            .unwrap();
        assert!(r.consistent());
    }
}
