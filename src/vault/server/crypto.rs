//! Cryptographic routes: wrap/unwrap, encrypt/decrypt, sign/verify, random bytes; and the two
//! refused on purpose, key release (cmkfs keys are never exportable) and key attestation
//! (there is no HSM to attest).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse as _, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::api::{blocking, decode_b64url, json, parse, parse_alg, ApiError, Call};
use super::keys::kid;
use super::wire::{
    KeyOperationParameters, KeyOperationResult, KeySignParameters, KeyVerifyParameters,
    KeyVerifyResult, RandomBytes, RandomBytesRequest,
};
use crate::vault::{KeyId, SignAlg, Vault, VaultError};

/// An answer that carries plaintext key material: our copies are zeroized (hyper's output
/// buffer is not ours to clear).
fn secret_answer(base: &str, key: &KeyId, plain: &[u8]) -> Result<Response, ApiError> {
    let value = Zeroizing::new(URL_SAFE_NO_PAD.encode(plain));
    let body = Zeroizing::new(
        serde_json::to_vec(&KeyOperationResult {
            kid: kid(base, &key.name, &key.version),
            value: value.to_string(),
        })
        .map_err(|_| ApiError::internal())?,
    );
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_vec(),
    )
        .into_response())
}

fn answer(base: &str, key: &KeyId, value: &[u8]) -> Response {
    json(
        StatusCode::OK,
        &KeyOperationResult {
            kid: kid(base, &key.name, &key.version),
            value: URL_SAFE_NO_PAD.encode(value),
        },
    )
}

pub(super) async fn wrap(
    call: Call,
    name: String,
    v: Option<String>,
) -> Result<Response, ApiError> {
    let p: KeyOperationParameters = parse(&call.body)?;
    let alg = parse_alg(&p.alg)?;
    let pt = decode_b64url(&p.value)?;
    let conn = call.conn.clone();
    let w = blocking(move || conn.wrap_key(&name, v.as_deref(), alg, &pt)).await?;
    Ok(answer(&call.base, &w.kid, &w.value))
}

pub(super) async fn unwrap(
    call: Call,
    name: String,
    v: Option<String>,
) -> Result<Response, ApiError> {
    let p: KeyOperationParameters = parse(&call.body)?;
    let alg = parse_alg(&p.alg)?;
    let wrapped = decode_b64url(&p.value)?;
    let conn = call.conn.clone();
    let (key, plain) = blocking(move || match v {
        Some(v) => {
            let key = KeyId {
                vault: crate::vault::local::URL.into(),
                name,
                version: v,
            };
            let plain = conn.unwrap_key(&key, alg, &wrapped)?;
            Ok((key, plain))
        }
        // A versionless unwrap uses the latest version and, as in Key Vault, needs only
        // unwrapKey.
        None => conn.unwrap_key_latest(&name, alg, &wrapped),
    })
    .await?;
    secret_answer(&call.base, &key, &plain)
}

pub(super) async fn encrypt(
    call: Call,
    name: String,
    v: Option<String>,
) -> Result<Response, ApiError> {
    let p: KeyOperationParameters = parse(&call.body)?;
    let alg = parse_alg(&p.alg)?;
    let pt = decode_b64url(&p.value)?;
    let conn = call.conn.clone();
    let (key, ct) = blocking(move || conn.encrypt(&name, v.as_deref(), alg, &pt)).await?;
    Ok(answer(&call.base, &key, &ct))
}

pub(super) async fn decrypt(
    call: Call,
    name: String,
    v: Option<String>,
) -> Result<Response, ApiError> {
    let p: KeyOperationParameters = parse(&call.body)?;
    let alg = parse_alg(&p.alg)?;
    let ct = decode_b64url(&p.value)?;
    let conn = call.conn.clone();
    let (key, plain) = blocking(move || conn.decrypt(&name, v.as_deref(), alg, &ct)).await?;
    secret_answer(&call.base, &key, &plain)
}

fn sign_alg(alg: &str) -> Result<SignAlg, ApiError> {
    alg.parse::<SignAlg>().map_err(ApiError::from)
}

pub(super) async fn sign(
    call: Call,
    name: String,
    v: Option<String>,
) -> Result<Response, ApiError> {
    let p: KeySignParameters = parse(&call.body)?;
    let alg = sign_alg(&p.alg)?;
    let digest = decode_b64url(&p.value)?;
    let conn = call.conn.clone();
    let (key, sig) = blocking(move || conn.sign(&name, v.as_deref(), alg, &digest)).await?;
    Ok(answer(&call.base, &key, &sig))
}

pub(super) async fn verify(
    call: Call,
    name: String,
    v: Option<String>,
) -> Result<Response, ApiError> {
    let p: KeyVerifyParameters = parse(&call.body)?;
    let alg = sign_alg(&p.alg)?;
    let digest = decode_b64url(&p.digest)?;
    let sig = decode_b64url(&p.value)?;
    let conn = call.conn.clone();
    let (_, ok) = blocking(move || conn.verify(&name, v.as_deref(), alg, &digest, &sig)).await?;
    Ok(json(StatusCode::OK, &KeyVerifyResult { value: ok }))
}

pub(super) async fn random(call: Call) -> Result<Response, ApiError> {
    let p: RandomBytesRequest = parse(&call.body)?;
    let count = usize::try_from(p.count).unwrap_or(0);
    let conn = call.conn.clone();
    let bytes = blocking(move || conn.random_bytes(count)).await?;
    Ok(json(
        StatusCode::OK,
        &RandomBytes {
            value: URL_SAFE_NO_PAD.encode(&*bytes),
        },
    ))
}

/// `POST .../release`: refused on purpose. Secure key release exports a private key to an
/// attested environment; cmkfs keys are never exportable.
pub(super) async fn release(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    // The key must exist and be readable, so that a missing key is still a 404.
    blocking(move || conn.describe_key(&name, None)).await?;
    Err(ApiError::from(VaultError::Invalid(
        "key release is not supported: cmkfs keys are never exportable (private keys never \
         leave the vault)"
            .into(),
    )))
}

/// `GET .../attestation`: refused on purpose; the embedded vault keeps keys in software, so
/// there is no HSM attestation to give.
pub(super) async fn attestation(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    blocking(move || conn.describe_key(&name, None)).await?;
    Err(ApiError::from(VaultError::Invalid(
        "key attestation is not supported: this vault keeps its keys in software, not in an \
         HSM that could attest them"
            .into(),
    )))
}
