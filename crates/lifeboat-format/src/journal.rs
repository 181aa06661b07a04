//! The write journal of the IO splitter: every write to a protected volume,
//! in order, with sequence numbers and barriers.
//!
//! ```text
//! segment: JOURNAL_V1 | version u32 | reserved u32 | first_seq u64     (24 bytes)
//!          | record …
//! record:  kind u8 | reserved [u8; 3] | len u32 | seq u64 | offset u64
//!          | check [u8; 8] | data (len bytes, Write records only)         (32 + data)
//! check:   CRC-64/NVME over the header (check zeroed) and data, LE
//! ```
//! The check catches torn and damaged records (with the sequence number
//! that must follow the previous one); it is not a cryptographic digest:
//! the journal never leaves the machine, and the transport and the vault
//! have their own authentication. Version 1 used the first 8 bytes of BLAKE3
//! here, which cost a quarter of the splitter's CPU on 4 KiB writes.
//! A crash can leave a torn last record; [`decode_segment`] stops at the
//! first record that is incomplete or fails its check and reports how many
//! bytes are valid, so the writer can truncate there and go on.

use crate::magic::JOURNAL_V1;
use crate::wire::Reader;
use crate::FormatError;

pub const JOURNAL_VERSION: u32 = 2;
pub const SEGMENT_HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 32;
/// Largest data of one record (guards allocations on decode).
pub const MAX_RECORD_DATA: u32 = 32 << 20;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// `len` bytes of data written at `offset`.
    Write = 1,
    /// `len` bytes at `offset` became zeros (WRITE_ZEROES).
    Zero = 2,
    /// `len` bytes at `offset` were discarded (TRIM): their content is
    /// undefined, replicas may keep or zero it.
    Trim = 3,
    /// Everything before is durable (FLUSH or FUA): a consistent cut.
    Barrier = 4,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::Trim,
            4 => RecordKind::Barrier,
            _ => return None,
        })
    }
}

/// One decoded record; `data` borrows from the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub data: &'a [u8],
}

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(&JOURNAL_V1);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    h[16..].copy_from_slice(&first_seq.to_le_bytes());
    h
}

fn check(header: &[u8; RECORD_HEADER_LEN], data: &[u8]) -> [u8; 8] {
    let mut h = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    let mut hd = *header;
    hd[24..32].fill(0);
    h.update(&hd);
    h.update(data);
    h.finalize().to_le_bytes()
}

/// The header of a record; append `data` after it (Write records only).
pub fn encode_record_header(
    kind: RecordKind,
    seq: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    let c = check(&h, data);
    h[24..32].copy_from_slice(&c);
    h
}

/// A decoded segment: its first sequence number, the valid records, and the
/// byte length of the valid prefix (where a torn tail begins).
#[derive(Debug)]
pub struct Segment<'a> {
    pub first_seq: u64,
    pub records: Vec<Record<'a>>,
    pub valid_len: usize,
    /// Whether bytes after `valid_len` were dropped (a torn or damaged tail).
    pub torn: bool,
}

/// Decode the record at the start of `bytes` if it is complete, passes its
/// check and carries sequence number `expect`; returns it and the bytes it
/// used. `None` marks the end of the valid records (or a torn tail).
pub fn decode_record(bytes: &[u8], expect: u64) -> Option<(Record<'_>, usize)> {
    let h: &[u8; RECORD_HEADER_LEN] = bytes.get(..RECORD_HEADER_LEN)?.try_into().ok()?;
    let (kind, len, offset, span) = parse_header(h, expect)?;
    let data = bytes.get(RECORD_HEADER_LEN..span)?;
    if check(h, data) != h[24..32] {
        return None;
    }
    Some((
        Record {
            kind,
            seq: expect,
            offset,
            len,
            data,
        },
        span,
    ))
}

/// The bytes the record whose header is `h` takes (header and data), if
/// the header is plausible for sequence `expect` (its data is not checked:
/// for skipping records without reading them).
pub fn record_span(h: &[u8; RECORD_HEADER_LEN], expect: u64) -> Option<usize> {
    parse_header(h, expect).map(|(.., span)| span)
}

/// A record header's kind, length and offset, and the bytes the record
/// takes, if it is plausible for sequence `expect`.
fn parse_header(h: &[u8; RECORD_HEADER_LEN], expect: u64) -> Option<(RecordKind, u32, u64, usize)> {
    let kind = RecordKind::from_u8(h[0])?;
    let len = u32::from_le_bytes(h[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let offset = u64::from_le_bytes(h[16..24].try_into().ok()?);
    let dlen = if kind == RecordKind::Write { len } else { 0 };
    if dlen > MAX_RECORD_DATA || seq != expect || offset.checked_add(len as u64).is_none() {
        return None;
    }
    Some((kind, len, offset, RECORD_HEADER_LEN + dlen as usize))
}

/// The first sequence number of a segment, from its header.
///
/// # Errors
/// A bad or short header.
pub fn segment_first_seq(bytes: &[u8]) -> Result<u64, FormatError> {
    let mut r = Reader::new("journal segment", bytes);
    r.magic(&JOURNAL_V1)?;
    r.version(JOURNAL_VERSION)?;
    r.u32()?;
    r.u64()
}

/// Decode a segment.
///
/// # Errors
/// A bad header (magic, newer version). Damage inside the records is not an
/// error: decoding stops there (see [`Segment::torn`]); sequence numbers
/// that do not increase by one also stop it.
pub fn decode_segment(bytes: &[u8]) -> Result<Segment<'_>, FormatError> {
    const WHAT: &str = "journal segment";
    let mut r = Reader::new(WHAT, bytes);
    r.magic(&JOURNAL_V1)?;
    r.version(JOURNAL_VERSION)?;
    r.u32()?;
    let first_seq = r.u64()?;
    let mut records = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    let mut expect = first_seq;
    while let Some((rec, used)) = decode_record(&bytes[pos..], expect) {
        records.push(rec);
        pos += used;
        expect += 1;
    }
    Ok(Segment {
        first_seq,
        records,
        valid_len: pos,
        torn: pos < bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> Vec<u8> {
        let mut v = encode_segment_header(10).to_vec();
        let d = vec![7u8; 100];
        v.extend_from_slice(&encode_record_header(RecordKind::Write, 10, 4096, 100, &d));
        v.extend_from_slice(&d);
        v.extend_from_slice(&encode_record_header(RecordKind::Barrier, 11, 0, 0, &[]));
        v.extend_from_slice(&encode_record_header(RecordKind::Zero, 12, 0, 512, &[]));
        v
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let v = segment();
        let s = decode_segment(&v).unwrap();
        assert_eq!(s.first_seq, 10);
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.records[0].data, &[7u8; 100][..]);
        assert!(!s.torn);
        // cut in the middle of the last record: the first two survive
        let s = decode_segment(&v[..v.len() - 5]).unwrap();
        assert_eq!(s.records.len(), 2);
        assert!(s.torn);
        // a flipped data byte ends the journal at that record
        let mut bad = v.clone();
        bad[SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 3] ^= 1;
        let s = decode_segment(&bad).unwrap();
        assert_eq!(s.records.len(), 0);
        assert_eq!(s.valid_len, SEGMENT_HEADER_LEN);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_segment(&bytes);
            let mut v = segment();
            v.extend_from_slice(&bytes);
            let s = decode_segment(&v).unwrap();
            prop_assert!(s.records.len() >= 3);
        }
    }
}
