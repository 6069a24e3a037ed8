//! RSA key material for the embedded vault, all through aws-lc-rs (never the `rsa` crate:
//! RUSTSEC-2023-0071). Private keys exist only as PKCS#8 DER in [`Zeroizing`] buffers and as
//! aws-lc key objects (which free and clear themselves); nothing here returns them to callers
//! outside the vault module.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair, KeySize, OaepAlgorithm, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey, PublicEncryptingKey, PublicKeyComponents, OAEP_SHA1_MGF1SHA1,
    OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::KeyPair as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::vault::{SignAlg, VaultError, WrapAlg};

/// RSA modulus sizes the vault creates and accepts.
pub const KEY_SIZES: [u32; 3] = [2048, 3072, 4096];

/// A private key ready to be stored: PKCS#8 DER plus its public half.
pub(crate) struct Material {
    /// PKCS#8 v1 DER of the private key: secret, zeroized on drop.
    pub pkcs8: Zeroizing<Vec<u8>>,
    /// Modulus bits.
    pub key_size: u32,
    /// JWK `n`, base64url without padding.
    pub n: String,
    /// JWK `e`, base64url without padding.
    pub e: String,
}

/// Checks a requested key size.
pub(crate) fn check_key_size(bits: u32) -> Result<KeySize, VaultError> {
    match bits {
        2048 => Ok(KeySize::Rsa2048),
        3072 => Ok(KeySize::Rsa3072),
        4096 => Ok(KeySize::Rsa4096),
        other => Err(VaultError::Invalid(format!(
            "unsupported RSA key size {other} (expected 2048, 3072 or 4096)"
        ))),
    }
}

/// Generates a new RSA key. Slow (0.1-1 s): call it outside the store lock.
pub(crate) fn generate(bits: u32) -> Result<Material, VaultError> {
    let size = check_key_size(bits)?;
    let key = PrivateDecryptingKey::generate(size)
        .map_err(|_| VaultError::Store(format!("RSA-{bits} key generation failed")))?;
    let der = key
        .as_der()
        .map_err(|_| VaultError::Store("cannot serialize the new RSA key".into()))?;
    material_from_pkcs8(der.as_ref())
}

/// Validates a PKCS#8 DER private key for import: RSA, 2048/3072/4096 bits, consistent.
pub(crate) fn material_from_pkcs8(pkcs8: &[u8]) -> Result<Material, VaultError> {
    let key = PrivateDecryptingKey::from_pkcs8(pkcs8).map_err(|e| match e.description_() {
        "WrongAlgorithm" => VaultError::Invalid(
            "the private key is not an RSA key (only RSA 2048, 3072 or 4096 keys can be imported)"
                .into(),
        ),
        "TooSmall" => VaultError::Invalid(
            "the RSA key is smaller than 2048 bits (use a 2048, 3072 or 4096-bit key)".into(),
        ),
        "TooLarge" => VaultError::Invalid(
            "the RSA key is larger than 4096 bits (use a 2048, 3072 or 4096-bit key)".into(),
        ),
        _ => VaultError::Invalid(
            "not a valid PKCS#8 RSA private key (expected PEM `BEGIN PRIVATE KEY` or DER)".into(),
        ),
    })?;
    let bits = u32::try_from(key.key_size_bits()).unwrap_or(u32::MAX);
    if !KEY_SIZES.contains(&bits) {
        return Err(VaultError::Invalid(format!(
            "RSA key of {bits} bits: only 2048, 3072 or 4096-bit keys are supported"
        )));
    }
    // Re-serialize so the store always holds aws-lc's canonical PKCS#8 v1 form.
    let der = key
        .as_der()
        .map_err(|_| VaultError::Invalid("cannot re-encode the RSA private key".into()))?;
    let pair = KeyPair::from_pkcs8(der.as_ref())
        .map_err(|_| VaultError::Invalid("the RSA private key is inconsistent".into()))?;
    let parts: PublicKeyComponents<Vec<u8>> = pair.public_key().into();
    Ok(Material {
        pkcs8: Zeroizing::new(der.as_ref().to_vec()),
        key_size: bits,
        n: URL_SAFE_NO_PAD.encode(&parts.n),
        e: URL_SAFE_NO_PAD.encode(&parts.e),
    })
}

/// Turns the bytes of a private key file into PKCS#8 DER: PEM `PRIVATE KEY` (PKCS#8),
/// PEM `RSA PRIVATE KEY` (PKCS#1, converted), or raw DER of either.
pub(crate) fn pkcs8_from_file_bytes(input: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let text = std::str::from_utf8(input)
        .ok()
        .filter(|t| t.contains("-----BEGIN "));
    let Some(text) = text else {
        return der_to_pkcs8(input);
    };
    let begin = text.find("-----BEGIN ").unwrap_or(0);
    let after = &text[begin + "-----BEGIN ".len()..];
    let label_end = after.find("-----").ok_or_else(bad_pem)?;
    let label = &after[..label_end];
    let body_start = &after[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let body_end = body_start.find(&end_marker).ok_or_else(bad_pem)?;
    let b64: Zeroizing<String> = Zeroizing::new(
        body_start[..body_end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
    );
    if b64.contains(':') {
        // `Proc-Type: 4,ENCRYPTED` headers of legacy encrypted PEM.
        return Err(encrypted());
    }
    let der = Zeroizing::new(STANDARD.decode(b64.as_bytes()).map_err(|_| bad_pem())?);
    match label {
        "PRIVATE KEY" => Ok(der),
        "RSA PRIVATE KEY" => pkcs1_to_pkcs8(&der),
        "ENCRYPTED PRIVATE KEY" => Err(encrypted()),
        "PUBLIC KEY" | "RSA PUBLIC KEY" | "CERTIFICATE" => Err(VaultError::Invalid(format!(
            "the file holds a {}, not a private key: import needs the RSA private key",
            label.to_ascii_lowercase()
        ))),
        "EC PRIVATE KEY" | "DSA PRIVATE KEY" | "OPENSSH PRIVATE KEY" => {
            Err(VaultError::Invalid(format!(
                "the file holds an {}: only RSA keys can be imported",
                label.to_ascii_lowercase()
            )))
        }
        other => Err(VaultError::Invalid(format!(
            "unexpected PEM block {other:?}: expected `PRIVATE KEY` (PKCS#8) or `RSA PRIVATE KEY`"
        ))),
    }
}

fn bad_pem() -> VaultError {
    VaultError::Invalid("malformed PEM: expected a `-----BEGIN PRIVATE KEY-----` block".into())
}

fn encrypted() -> VaultError {
    VaultError::Invalid(
        "encrypted private keys cannot be imported: decrypt it first \
         (`openssl pkcs8 -topk8 -nocrypt -in KEY -out PLAIN`)"
            .into(),
    )
}

/// DER input: PKCS#8 as is, else try PKCS#1 `RSAPrivateKey`.
fn der_to_pkcs8(der: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    match PrivateDecryptingKey::from_pkcs8(der) {
        // Valid PKCS#8 (or one with a specific complaint): let material_from_pkcs8 judge it.
        Ok(_) => Ok(Zeroizing::new(der.to_vec())),
        Err(e) if e.description_() != "InvalidEncoding" => Ok(Zeroizing::new(der.to_vec())),
        Err(_) => pkcs1_to_pkcs8(der).map_err(|_| {
            VaultError::Invalid(
                "not a private key file: expected an RSA private key as PKCS#8 (PEM or DER) \
                 or PKCS#1 PEM"
                    .into(),
            )
        }),
    }
}

fn pkcs1_to_pkcs8(der: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let pair = KeyPair::from_der(der).map_err(|e| match e.description_() {
        "TooSmall" => VaultError::Invalid(
            "the RSA key is smaller than 2048 bits (use a 2048, 3072 or 4096-bit key)".into(),
        ),
        _ => VaultError::Invalid("malformed PKCS#1 RSA private key".into()),
    })?;
    let p8 = pair
        .as_der()
        .map_err(|_| VaultError::Invalid("cannot convert the PKCS#1 key to PKCS#8".into()))?;
    Ok(Zeroizing::new(p8.as_ref().to_vec()))
}

fn oaep(alg: WrapAlg) -> &'static OaepAlgorithm {
    match alg {
        WrapAlg::RsaOaep256 => &OAEP_SHA256_MGF1SHA256,
        WrapAlg::RsaOaep => &OAEP_SHA1_MGF1SHA1,
    }
}

/// Wraps with the public key only (base64url `n`, `e`).
pub(crate) fn wrap(
    n: &str,
    e: &str,
    alg: WrapAlg,
    plaintext: &[u8],
) -> Result<Vec<u8>, VaultError> {
    let damaged = || VaultError::Store("the stored public key is damaged".into());
    let key = OaepPublicEncryptingKey::new(public_key(n, e)?).map_err(|_| damaged())?;
    let max = key.max_plaintext_size(oaep(alg));
    if plaintext.is_empty() || plaintext.len() > max {
        return Err(VaultError::Invalid(format!(
            "cannot wrap {} bytes with {alg} under a {}-bit key (1..={max} bytes fit)",
            plaintext.len(),
            key.key_size_bits()
        )));
    }
    let mut out = vec![0u8; key.ciphertext_size()];
    let len = key
        .encrypt(oaep(alg), plaintext, &mut out, None)
        .map_err(|_| VaultError::Store("RSA-OAEP encryption failed".into()))?
        .len();
    out.truncate(len);
    Ok(out)
}

/// Unwraps with the private key. `Err(())` means the bytes do not decrypt under this key.
pub(crate) fn unwrap(
    pkcs8: &[u8],
    alg: WrapAlg,
    wrapped: &[u8],
) -> Result<Result<Zeroizing<Vec<u8>>, ()>, VaultError> {
    let private = PrivateDecryptingKey::from_pkcs8(pkcs8)
        .map_err(|_| VaultError::Store("a stored private key is damaged".into()))?;
    let key = OaepPrivateDecryptingKey::new(private)
        .map_err(|_| VaultError::Store("a stored private key is unusable".into()))?;
    let mut buf = Zeroizing::new(vec![0u8; key.min_output_size()]);
    // Copy out only the plaintext; the scratch buffer is cleared when dropped.
    Ok(match key.decrypt(oaep(alg), wrapped, &mut buf, None) {
        Ok(pt) => Ok(Zeroizing::new(pt.to_vec())),
        Err(_) => Err(()),
    })
}

fn public_key(n: &str, e: &str) -> Result<PublicEncryptingKey, VaultError> {
    let damaged = || VaultError::Store("the stored public key is damaged".into());
    let parts = PublicKeyComponents {
        n: URL_SAFE_NO_PAD.decode(n).map_err(|_| damaged())?,
        e: URL_SAFE_NO_PAD.decode(e).map_err(|_| damaged())?,
    };
    parts.try_into().map_err(|_| damaged())
}

fn digest_of(alg: SignAlg, digest: &[u8]) -> Result<aws_lc_rs::digest::Digest, VaultError> {
    use aws_lc_rs::digest::{SHA256, SHA384, SHA512};
    let which = match alg.digest_len() {
        32 => &SHA256,
        48 => &SHA384,
        _ => &SHA512,
    };
    aws_lc_rs::digest::Digest::import_less_safe(digest, which).map_err(|_| {
        VaultError::Invalid(format!(
            "{alg} signs a {}-byte digest, not {} bytes: hash the message first",
            alg.digest_len(),
            digest.len()
        ))
    })
}

/// Signs a digest the caller computed (Key Vault's `sign`), with the private key.
pub(crate) fn sign_digest(
    pkcs8: &[u8],
    alg: SignAlg,
    digest: &[u8],
) -> Result<Vec<u8>, VaultError> {
    use aws_lc_rs::signature::{
        RsaEncoding, RSA_PKCS1_SHA256, RSA_PKCS1_SHA384, RSA_PKCS1_SHA512, RSA_PSS_SHA256,
        RSA_PSS_SHA384, RSA_PSS_SHA512,
    };
    let d = digest_of(alg, digest)?;
    let pad: &'static dyn RsaEncoding = match alg {
        SignAlg::Rs256 => &RSA_PKCS1_SHA256,
        SignAlg::Rs384 => &RSA_PKCS1_SHA384,
        SignAlg::Rs512 => &RSA_PKCS1_SHA512,
        SignAlg::Ps256 => &RSA_PSS_SHA256,
        SignAlg::Ps384 => &RSA_PSS_SHA384,
        SignAlg::Ps512 => &RSA_PSS_SHA512,
    };
    let pair = KeyPair::from_pkcs8(pkcs8)
        .map_err(|_| VaultError::Store("a stored private key is damaged".into()))?;
    let mut sig = vec![0u8; pair.public_modulus_len()];
    pair.sign_digest(pad, &d, &mut sig)
        .map_err(|_| VaultError::Store("RSA signing failed".into()))?;
    Ok(sig)
}

/// Verifies a signature of a digest with the public key only: `Ok(false)` for a signature
/// that does not verify.
pub(crate) fn verify_digest(
    n: &str,
    e: &str,
    alg: SignAlg,
    digest: &[u8],
    signature: &[u8],
) -> Result<bool, VaultError> {
    use aws_lc_rs::signature::{
        RsaParameters, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384,
        RSA_PKCS1_2048_8192_SHA512, RSA_PSS_2048_8192_SHA256, RSA_PSS_2048_8192_SHA384,
        RSA_PSS_2048_8192_SHA512,
    };
    let d = digest_of(alg, digest)?;
    let params: &'static RsaParameters = match alg {
        SignAlg::Rs256 => &RSA_PKCS1_2048_8192_SHA256,
        SignAlg::Rs384 => &RSA_PKCS1_2048_8192_SHA384,
        SignAlg::Rs512 => &RSA_PKCS1_2048_8192_SHA512,
        SignAlg::Ps256 => &RSA_PSS_2048_8192_SHA256,
        SignAlg::Ps384 => &RSA_PSS_2048_8192_SHA384,
        SignAlg::Ps512 => &RSA_PSS_2048_8192_SHA512,
    };
    let der = public_key(n, e)?
        .as_der()
        .map_err(|_| VaultError::Store("the stored public key is damaged".into()))?;
    Ok(UnparsedPublicKey::new(params, der.as_ref())
        .verify_digest(&d, signature)
        .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_both_algorithms() {
        let m = generate(2048).unwrap();
        assert_eq!(m.key_size, 2048);
        for alg in [WrapAlg::RsaOaep256, WrapAlg::RsaOaep] {
            let w = wrap(&m.n, &m.e, alg, &[7u8; 64]).unwrap();
            assert_eq!(w.len(), 256);
            let pt = unwrap(&m.pkcs8, alg, &w).unwrap().unwrap();
            assert_eq!(&pt[..], &[7u8; 64]);
        }
        let w = wrap(&m.n, &m.e, WrapAlg::RsaOaep256, &[1u8; 64]).unwrap();
        assert!(
            unwrap(&m.pkcs8, WrapAlg::RsaOaep, &w).unwrap().is_err(),
            "wrong alg fails"
        );
        let mut bad = w.clone();
        bad[10] ^= 1;
        assert!(unwrap(&m.pkcs8, WrapAlg::RsaOaep256, &bad)
            .unwrap()
            .is_err());
        assert!(wrap(&m.n, &m.e, WrapAlg::RsaOaep256, &[0u8; 300]).is_err());
        assert!(check_key_size(1024).is_err());
    }

    #[test]
    fn sign_verify_every_algorithm() {
        let m = generate(2048).unwrap();
        for alg in [
            SignAlg::Rs256,
            SignAlg::Rs384,
            SignAlg::Rs512,
            SignAlg::Ps256,
            SignAlg::Ps384,
            SignAlg::Ps512,
        ] {
            let digest = vec![0x5a; alg.digest_len()];
            let sig = sign_digest(&m.pkcs8, alg, &digest).unwrap();
            assert_eq!(sig.len(), 256);
            assert!(
                verify_digest(&m.n, &m.e, alg, &digest, &sig).unwrap(),
                "{alg}"
            );
            let mut bad = sig.clone();
            bad[7] ^= 1;
            assert!(!verify_digest(&m.n, &m.e, alg, &digest, &bad).unwrap());
            let mut other = digest.clone();
            other[0] ^= 1;
            assert!(!verify_digest(&m.n, &m.e, alg, &other, &sig).unwrap());
            assert!(
                sign_digest(&m.pkcs8, alg, &digest[1..]).is_err(),
                "wrong digest size"
            );
        }
    }

    #[test]
    fn import_round_trips_and_rejects_garbage() {
        let m = generate(2048).unwrap();
        let again = material_from_pkcs8(&m.pkcs8).unwrap();
        assert_eq!(again.n, m.n);
        assert!(matches!(
            material_from_pkcs8(b"nope"),
            Err(VaultError::Invalid(_))
        ));
        assert!(matches!(
            pkcs8_from_file_bytes(b"-----BEGIN PRIVATE KEY-----\n!!\n"),
            Err(VaultError::Invalid(_))
        ));
    }
}
