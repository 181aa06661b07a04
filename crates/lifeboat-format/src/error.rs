//! The one error type of the formats crate.

/// Why bytes could not be decoded. Every variant names the thing being
/// decoded (`what`), so the caller can say which file or object is damaged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what}: bad magic (not a Lifeboat {what}, or damaged): found {found}")]
    BadMagic { what: &'static str, found: String },
    #[error(
        "{what}: format version {version} is newer than this Lifeboat understands (max {max}); upgrade Lifeboat"
    )]
    UnsupportedVersion {
        what: &'static str,
        version: u32,
        max: u32,
    },
    #[error("{what}: truncated: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("{what}: checksum mismatch (the data is damaged)")]
    Checksum { what: &'static str },
    #[error("{what}: malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
}

impl FormatError {
    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        FormatError::Malformed {
            what,
            reason: reason.into(),
        }
    }
}
