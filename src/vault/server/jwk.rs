//! RSA private keys between the two forms the keys API and the vault use: a JWK with
//! base64url big-endian integers (`PUT /keys/{name}`, Key Vault's import) and PKCS#1/PKCS#8
//! DER (what `Vault::import_key` takes). A few dozen lines of DER instead of a new ASN.1
//! dependency: only `SEQUENCE`, `INTEGER`, `OCTET STRING` and a skipped `AlgorithmIdentifier`.
//!
//! Every buffer that holds private key material is [`Zeroizing`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use zeroize::{Zeroize, Zeroizing};

use super::wire::JsonWebKey;
use crate::vault::VaultError;

fn invalid(msg: &str) -> VaultError {
    VaultError::Invalid(msg.to_string())
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// DER `INTEGER` of an unsigned big-endian magnitude.
fn push_uint(out: &mut Vec<u8>, magnitude: &[u8]) {
    let skip = magnitude.iter().take_while(|b| **b == 0).count();
    let m = &magnitude[skip..];
    let pad = m.first().is_none_or(|b| b & 0x80 != 0);
    out.push(0x02);
    push_len(out, m.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(m);
}

/// A PKCS#1 `RSAPrivateKey` DER from the private members of an RSA JWK.
pub fn pkcs1_from_jwk(jwk: &JsonWebKey) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    if !matches!(jwk.kty.as_str(), "RSA" | "RSA-HSM") {
        return Err(VaultError::Invalid(format!(
            "cannot import a key of type {:?}: only RSA keys are supported",
            jwk.kty
        )));
    }
    let mut body = Zeroizing::new(Vec::new());
    push_uint(&mut body, &[0]);
    for (name, field) in [
        ("n", &jwk.n),
        ("e", &jwk.e),
        ("d", &jwk.d),
        ("p", &jwk.p),
        ("q", &jwk.q),
        ("dp", &jwk.dp),
        ("dq", &jwk.dq),
        ("qi", &jwk.qi),
    ] {
        let text = field.as_deref().ok_or_else(|| {
            VaultError::Invalid(format!(
                "the JWK lacks {name:?}: import needs the full RSA private key (n, e, d, p, q, dp, dq, qi)"
            ))
        })?;
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(text.trim_end_matches('='))
                .map_err(|_| {
                    VaultError::Invalid(format!("JWK member {name:?} is not base64url"))
                })?,
        );
        push_uint(&mut body, &bytes);
    }
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() + 4));
    out.push(0x30);
    push_len(&mut out, body.len());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads one DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8]), VaultError> {
    let bad = || invalid("malformed DER in the private key");
    let (&tag, rest) = b.split_first().ok_or_else(bad)?;
    let (&first, rest) = rest.split_first().ok_or_else(bad)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, &x| (a << 8) | usize::from(x));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(bad());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// The private members of an RSA JWK from a PKCS#8 `PrivateKeyInfo` DER. The caller should
/// [`zeroize_private`] the result once it has been sent.
pub fn jwk_from_pkcs8(pkcs8: &[u8]) -> Result<JsonWebKey, VaultError> {
    let (tag, info, _) = tlv(pkcs8)?;
    if tag != 0x30 {
        return Err(invalid("not a PKCS#8 private key"));
    }
    let (_, _version, rest) = tlv(info)?;
    let (_, _alg, rest) = tlv(rest)?;
    let (tag, octets, _) = tlv(rest)?;
    if tag != 0x04 {
        return Err(invalid("not a PKCS#8 private key"));
    }
    let (tag, mut seq, _) = tlv(octets)?;
    if tag != 0x30 {
        return Err(invalid("not an RSA private key"));
    }
    let mut ints: Vec<Zeroizing<String>> = Vec::with_capacity(9);
    for _ in 0..9 {
        let (tag, v, rest) = tlv(seq)?;
        if tag != 0x02 {
            return Err(invalid("not an RSA private key"));
        }
        let skip = v.iter().take_while(|b| **b == 0).count();
        ints.push(Zeroizing::new(URL_SAFE_NO_PAD.encode(&v[skip..])));
        seq = rest;
    }
    let take = |i: usize| Some(ints[i].to_string());
    Ok(JsonWebKey {
        kid: None,
        kty: "RSA".into(),
        key_ops: Vec::new(),
        n: take(1),
        e: take(2),
        d: take(3),
        p: take(4),
        q: take(5),
        dp: take(6),
        dq: take(7),
        qi: take(8),
    })
}

/// Overwrites the private members of a JWK.
pub fn zeroize_private(jwk: &mut JsonWebKey) {
    for f in [
        &mut jwk.d,
        &mut jwk.p,
        &mut jwk.q,
        &mut jwk.dp,
        &mut jwk.dq,
        &mut jwk.qi,
    ] {
        if let Some(s) = f.as_mut() {
            s.zeroize();
        }
        *f = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeySize, PrivateDecryptingKey};

    #[test]
    fn pkcs8_to_jwk_to_pkcs1_round_trips() {
        let k = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
        let p8 = k.as_der().unwrap().as_ref().to_vec();
        let mut jwk = jwk_from_pkcs8(&p8).unwrap();
        assert_eq!(jwk.e.as_deref(), Some("AQAB"));
        let p1 = pkcs1_from_jwk(&jwk).unwrap();
        let back = crate::vault::local::read_private_key(&p1).unwrap();
        assert_eq!(&back[..], &p8[..]);
        zeroize_private(&mut jwk);
        assert!(jwk.d.is_none() && jwk.n.is_some());
        assert!(pkcs1_from_jwk(&jwk).is_err());
        assert!(jwk_from_pkcs8(b"\x30\x03\x02\x01").is_err());
    }
}
