//! The keys API's other cryptographic operations on a key version, besides wrap and unwrap:
//! encrypt/decrypt (RSA-OAEP-256, RSA-OAEP), sign/verify a digest (RS256/384/512,
//! PS256/384/512), and random bytes. Each is checked as Key Vault checks it: the caller's
//! permission (`encrypt`, `decrypt`, `sign`, `verify`), the version's `key_ops`, enabled, and
//! for encrypt and sign the nbf/exp window (decrypt and verify still work outside it, as unwrap
//! does). RSA1_5 is refused where an algorithm is parsed ([`crate::vault::rsa1_5_refused`]).

use zeroize::Zeroizing;

use super::store::{KeyRecord, VersionRecord};
use super::{check_name, key_url, kid, rsa, usable, LocalVault, URL};
use crate::vault::{DenyReason, KeyId, Permission, SignAlg, VaultError, WrapAlg};

/// Largest `count` of `get_random_bytes` (Key Vault's limit).
pub const MAX_RANDOM_BYTES: usize = 128;

impl LocalVault {
    /// Resolves a version for an operation: permission, active key, version, `key_ops`,
    /// enabled, and (when `current`) the nbf/exp window. Sets `id` to the versioned key id.
    fn version_for(
        &self,
        name: &str,
        version: Option<&str>,
        perm: Permission,
        op: &str,
        current: bool,
        id: &mut String,
    ) -> Result<(KeyRecord, VersionRecord), VaultError> {
        check_name(name)?;
        self.require(perm, name)?;
        self.store.read_vault()?;
        let rec = self.active_key(name)?;
        let v = Self::lookup_version(&rec, version)?.clone();
        *id = kid(name, &v.version);
        usable(&v, id, op)?;
        if current {
            self.check_current(&v, id, op)?;
        }
        Ok((rec, v))
    }

    /// Refuses outside the version's nbf/exp window (for operations that make new
    /// ciphertexts or signatures).
    pub(super) fn check_current(
        &self,
        v: &VersionRecord,
        id: &str,
        op: &str,
    ) -> Result<(), VaultError> {
        let now = self.now();
        if v.nbf.is_some_and(|n| now < n) || v.exp.is_some_and(|x| now >= x) {
            return Err(super::denied(
                DenyReason::KeyExpired,
                format!(
                    "{id} (valid {} to {}; {op} needs a current key: rotate, or update nbf/exp)",
                    v.nbf.map_or("always".into(), super::fmt_time),
                    v.exp.map_or("forever".into(), super::fmt_time)
                ),
            ));
        }
        Ok(())
    }

    fn key_id(name: &str, v: &VersionRecord) -> KeyId {
        KeyId {
            vault: URL.into(),
            name: name.into(),
            version: v.version.clone(),
        }
    }

    /// Encrypts a single block with the version's public key (needs `encrypt`).
    pub fn encrypt(
        &self,
        name: &str,
        version: Option<&str>,
        alg: WrapAlg,
        plaintext: &[u8],
    ) -> Result<(KeyId, Vec<u8>), VaultError> {
        self.audited("KeyEncrypt", target(name, version), |id| {
            let (_, v) =
                self.version_for(name, version, Permission::Encrypt, "encrypt", true, id)?;
            let out = rsa::wrap(&v.n, &v.e, alg, plaintext)?;
            Ok((Self::key_id(name, &v), out))
        })
    }

    /// Decrypts a single block with the version's private key (needs `decrypt`).
    pub fn decrypt(
        &self,
        name: &str,
        version: Option<&str>,
        alg: WrapAlg,
        ciphertext: &[u8],
    ) -> Result<(KeyId, Zeroizing<Vec<u8>>), VaultError> {
        self.audited("KeyDecrypt", target(name, version), |id| {
            let (_, v) =
                self.version_for(name, version, Permission::Decrypt, "decrypt", false, id)?;
            let key = Self::key_id(name, &v);
            let plain = self.unwrap_with(&key, id, alg, ciphertext)?;
            Ok((key, plain))
        })
    }

    /// Signs a digest with the version's private key (needs `sign`).
    pub fn sign(
        &self,
        name: &str,
        version: Option<&str>,
        alg: SignAlg,
        digest: &[u8],
    ) -> Result<(KeyId, Vec<u8>), VaultError> {
        self.audited("KeySign", target(name, version), |id| {
            let (_, v) = self.version_for(name, version, Permission::Sign, "sign", true, id)?;
            let key = Self::key_id(name, &v);
            let pkcs8 = self.private_key_of(&key, id)?;
            Ok((key, rsa::sign_digest(&pkcs8, alg, digest)?))
        })
    }

    /// Verifies a signature of a digest with the version's public key (needs `verify`).
    pub fn verify(
        &self,
        name: &str,
        version: Option<&str>,
        alg: SignAlg,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<(KeyId, bool), VaultError> {
        self.audited("KeyVerify", target(name, version), |id| {
            let (_, v) =
                self.version_for(name, version, Permission::Verify, "verify", false, id)?;
            let ok = rsa::verify_digest(&v.n, &v.e, alg, digest, signature)?;
            Ok((Self::key_id(name, &v), ok))
        })
    }

    /// `count` (1-128) random bytes from the system's CSPRNG, for any signed-in caller (Key
    /// Vault's `POST /rng`; a Managed HSM feature the server offers to every vault).
    pub fn random_bytes(&self, count: usize) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.audited("GetRandomBytes", format!("{URL}/rng"), |_| {
            if !(1..=MAX_RANDOM_BYTES).contains(&count) {
                return Err(VaultError::Invalid(format!(
                    "count must be 1 to {MAX_RANDOM_BYTES} bytes, not {count}"
                )));
            }
            self.authenticate()?;
            let mut b = Zeroizing::new(vec![0u8; count]);
            getrandom::getrandom(&mut b)
                .map_err(|e| VaultError::Store(format!("no randomness: {e}")))?;
            Ok(b)
        })
    }
}

fn target(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => kid(name, v),
        None => key_url(name),
    }
}
