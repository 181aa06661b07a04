//! The NBD wire protocol (fixed newstyle handshake, simple and structured
//! replies, `base:allocation` block status), as pure encode/decode functions.
//! The server loop lives in `lifeboat-capture::nbd`; this module only knows
//! bytes. Constants follow the protocol document of the NBD project.
//!
//! Every decoder here takes bytes from the network and never panics.

use crate::wire::Reader;
use crate::FormatError;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// handshake flags (server) and client flags
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

// options
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// option replies
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// info types
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// transmission flags
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// commands and command flags
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// structured reply types and flags
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation states
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

// errors (Linux errno values, as the protocol defines them)
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The one meta context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Largest option payload we accept (names, queries).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest READ/WRITE payload we accept.
pub const MAX_IO_LEN: u32 = 32 << 20;

pub const REQUEST_LEN: usize = 28;
pub const OPTION_HEADER_LEN: usize = 16;

/// An option header sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// # Errors
/// Wrong magic, or a payload longer than [`MAX_OPTION_LEN`].
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, FormatError> {
    let mut r = Reader::new("nbd option", b);
    let magic = r.u64be()?;
    if magic != IHAVEOPT {
        return Err(FormatError::BadMagic {
            what: "nbd option",
            found: format!("{magic:#x}"),
        });
    }
    let option = r.u32be()?;
    let len = r.u32be()?;
    if len > MAX_OPTION_LEN {
        return Err(FormatError::malformed(
            "nbd option",
            format!("payload of {len} bytes is too long"),
        ));
    }
    Ok(OptionHeader { option, len })
}

/// An option reply header plus payload.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + payload.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The export name and the info requests of NBD_OPT_INFO / NBD_OPT_GO.
///
/// # Errors
/// Lengths that do not fit the payload.
pub fn parse_go(payload: &[u8]) -> Result<(String, Vec<u16>), FormatError> {
    let mut r = Reader::new("nbd go option", payload);
    let n = r.u32be()? as usize;
    let name = String::from_utf8_lossy(r.bytes(n)?).into_owned();
    let k = r.u16be()? as usize;
    let mut infos = Vec::with_capacity(k.min(64));
    for _ in 0..k {
        infos.push(r.u16be()?);
    }
    if r.remaining() != 0 {
        return Err(FormatError::malformed("nbd go option", "trailing bytes"));
    }
    Ok((name, infos))
}

/// The export name and the queries of NBD_OPT_{LIST,SET}_META_CONTEXT.
///
/// # Errors
/// Lengths that do not fit the payload.
pub fn parse_meta_context(payload: &[u8]) -> Result<(String, Vec<String>), FormatError> {
    let mut r = Reader::new("nbd meta context option", payload);
    let n = r.u32be()? as usize;
    let name = String::from_utf8_lossy(r.bytes(n)?).into_owned();
    let k = r.u32be()? as usize;
    let mut queries = Vec::with_capacity(k.min(64));
    for _ in 0..k {
        let l = r.u32be()? as usize;
        queries.push(String::from_utf8_lossy(r.bytes(l)?).into_owned());
    }
    if r.remaining() != 0 {
        return Err(FormatError::malformed(
            "nbd meta context option",
            "trailing bytes",
        ));
    }
    Ok((name, queries))
}

/// A transmission-phase request header (the WRITE payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// # Errors
/// Wrong magic.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, FormatError> {
    let mut r = Reader::new("nbd request", b);
    let magic = r.u32be()?;
    if magic != REQUEST_MAGIC {
        return Err(FormatError::BadMagic {
            what: "nbd request",
            found: format!("{magic:#x}"),
        });
    }
    Ok(Request {
        flags: r.u16be()?,
        kind: r.u16be()?,
        cookie: r.u64be()?,
        offset: r.u64be()?,
        len: r.u32be()?,
    })
}

pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Header of one structured reply chunk; `len` bytes of payload follow.
pub fn structured_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (with DONE) carrying `message`.
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut v = structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&b).unwrap(),
            Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 7,
                offset: 4096,
                len: 512
            }
        );
        b[0] = 0;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn go_and_meta_payloads() {
        let mut p = 3u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"vol");
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_go(&p).unwrap(),
            ("vol".to_string(), vec![INFO_BLOCK_SIZE])
        );
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta_context(&m).unwrap(),
            (String::new(), vec![BASE_ALLOCATION.to_string()])
        );
        assert!(parse_meta_context(&m[..m.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_go(&bytes);
            let _ = parse_meta_context(&bytes);
            if bytes.len() >= REQUEST_LEN {
                let _ = parse_request(bytes[..REQUEST_LEN].try_into().unwrap());
            }
            if bytes.len() >= OPTION_HEADER_LEN {
                let _ = parse_option_header(bytes[..OPTION_HEADER_LEN].try_into().unwrap());
            }
        }
    }
}
