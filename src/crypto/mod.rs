//! Pure cryptography, no I/O: the XTS sector cipher (the hot path), the name cipher, the
//! data encryption key type, and the memory secrets live in.

mod dek;
mod keys;
pub mod names;
pub mod secret;
pub mod xts;

pub use dek::{Dek, DEK_LEN};
pub use keys::VolumeKeys;
pub use names::NameCipher;
pub use xts::XtsCipher;

/// What went wrong inside a cipher call. Every variant is caused by the caller's input, never
/// by the data's content, so it says which argument was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The XTS key must be 64 bytes (two AES-256 keys).
    #[error("XTS-AES-256 key must be 64 bytes, got {got}")]
    BadKeyLength {
        /// Length supplied.
        got: usize,
    },
    /// XTS requires K1 != K2 (IEEE 1619-2018 §5.1); OpenSSL refuses equal halves too.
    #[error("XTS key halves are equal; generate a new key")]
    EqualKeyHalves,
    /// The data unit size must be a power of two in 512..=65536.
    #[error("data unit size must be a power of two between 512 and 65536, got {got}")]
    BadUnitSize {
        /// Size supplied.
        got: usize,
    },
    /// A unit (or buffer of units) of a length the operation cannot take.
    #[error("buffer length {len} is not valid for data unit size {unit}")]
    BadLength {
        /// Length supplied.
        len: usize,
        /// The cipher's unit size.
        unit: usize,
    },
    /// A ciphertext that does not authenticate (names, symlink targets).
    #[error("ciphertext does not authenticate")]
    Authentication,
    /// `CMKFS_XTS` names no XTS implementation.
    #[error("CMKFS_XTS={got:?} is not an XTS implementation; unset it or use auto, vaes, aes-ni or portable")]
    UnknownImplementation {
        /// The variable's value.
        got: String,
    },
    /// An XTS implementation was asked for that this CPU cannot run.
    #[error("the {implementation} XTS implementation needs CPU features this machine lacks")]
    Unavailable {
        /// [`xts::Implementation::name`].
        implementation: &'static str,
    },
    /// Encoded text that is not valid base64url.
    #[error("not valid base64url")]
    Encoding,
}
