//! Errors of the store: typed, naming the object, saying what to do.

use lifeboat_format::FormatError;

use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("no vault at {0} (create one with `lifeboat vault init`)")]
    NotAVault(String),
    #[error("a vault already exists at {0}")]
    VaultExists(String),
    #[error("wrong password or key file for the vault at {0}")]
    WrongSecret(String),
    #[error(
        "{0}: authentication failed: the data was altered or damaged (or the vault key is wrong)"
    )]
    Decrypt(String),
    #[error("{0}")]
    Corrupt(String),
    #[error(
        "chunk {id} is missing from the vault (needed by {needed_by}); run `lifeboat vault verify`"
    )]
    MissingChunk { id: String, needed_by: String },
    #[error("recovery point {0:?} not found (see `lifeboat point list`)")]
    PointNotFound(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
