//! The replication protocol between `lifeboat agent` and `lifeboat server`:
//! frames on a TLS 1.3 stream.
//!
//! ```text
//! frame:   len u32 BE (of type + body) | type u8 | body
//! hello:   REPLICATION_V1 magic | version u32 | …   (first frame of a stream)
//! batch:   codec u8 (0 raw, 1 zstd) | raw_len u32 | payload
//! payload: record* ;  record: kind u8 | seq u64 | offset u64 | len u32 | data
//!          (data only for kinds Write and Chunk; Chunk records carry resync
//!          data and seq 0)
//! ```
//! Integers in bodies are little-endian. The first frame of a stream names
//! the protocol version; a peer that sends another version, an unknown frame
//! type or a frame larger than [`MAX_FRAME`] is disconnected by the caller
//! with the [`FormatError`] decoding returned. Decoding never panics.

use crate::magic::REPLICATION_V1;
use crate::wire::Reader;
use crate::FormatError;

/// Protocol version this build speaks.
pub const PROTO_VERSION: u32 = 3;
/// Largest frame (type + body) accepted.
pub const MAX_FRAME: u32 = 40 << 20;
/// Largest raw payload of a batch.
pub const MAX_BATCH_RAW: u32 = 36 << 20;
/// Largest string in a frame.
const MAX_STR: usize = 4096;
/// Largest number of hashes or chunk numbers in one frame.
pub const MAX_HASHES: usize = 4096;
/// Cut markers of app-consistent cuts have this bit set; periodic
/// consistency-group markers are milliseconds since the epoch, far below it.
pub const APP_CUT: u64 = 1 << 62;
/// A chunk hash that stands for "this chunk is all zeros" (not read, not sent).
pub const ZERO_HASH: [u8; 32] = [0; 32];

/// Kinds of records in a batch (journal kinds plus resync chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecKind {
    Write = 1,
    Zero = 2,
    Trim = 3,
    Barrier = 4,
    /// A whole chunk sent by a resync pass (not a journal record).
    Chunk = 5,
}

impl RecKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => RecKind::Write,
            2 => RecKind::Zero,
            3 => RecKind::Trim,
            4 => RecKind::Barrier,
            5 => RecKind::Chunk,
            _ => return None,
        })
    }
    /// Whether records of this kind carry data.
    pub fn has_data(self) -> bool {
        matches!(self, RecKind::Write | RecKind::Chunk)
    }
}

/// One record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub kind: RecKind,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub data: Vec<u8>,
}

/// A record of a batch whose data stays in the decoded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecRef<'a> {
    pub kind: RecKind,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub data: &'a [u8],
}

impl Rec {
    /// This record, borrowed.
    pub fn as_ref(&self) -> RecRef<'_> {
        RecRef {
            kind: self.kind,
            seq: self.seq,
            offset: self.offset,
            len: self.len,
            data: &self.data,
        }
    }
}

impl RecRef<'_> {
    /// This record with its own copy of the data.
    pub fn to_rec(&self) -> Rec {
        Rec {
            kind: self.kind,
            seq: self.seq,
            offset: self.offset,
            len: self.len,
            data: self.data.to_vec(),
        }
    }
}

/// Replication state of a volume as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum VolumeState {
    InitialSync = 1,
    Protected = 2,
    Resyncing = 3,
    Paused = 4,
    Error = 5,
}

impl VolumeState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => VolumeState::InitialSync,
            2 => VolumeState::Protected,
            3 => VolumeState::Resyncing,
            4 => VolumeState::Paused,
            5 => VolumeState::Error,
            _ => return None,
        })
    }
}

/// Health of a replicated volume as the agent reports it ([`Frame::Status`]);
/// the server keeps the last one it got.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    pub state: VolumeState,
    pub rpo_ms: u64,
    pub lag_bytes: u64,
    pub journal_bytes: u64,
    pub sent_bytes: u64,
    pub resync_bytes: u64,
    /// Bytes the workload changed since the agent started.
    pub written_bytes: u64,
    /// A resync pass (initial sync) in progress: data bytes it covers,
    /// bytes compared so far, estimated ms to go (all 0 outside passes).
    pub pass_total_bytes: u64,
    pub pass_done_bytes: u64,
    pub pass_eta_ms: u64,
}

impl Health {
    fn counters(&self) -> [u64; 9] {
        [
            self.rpo_ms,
            self.lag_bytes,
            self.journal_bytes,
            self.sent_bytes,
            self.resync_bytes,
            self.written_bytes,
            self.pass_total_bytes,
            self.pass_done_bytes,
            self.pass_eta_ms,
        ]
    }
}

/// Error codes of [`Frame::Error`].
pub mod code {
    pub const PROTOCOL: u16 = 1;
    pub const UNAUTHENTICATED: u16 = 2;
    pub const REVOKED: u16 = 3;
    pub const BAD_TOKEN: u16 = 4;
    pub const GAP: u16 = 5;
    pub const IO: u16 = 6;
    pub const REFUSED: u16 = 7;
}

/// A frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// agent → server, first frame of a replication stream for one volume.
    Hello {
        version: u32,
        item: String,
        volume: String,
        size: u64,
        chunk_size: u32,
        /// Identity of the agent's journal: sequence numbers are only
        /// comparable within one journal.
        journal_id: [u8; 16],
        /// The last sequence that journal holds (records it may have
        /// shipped: the replica is a crash state again only once the stream
        /// has replayed up to it).
        durable: u64,
        /// After a machine crash the journal starts over under a new
        /// identity: the one it replaced, and the sequence up to which the
        /// agent's dirty map may have forgotten that journal's changes. A
        /// replica that holds the old journal at least that far needs only
        /// the chunks the dirty map holds.
        follows: Option<([u8; 16], u64)>,
    },
    /// server → agent: where the replica stands.
    Welcome {
        applied_seq: u64,
        /// The replica finished an initial sync against this journal.
        synced: bool,
    },
    /// agent → server, first frame of an enrollment (no client certificate).
    /// The agent made its key pair itself: it sends the public key (P-256,
    /// uncompressed point) and a signature with the private key over the
    /// token and that key (proof of possession).
    Enroll {
        version: u32,
        token: String,
        agent: String,
        public_key: Vec<u8>,
        proof: Vec<u8>,
    },
    /// server → agent: its certificate (for the key it sent) and the CA.
    Enrolled {
        agent_id: String,
        cert_der: Vec<u8>,
        ca_der: Vec<u8>,
    },
    /// agent → server: records, in order.
    Batch {
        codec: u8,
        raw_len: u32,
        payload: Vec<u8>,
    },
    /// agent → server: a resync pass starts; records below `x` may be missing.
    ResyncBegin {
        x: u64,
        full: bool,
    },
    /// agent → server: hashes of chunks (chunk number, BLAKE3 of its bytes;
    /// [`ZERO_HASH`] for an all-zero chunk).
    Hashes {
        chunks: Vec<(u64, [u8; 32])>,
    },
    /// server → agent: the chunks (of the last Hashes) whose data it wants.
    Want {
        chunks: Vec<u64>,
    },
    /// agent → server: the pass is over; the next record is `x`; the
    /// replica is consistent again once records up to `settle` are applied
    /// (chunks were read after `x`).
    ResyncEnd {
        x: u64,
        settle: u64,
    },
    /// server → agent: everything up to `seq` is durable in the replica.
    Ack {
        seq: u64,
        resync_done: bool,
    },
    /// agent → server: health of the volume.
    Status(Health),
    Ping {
        t: u64,
    },
    Pong {
        t: u64,
    },
    /// server → agent: run the item's freeze hook, append cut marker
    /// `cut_id` to all its volumes' journals, run the thaw hook.
    Quiesce {
        cut_id: u64,
    },
    /// agent → server: how that went.
    Quiesced {
        cut_id: u64,
        ok: bool,
        message: String,
    },
    /// Either side: why the stream ends.
    Error {
        code: u16,
        message: String,
    },
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_ENROLL: u8 = 3;
const T_ENROLLED: u8 = 4;
const T_BATCH: u8 = 5;
const T_RESYNC_BEGIN: u8 = 6;
const T_HASHES: u8 = 7;
const T_WANT: u8 = 8;
const T_RESYNC_END: u8 = 9;
const T_ACK: u8 = 10;
const T_STATUS: u8 = 11;
const T_PING: u8 = 12;
const T_PONG: u8 = 13;
const T_ERROR: u8 = 14;
const T_QUIESCE: u8 = 15;
const T_QUIESCED: u8 = 16;

fn put_str(v: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_STR)];
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}
fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}
fn get_str(r: &mut Reader<'_>) -> Result<String, FormatError> {
    let n = r.u32()? as usize;
    if n > MAX_STR {
        return Err(FormatError::malformed("frame", "string too long"));
    }
    String::from_utf8(r.bytes(n)?.to_vec())
        .map_err(|_| FormatError::malformed("frame", "string is not UTF-8"))
}
fn get_bytes(r: &mut Reader<'_>) -> Result<Vec<u8>, FormatError> {
    let n = r.u32()? as usize;
    Ok(r.bytes(n)?.to_vec())
}

impl Frame {
    /// The frame with its length prefix, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; 4];
        match self {
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
                v.push(T_HELLO);
                v.extend_from_slice(&REPLICATION_V1);
                v.extend_from_slice(&version.to_le_bytes());
                put_str(&mut v, item);
                put_str(&mut v, volume);
                v.extend_from_slice(&size.to_le_bytes());
                v.extend_from_slice(&chunk_size.to_le_bytes());
                v.extend_from_slice(journal_id);
                v.extend_from_slice(&durable.to_le_bytes());
                match follows {
                    None => v.push(0),
                    Some((id, cleared)) => {
                        v.push(1);
                        v.extend_from_slice(id);
                        v.extend_from_slice(&cleared.to_le_bytes());
                    }
                }
            }
            Frame::Welcome {
                applied_seq,
                synced,
            } => {
                v.push(T_WELCOME);
                v.extend_from_slice(&applied_seq.to_le_bytes());
                v.push(*synced as u8);
            }
            Frame::Enroll {
                version,
                token,
                agent,
                public_key,
                proof,
            } => {
                v.push(T_ENROLL);
                v.extend_from_slice(&REPLICATION_V1);
                v.extend_from_slice(&version.to_le_bytes());
                put_str(&mut v, token);
                put_str(&mut v, agent);
                put_bytes(&mut v, public_key);
                put_bytes(&mut v, proof);
            }
            Frame::Enrolled {
                agent_id,
                cert_der,
                ca_der,
            } => {
                v.push(T_ENROLLED);
                put_str(&mut v, agent_id);
                put_bytes(&mut v, cert_der);
                put_bytes(&mut v, ca_der);
            }
            Frame::Batch {
                codec,
                raw_len,
                payload,
            } => {
                v.push(T_BATCH);
                v.push(*codec);
                v.extend_from_slice(&raw_len.to_le_bytes());
                v.extend_from_slice(payload);
            }
            Frame::ResyncBegin { x, full } => {
                v.push(T_RESYNC_BEGIN);
                v.extend_from_slice(&x.to_le_bytes());
                v.push(*full as u8);
            }
            Frame::Hashes { chunks } => {
                v.push(T_HASHES);
                v.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                for (c, h) in chunks {
                    v.extend_from_slice(&c.to_le_bytes());
                    v.extend_from_slice(h);
                }
            }
            Frame::Want { chunks } => {
                v.push(T_WANT);
                v.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                for c in chunks {
                    v.extend_from_slice(&c.to_le_bytes());
                }
            }
            Frame::ResyncEnd { x, settle } => {
                v.push(T_RESYNC_END);
                v.extend_from_slice(&x.to_le_bytes());
                v.extend_from_slice(&settle.to_le_bytes());
            }
            Frame::Ack { seq, resync_done } => {
                v.push(T_ACK);
                v.extend_from_slice(&seq.to_le_bytes());
                v.push(*resync_done as u8);
            }
            Frame::Status(h) => {
                v.push(T_STATUS);
                v.push(h.state as u8);
                for x in h.counters() {
                    v.extend_from_slice(&x.to_le_bytes());
                }
            }
            Frame::Ping { t } => {
                v.push(T_PING);
                v.extend_from_slice(&t.to_le_bytes());
            }
            Frame::Pong { t } => {
                v.push(T_PONG);
                v.extend_from_slice(&t.to_le_bytes());
            }
            Frame::Quiesce { cut_id } => {
                v.push(T_QUIESCE);
                v.extend_from_slice(&cut_id.to_le_bytes());
            }
            Frame::Quiesced {
                cut_id,
                ok,
                message,
            } => {
                v.push(T_QUIESCED);
                v.extend_from_slice(&cut_id.to_le_bytes());
                v.push(*ok as u8);
                put_str(&mut v, message);
            }
            Frame::Error { code, message } => {
                v.push(T_ERROR);
                v.extend_from_slice(&code.to_le_bytes());
                put_str(&mut v, message);
            }
        }
        let n = (v.len() - 4) as u32;
        v[..4].copy_from_slice(&n.to_be_bytes());
        v
    }

    /// For the bytes after a frame's prefix that are a batch frame: its
    /// codec, raw length and payload, borrowed (a receiver decodes the
    /// records without copying the payload first). Other frames: `None`.
    pub fn batch_parts(body: &[u8]) -> Option<(u8, u32, &[u8])> {
        match body {
            [T_BATCH, codec, l0, l1, l2, l3, payload @ ..] => {
                Some((*codec, u32::from_le_bytes([*l0, *l1, *l2, *l3]), payload))
            }
            _ => None,
        }
    }

    /// Length of the frame whose 4-byte prefix is `prefix` (type + body).
    ///
    /// # Errors
    /// An empty frame or one larger than [`MAX_FRAME`].
    pub fn body_len(prefix: [u8; 4]) -> Result<usize, FormatError> {
        let n = u32::from_be_bytes(prefix);
        if n == 0 || n > MAX_FRAME {
            return Err(FormatError::malformed(
                "frame",
                format!("length {n} is out of range (1..={MAX_FRAME})"),
            ));
        }
        Ok(n as usize)
    }

    /// Decode a frame from its type + body (the bytes after the prefix).
    ///
    /// # Errors
    /// Truncated or malformed bytes, an unknown frame type, or a first frame
    /// of another protocol version.
    pub fn decode(b: &[u8]) -> Result<Frame, FormatError> {
        let mut r = Reader::new("frame", b);
        let t = r.u8()?;
        let f = match t {
            T_HELLO | T_ENROLL => {
                r.magic(&REPLICATION_V1)?;
                let version = r.u32()?;
                if version != PROTO_VERSION {
                    return Err(FormatError::UnsupportedVersion {
                        what: "replication protocol",
                        version,
                        max: PROTO_VERSION,
                    });
                }
                if t == T_HELLO {
                    Frame::Hello {
                        version,
                        item: get_str(&mut r)?,
                        volume: get_str(&mut r)?,
                        size: r.u64()?,
                        chunk_size: r.u32()?,
                        journal_id: r.array()?,
                        durable: r.u64()?,
                        follows: match r.u8()? {
                            0 => None,
                            1 => Some((r.array()?, r.u64()?)),
                            b => {
                                return Err(FormatError::malformed(
                                    "replication frame",
                                    format!("hello: bad follows flag {b}"),
                                ))
                            }
                        },
                    }
                } else {
                    Frame::Enroll {
                        version,
                        token: get_str(&mut r)?,
                        agent: get_str(&mut r)?,
                        public_key: get_bytes(&mut r)?,
                        proof: get_bytes(&mut r)?,
                    }
                }
            }
            T_WELCOME => Frame::Welcome {
                applied_seq: r.u64()?,
                synced: r.u8()? != 0,
            },
            T_ENROLLED => Frame::Enrolled {
                agent_id: get_str(&mut r)?,
                cert_der: get_bytes(&mut r)?,
                ca_der: get_bytes(&mut r)?,
            },
            T_BATCH => {
                let codec = r.u8()?;
                let raw_len = r.u32()?;
                if codec > 1 {
                    return Err(FormatError::malformed("batch", format!("codec {codec}")));
                }
                if raw_len > MAX_BATCH_RAW {
                    return Err(FormatError::malformed("batch", "too large"));
                }
                let payload = r.bytes(r.remaining())?.to_vec();
                return Ok(Frame::Batch {
                    codec,
                    raw_len,
                    payload,
                });
            }
            T_RESYNC_BEGIN => Frame::ResyncBegin {
                x: r.u64()?,
                full: r.u8()? != 0,
            },
            T_HASHES => {
                let n = r.u32()? as usize;
                if n > MAX_HASHES {
                    return Err(FormatError::malformed("hashes", "too many"));
                }
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push((r.u64()?, r.array()?));
                }
                Frame::Hashes { chunks }
            }
            T_WANT => {
                let n = r.u32()? as usize;
                if n > MAX_HASHES {
                    return Err(FormatError::malformed("want", "too many"));
                }
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(r.u64()?);
                }
                Frame::Want { chunks }
            }
            T_RESYNC_END => Frame::ResyncEnd {
                x: r.u64()?,
                settle: r.u64()?,
            },
            T_ACK => Frame::Ack {
                seq: r.u64()?,
                resync_done: r.u8()? != 0,
            },
            T_STATUS => {
                let s = r.u8()?;
                let state = VolumeState::from_u8(s)
                    .ok_or_else(|| FormatError::malformed("status", format!("state {s}")))?;
                Frame::Status(Health {
                    state,
                    rpo_ms: r.u64()?,
                    lag_bytes: r.u64()?,
                    journal_bytes: r.u64()?,
                    sent_bytes: r.u64()?,
                    resync_bytes: r.u64()?,
                    written_bytes: r.u64()?,
                    pass_total_bytes: r.u64()?,
                    pass_done_bytes: r.u64()?,
                    pass_eta_ms: r.u64()?,
                })
            }
            T_PING => Frame::Ping { t: r.u64()? },
            T_PONG => Frame::Pong { t: r.u64()? },
            T_QUIESCE => Frame::Quiesce { cut_id: r.u64()? },
            T_QUIESCED => Frame::Quiesced {
                cut_id: r.u64()?,
                ok: r.u8()? != 0,
                message: get_str(&mut r)?,
            },
            T_ERROR => Frame::Error {
                code: r.u16()?,
                message: get_str(&mut r)?,
            },
            other => {
                return Err(FormatError::malformed(
                    "frame",
                    format!("unknown frame type {other}"),
                ))
            }
        };
        if r.remaining() != 0 {
            return Err(FormatError::malformed("frame", "trailing bytes"));
        }
        Ok(f)
    }
}

/// Encode records as a batch payload (uncompressed).
pub fn encode_records(recs: &[Rec]) -> Vec<u8> {
    let mut v = Vec::with_capacity(recs.iter().map(|r| 21 + r.data.len()).sum());
    for r in recs {
        encode_record_into(&mut v, r.kind, r.seq, r.offset, r.len, &r.data);
    }
    v
}

/// The bytes [`Frame::encode`] puts before the payload of a batch frame
/// (prefix, type, codec, raw length) whose payload is `payload_len` bytes,
/// so a writer can send the payload without copying it into one buffer.
pub fn batch_head(codec: u8, raw_len: u32, payload_len: usize) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[..4].copy_from_slice(&(6 + payload_len as u32).to_be_bytes());
    h[4] = T_BATCH;
    h[5] = codec;
    h[6..].copy_from_slice(&raw_len.to_le_bytes());
    h
}

/// Bytes of a record's header in a batch payload.
pub const RECORD_HEADER: usize = 21;

/// The header of a record in a batch payload (its data, if its kind has
/// any, follows it).
pub fn record_header(kind: RecKind, seq: u64, offset: u64, len: u32) -> [u8; RECORD_HEADER] {
    let mut h = [0u8; RECORD_HEADER];
    h[0] = kind as u8;
    h[1..9].copy_from_slice(&seq.to_le_bytes());
    h[9..17].copy_from_slice(&offset.to_le_bytes());
    h[17..].copy_from_slice(&len.to_le_bytes());
    h
}

/// Append one record to a payload being built.
pub fn encode_record_into(
    v: &mut Vec<u8>,
    kind: RecKind,
    seq: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) {
    v.extend_from_slice(&record_header(kind, seq, offset, len));
    if kind.has_data() {
        v.extend_from_slice(&data[..len as usize]);
    }
}

/// Decode a batch payload (after decompression).
///
/// # Errors
/// Truncated or malformed records.
pub fn decode_records(b: &[u8]) -> Result<Vec<Rec>, FormatError> {
    Ok(decode_records_ref(b)?.iter().map(RecRef::to_rec).collect())
}

/// [`decode_records`] without copying the records' data.
///
/// # Errors
/// Truncated or malformed records.
pub fn decode_records_ref(b: &[u8]) -> Result<Vec<RecRef<'_>>, FormatError> {
    let mut r = Reader::new("batch record", b);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let k = r.u8()?;
        let kind = RecKind::from_u8(k)
            .ok_or_else(|| FormatError::malformed("batch record", format!("kind {k}")))?;
        let seq = r.u64()?;
        let offset = r.u64()?;
        let len = r.u32()?;
        let data = if kind.has_data() {
            r.bytes(len as usize)?
        } else {
            &[]
        };
        out.push(RecRef {
            kind,
            seq,
            offset,
            len,
            data,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let e = f.encode();
        let n = Frame::body_len(e[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, e.len() - 4);
        assert_eq!(Frame::decode(&e[4..]).unwrap(), f);
    }

    #[test]
    fn every_frame_roundtrips() {
        for follows in [None, Some(([8; 16], 41))] {
            roundtrip(Frame::Hello {
                version: PROTO_VERSION,
                item: "db".into(),
                volume: "disk0".into(),
                size: 1 << 30,
                chunk_size: 65536,
                journal_id: [7; 16],
                durable: 3,
                follows,
            });
        }
        roundtrip(Frame::Welcome {
            applied_seq: 9,
            synced: true,
        });
        roundtrip(Frame::Enroll {
            version: PROTO_VERSION,
            token: "t".into(),
            agent: "a".into(),
            public_key: vec![4; 65],
            proof: vec![7; 70],
        });
        roundtrip(Frame::Enrolled {
            agent_id: "x".into(),
            cert_der: vec![1, 2],
            ca_der: vec![],
        });
        let recs = vec![
            Rec {
                kind: RecKind::Write,
                seq: 3,
                offset: 4096,
                len: 3,
                data: b"abc".to_vec(),
            },
            Rec {
                kind: RecKind::Barrier,
                seq: 4,
                offset: 0,
                len: 0,
                data: vec![],
            },
        ];
        let p = encode_records(&recs);
        assert_eq!(decode_records(&p).unwrap(), recs);
        let b = Frame::Batch {
            codec: 1,
            raw_len: 77,
            payload: vec![9; 33],
        };
        let mut split = batch_head(1, 77, 33).to_vec();
        split.extend_from_slice(&[9; 33]);
        assert_eq!(split, b.encode(), "batch_head + payload is the frame");
        roundtrip(Frame::Batch {
            codec: 0,
            raw_len: p.len() as u32,
            payload: p,
        });
        roundtrip(Frame::ResyncBegin { x: 5, full: true });
        roundtrip(Frame::Hashes {
            chunks: vec![(2, [1; 32]), (7, ZERO_HASH)],
        });
        roundtrip(Frame::Want { chunks: vec![2, 9] });
        roundtrip(Frame::ResyncEnd { x: 5, settle: 9 });
        roundtrip(Frame::Ack {
            seq: 5,
            resync_done: false,
        });
        roundtrip(Frame::Status(Health {
            state: VolumeState::Resyncing,
            rpo_ms: 1,
            lag_bytes: 2,
            journal_bytes: 3,
            sent_bytes: 4,
            resync_bytes: 5,
            written_bytes: 6,
            pass_total_bytes: 7,
            pass_done_bytes: 8,
            pass_eta_ms: 9,
        }));
        roundtrip(Frame::Ping { t: 1 });
        roundtrip(Frame::Quiesce { cut_id: 1 << 63 });
        roundtrip(Frame::Quiesced {
            cut_id: 3,
            ok: false,
            message: "freeze failed".into(),
        });
        roundtrip(Frame::Pong { t: 1 });
        roundtrip(Frame::Error {
            code: code::GAP,
            message: "gap".into(),
        });
    }

    #[test]
    fn an_old_or_new_protocol_version_is_refused() {
        let mut e = Frame::Hello {
            version: PROTO_VERSION,
            item: "i".into(),
            volume: "v".into(),
            size: 1,
            chunk_size: 1,
            journal_id: [0; 16],
            durable: 0,
            follows: None,
        }
        .encode();
        e[4 + 1 + 8] = 9; // version byte
        assert!(matches!(
            Frame::decode(&e[4..]),
            Err(FormatError::UnsupportedVersion { version: 9, .. })
        ));
        assert!(Frame::body_len((MAX_FRAME + 1).to_be_bytes()).is_err());
        assert!(Frame::body_len([0; 4]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&b);
            let _ = decode_records(&b);
        }

        #[test]
        fn truncated_frames_are_errors(cut in 0usize..60) {
            let e = Frame::Hello {
                version: PROTO_VERSION,
                item: "item".into(),
                volume: "vol".into(),
                size: 5,
                chunk_size: 6,
                journal_id: [1; 16],
                durable: 0,
                follows: None,
            }.encode();
            let body = &e[4..];
            if cut < body.len() {
                prop_assert!(Frame::decode(&body[..cut]).is_err());
            }
        }
    }
}
