//! Reading and writing [`Frame`]s on an async byte stream, and batch
//! (de)compression.

use anyhow::{bail, Context, Result};
use lifeboat_format::proto::{decode_records_ref, Frame, RecRef, MAX_BATCH_RAW};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read one frame; `Ok(None)` when the peer closed the stream cleanly
/// between frames.
///
/// # Errors
/// I/O errors, a truncated frame, or bytes that are not a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>> {
    read_frame_max(r, usize::MAX).await
}

/// [`read_frame`] refusing frames longer than `max` bytes before reading
/// them (for peers that have not authenticated yet).
///
/// # Errors
/// As [`read_frame`], or a frame over `max`.
pub async fn read_frame_max<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Frame>> {
    let Some(n) = read_len(r, max).await? else {
        return Ok(None);
    };
    let mut b = vec![0; n];
    read_rest(r, &mut b).await?;
    Ok(Some(Frame::decode(&b)?))
}

/// Read the next frame's type + body into `buf` (grown when needed, never
/// shrunk: a receiver reuses one buffer, which is then neither allocated
/// nor zeroed per frame); returns its length, `Ok(None)` when the peer
/// closed the stream cleanly between frames.
///
/// # Errors
/// As [`read_frame`].
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>> {
    let Some(n) = read_len(r, usize::MAX).await? else {
        return Ok(None);
    };
    // in huge pages where THP allows, as the decompression buffer (see
    // `open_batch_ref`)
    lifeboat_store::backend::local::grow_huge(buf, n, 1 << 20);
    read_rest(r, &mut buf[..n]).await?;
    Ok(Some(n))
}

/// The length of the next frame's type + body, refused before it is read
/// when over `max`; `Ok(None)` when the peer closed the stream cleanly
/// between frames.
async fn read_len<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<usize>> {
    let mut p = [0u8; 4];
    match r.read_exact(&mut p).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = Frame::body_len(p)?;
    if n > max {
        bail!("a {n}-byte frame from a peer that may send at most {max} now");
    }
    Ok(Some(n))
}

/// The rest of a frame whose length [`read_len`] gave, into `buf`.
async fn read_rest<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow::anyhow!("the stream ended inside a frame (truncated)")
        } else {
            e.into()
        }
    })?;
    Ok(())
}

/// Write one frame and flush it.
///
/// # Errors
/// I/O errors.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<()> {
    w.write_all(&f.encode()).await?;
    w.flush().await?;
    Ok(())
}

/// A batch frame of an encoded payload, compressed when that pays (as
/// [`BatchEncoder`] decides; for tests, which build payloads themselves).
#[cfg(test)]
pub(crate) fn batch(payload: Vec<u8>) -> Frame {
    let mut e = BatchEncoder::default();
    let b = e.encode_parts(vec![&payload]);
    Frame::Batch {
        codec: b.codec,
        raw_len: b.raw_len,
        payload: b.parts.concat(),
    }
}

/// Encodes batch payloads from records without copying their data into
/// one buffer first: compressed (see [`compress_parts`]) when the data does
/// not look random and that saves at least 1/16, else handed out as the
/// list of headers and data slices to write one after the other. The
/// buffers are kept from batch to batch.
#[derive(Default)]
pub struct BatchEncoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    heads: Vec<u8>,
    small: Vec<u8>,
    out: Vec<u8>,
}

/// A batch payload ready to send: `parts` concatenated are the payload.
pub struct EncodedBatch<'a> {
    pub codec: u8,
    pub raw_len: u32,
    pub parts: Vec<&'a [u8]>,
}

impl EncodedBatch<'_> {
    /// Bytes of the payload.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// Whether the payload is empty (no records).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl BatchEncoder {
    /// The payload of a batch of `recs`, compressed when that pays (as
    /// [`batch`] decides).
    pub fn encode<'a>(&'a mut self, recs: &[RecRef<'a>]) -> EncodedBatch<'a> {
        use lifeboat_format::proto::{record_header, RECORD_HEADER};
        self.heads.clear();
        for r in recs {
            self.heads
                .extend_from_slice(&record_header(r.kind, r.seq, r.offset, r.len));
        }
        let mut parts: Vec<&'a [u8]> = Vec::with_capacity(recs.len() * 2);
        for (i, r) in recs.iter().enumerate() {
            parts.push(&self.heads[i * RECORD_HEADER..(i + 1) * RECORD_HEADER]);
            if r.kind.has_data() && r.len > 0 {
                parts.push(&r.data[..r.len as usize]);
            }
        }
        Self::finish(&mut self.zstd, &mut self.out, &mut self.small, parts)
    }

    /// The payload whose pieces are `parts` (already encoded records).
    pub fn encode_parts<'a>(&'a mut self, parts: Vec<&'a [u8]>) -> EncodedBatch<'a> {
        Self::finish(&mut self.zstd, &mut self.out, &mut self.small, parts)
    }

    fn finish<'a>(
        zstd: &mut Option<zstd::bulk::Compressor<'static>>,
        out: &'a mut Vec<u8>,
        small: &mut Vec<u8>,
        parts: Vec<&'a [u8]>,
    ) -> EncodedBatch<'a> {
        let raw_len: usize = parts.iter().map(|p| p.len()).sum();
        if raw_len >= 512 && !lifeboat_format::blob::looks_incompressible(&parts, 8) {
            if let Ok(n) = compress_parts(zstd, out, small, &parts, raw_len) {
                if n < raw_len - raw_len / 16 {
                    return EncodedBatch {
                        codec: 1,
                        raw_len: raw_len as u32,
                        parts: vec![&out[..n]],
                    };
                }
            }
        }
        EncodedBatch {
            codec: 0,
            raw_len: raw_len as u32,
            parts,
        }
    }
}

/// The concatenation of `parts` compressed into `out` as zstd frames one
/// after the other (a zstd stream may hold several; the receiver's one
/// decompression call reads them all): a part of [`OWN_FRAME`] bytes or
/// more is a frame of its own, compressed where it is; the small ones
/// between are gathered into `small` and compressed together. Returns
/// the length.
fn compress_parts(
    z: &mut Option<zstd::bulk::Compressor<'static>>,
    out: &mut Vec<u8>,
    small: &mut Vec<u8>,
    parts: &[&[u8]],
    raw_len: usize,
) -> std::io::Result<usize> {
    let z = match z {
        Some(z) => z,
        None => z.insert(zstd::bulk::Compressor::new(1)?),
    };
    out.clear();
    // room for the worst case of every frame: no call runs out of space
    out.reserve(zstd::zstd_safe::compress_bound(raw_len) + 64 * (parts.len() + 1));
    small.clear();
    let mut frame = |z: &mut zstd::bulk::Compressor<'static>, src: &[u8]| {
        // into the spare capacity (after what is there)
        let mut tail = std::io::Cursor::new(&mut *out);
        tail.set_position(tail.get_ref().len() as u64);
        z.compress_to_buffer(src, &mut tail).map(|_| ())
    };
    for p in parts {
        if p.len() >= OWN_FRAME {
            if !small.is_empty() {
                frame(z, small)?;
                small.clear();
            }
            frame(z, p)?;
        } else {
            small.extend_from_slice(p);
        }
    }
    if !small.is_empty() {
        frame(z, small)?;
    }
    Ok(out.len())
}

/// Parts of a batch at least this long are compressed as frames of their
/// own (not copied next to the others first).
const OWN_FRAME: usize = 64 << 10;

/// The records of a batch frame (tests; receivers use [`open_batch_ref`]).
///
/// # Errors
/// A payload that does not decompress to `raw_len` bytes or does not decode.
#[cfg(test)]
pub(crate) fn open_batch(
    codec: u8,
    raw_len: u32,
    payload: &[u8],
) -> Result<Vec<lifeboat_format::proto::Rec>> {
    let mut scratch = Vec::new();
    Ok(open_batch_ref(codec, raw_len, payload, &mut scratch)?
        .iter()
        .map(RecRef::to_rec)
        .collect())
}

/// [`open_batch`] without copying the records' data: they borrow the
/// payload, or `scratch` when it was compressed (decompressed into it,
/// reused from batch to batch: its length is the bytes already zeroed).
///
/// # Errors
/// As [`open_batch`].
pub fn open_batch_ref<'a>(
    codec: u8,
    raw_len: u32,
    payload: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<Vec<RecRef<'a>>> {
    if raw_len > MAX_BATCH_RAW {
        bail!("batch too large");
    }
    let bytes: &[u8] = match codec {
        0 => payload,
        1 => {
            thread_local! {
                static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            // into exactly raw_len bytes (more fails); zeroed only when the
            // buffer grows
            let want = raw_len as usize;
            // in huge pages where THP allows (it is kept from batch to
            // batch: fewer TLB misses while the batch is decompressed into
            // it and applied from it)
            lifeboat_store::backend::local::grow_huge(scratch, want, 4 << 20);
            let n = DCTX
                .with(|cell| {
                    let mut cell = cell.borrow_mut();
                    if cell.is_none() {
                        *cell = Some(zstd::bulk::Decompressor::new()?);
                    }
                    cell.as_mut()
                        .expect("just made")
                        .decompress_to_buffer(payload, &mut scratch[..want])
                })
                .context("batch does not decompress")?;
            &scratch[..n]
        }
        c => bail!("unknown batch codec {c}"),
    };
    if bytes.len() != raw_len as usize {
        bail!("batch is {} bytes, header says {raw_len}", bytes.len());
    }
    Ok(decode_records_ref(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(f: &Frame) -> u8 {
        match f {
            Frame::Batch { codec, .. } => *codec,
            _ => unreachable!(),
        }
    }

    #[test]
    fn random_batches_skip_zstd_and_text_and_mixed_ones_use_it() {
        let mut random = vec![0u8; 256 << 10];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
            .iter()
            .cycle()
            .take(256 << 10)
            .copied()
            .collect();
        let mut mixed = random.clone();
        mixed[100 << 10..140 << 10].copy_from_slice(&text[..40 << 10]);
        assert_eq!(codec(&batch(random.clone())), 0);
        assert_eq!(codec(&batch(text.clone())), 1);
        assert_eq!(codec(&batch(mixed)), 1);

        // the encoder that reads records where they are decides the same
        // way, and what it sends opens to the same records
        use lifeboat_format::proto::{encode_records, Rec, RecKind};
        let rec = |kind, seq, offset, data: &[u8]| Rec {
            kind,
            seq,
            offset,
            len: data.len() as u32,
            data: if kind == RecKind::Write {
                data.to_vec()
            } else {
                vec![]
            },
        };
        let mut enc = BatchEncoder::default();
        for (recs, want) in [
            (vec![rec(RecKind::Write, 7, 0, &random)], 0),
            (vec![rec(RecKind::Write, 7, 0, &text)], 1),
            (
                vec![
                    rec(RecKind::Write, 7, 4096, &random[..5000]),
                    rec(RecKind::Zero, 8, 1 << 20, &[0; 512]),
                    rec(RecKind::Barrier, 9, 0, &[]),
                    rec(RecKind::Write, 10, 0, &text[..100_000]),
                    rec(RecKind::Write, 11, 9, &random[..200_000]),
                ],
                1,
            ),
            (vec![rec(RecKind::Write, 1, 0, b"tiny")], 0),
        ] {
            let refs: Vec<RecRef> = recs.iter().map(Rec::as_ref).collect();
            let b = enc.encode(&refs);
            assert_eq!(b.codec, want);
            assert_eq!(b.raw_len as usize, encode_records(&recs).len());
            let payload = b.parts.concat();
            assert_eq!(open_batch(b.codec, b.raw_len, &payload).unwrap(), recs);
        }
    }
}
