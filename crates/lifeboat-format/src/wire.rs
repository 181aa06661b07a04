//! Little helpers for reading fixed layouts without panicking.

use crate::FormatError;

/// A cursor over bytes that returns [`FormatError::Truncated`] instead of
/// panicking when the input ends early.
pub(crate) struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { what, buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::Truncated {
                what: self.what,
                need: (self.pos as u64).saturating_add(n as u64),
                have: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u16be(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32be(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn u64be(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub fn magic(&mut self, expected: &[u8; 8]) -> Result<(), FormatError> {
        let m: [u8; 8] = self.array()?;
        if &m != expected {
            return Err(FormatError::BadMagic {
                what: self.what,
                found: hex::encode(m),
            });
        }
        Ok(())
    }

    pub fn version(&mut self, max: u32) -> Result<u32, FormatError> {
        let v = self.u32()?;
        if v == 0 || v > max {
            return Err(FormatError::UnsupportedVersion {
                what: self.what,
                version: v,
                max,
            });
        }
        Ok(v)
    }
}

/// `magic | version u32 | body_len u32 | body | blake3(body)`: the container
/// of the JSON-bodied formats (manifest, config, lock).
pub(crate) fn encode_framed(magic: &[u8; 8], version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out
}

/// Inverse of [`encode_framed`]: checks magic, version and checksum.
pub(crate) fn decode_framed<'a>(
    what: &'static str,
    magic: &[u8; 8],
    max_version: u32,
    bytes: &'a [u8],
) -> Result<(u32, &'a [u8]), FormatError> {
    let mut r = Reader::new(what, bytes);
    r.magic(magic)?;
    let version = r.version(max_version)?;
    let len = r.u32()? as usize;
    let body = r.bytes(len)?;
    let sum: [u8; 32] = r.array()?;
    if r.remaining() != 0 {
        return Err(FormatError::malformed(
            what,
            "trailing bytes after checksum",
        ));
    }
    if blake3::hash(body).as_bytes() != &sum {
        return Err(FormatError::Checksum { what });
    }
    Ok((version, body))
}
