//! Reading and writing [`Frame`]s on an async byte stream, and batch
//! (de)compression.

use anyhow::{bail, Context, Result};
use lifeboat_format::proto::{decode_records, Frame, Rec, MAX_BATCH_RAW};
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
    // read into spare capacity: a frame of megabytes is not zeroed first
    let mut b = Vec::with_capacity(n);
    r.take(n as u64)
        .read_to_end(&mut b)
        .await
        .context("the stream ended inside a frame (truncated)")?;
    if b.len() < n {
        bail!("the stream ended inside a frame (truncated)");
    }
    Ok(Some(Frame::decode(&b)?))
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

/// A cheap guess that zstd would not shrink a batch: every one of up to 8
/// samples of 4 KiB spread over it has a byte entropy above 7.9 bits
/// (random, compressed or encrypted data). Mixed batches are compressed.
fn looks_incompressible(data: &[u8]) -> bool {
    const SAMPLE: usize = 4096;
    if data.len() < 4 * SAMPLE {
        return false;
    }
    let n = (data.len() / SAMPLE).min(8);
    let step = data.len() / n;
    (0..n).all(|i| {
        let mut hist = [0u32; 256];
        for &b in &data[i * step..i * step + SAMPLE] {
            hist[b as usize] += 1;
        }
        let entropy: f64 = hist
            .iter()
            .filter(|c| **c > 0)
            .map(|&c| {
                let p = c as f64 / SAMPLE as f64;
                -p * p.log2()
            })
            .sum();
        // 4 KiB of uniform random bytes measures ~7.95 bits (sampling bias)
        entropy > 7.9
    })
}

/// A batch frame of an encoded payload, compressed when that pays.
pub fn batch(payload: Vec<u8>) -> Frame {
    let raw_len = payload.len() as u32;
    if payload.len() >= 512 && !looks_incompressible(&payload) {
        // one compression context per thread: making one per batch cost
        // more than compressing a batch of small writes
        thread_local! {
            static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let c = CCTX.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = zstd::bulk::Compressor::new(1).ok();
            }
            cell.as_mut().map(|z| z.compress(&payload))
        });
        if let Some(Ok(c)) = c {
            if c.len() < payload.len() - payload.len() / 16 {
                return Frame::Batch {
                    codec: 1,
                    raw_len,
                    payload: c,
                };
            }
        }
    }
    Frame::Batch {
        codec: 0,
        raw_len,
        payload,
    }
}

/// The records of a batch frame.
///
/// # Errors
/// A payload that does not decompress to `raw_len` bytes or does not decode.
pub fn open_batch(codec: u8, raw_len: u32, payload: &[u8]) -> Result<Vec<Rec>> {
    if raw_len > MAX_BATCH_RAW {
        bail!("batch too large");
    }
    let raw;
    let bytes = match codec {
        0 => payload,
        1 => {
            thread_local! {
                static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            raw = DCTX
                .with(|cell| {
                    let mut cell = cell.borrow_mut();
                    if cell.is_none() {
                        *cell = Some(zstd::bulk::Decompressor::new()?);
                    }
                    cell.as_mut()
                        .expect("just made")
                        .decompress(payload, raw_len as usize)
                })
                .context("batch does not decompress")?;
            &raw[..]
        }
        c => bail!("unknown batch codec {c}"),
    };
    if bytes.len() != raw_len as usize {
        bail!("batch is {} bytes, header says {raw_len}", bytes.len());
    }
    Ok(decode_records(bytes)?)
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
        assert_eq!(codec(&batch(random)), 0);
        assert_eq!(codec(&batch(text)), 1);
        assert_eq!(codec(&batch(mixed)), 1);
    }
}
