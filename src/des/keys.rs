//! Keys and identities as the user names them, the vault a set uses, and the checks a key
//! must pass before a set uses it (enabled, valid, wrapKey/unwrapKey, a wrap/unwrap probe);
//! cmkfs's own platform key for double encryption.

use super::*;

/// A key as the user named it: a name (in `--vault`), a versionless key URL
/// (`<vault>/keys/<name>`) or a full versioned id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// Vault URL.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// Version; the latest when `None`.
    pub version: Option<String>,
}

impl KeySpec {
    /// Parses `--key` (with `--version` and the default vault URL).
    pub fn parse(
        key: &str,
        version: Option<&str>,
        default_vault: &str,
    ) -> Result<KeySpec, DesError> {
        let key = key.trim();
        let (vault, name, id_version) = if let Some(idx) = key.rfind("/keys/") {
            let (vault, rest) = (&key[..idx], &key[idx + "/keys/".len()..]);
            match rest.split_once('/') {
                // A full versioned id: parse it strictly.
                Some(_) => {
                    let kid: KeyId = key.parse()?;
                    (kid.vault, kid.name, Some(kid.version))
                }
                None if !vault.is_empty() && valid_key_name(rest) => {
                    (vault.to_string(), rest.to_string(), None)
                }
                None => {
                    return Err(DesError::Invalid(format!(
                        "malformed key id {key:?}: expected <vault-url>/keys/<name>[/<version>]"
                    )))
                }
            }
        } else if valid_key_name(key) {
            (default_vault.to_string(), key.to_string(), None)
        } else {
            return Err(DesError::Invalid(format!(
                "invalid key {key:?}: give a key name (1-127 letters, digits and dashes) or a key \
                 id <vault-url>/keys/<name>[/<version>]"
            )));
        };
        let version = match (id_version, version) {
            (Some(a), Some(b)) if a != b => {
                return Err(DesError::Invalid(format!(
                    "--version {b} contradicts the version in key id {key:?}"
                )))
            }
            (Some(a), _) => Some(a),
            (None, Some(b)) => {
                let b = b.trim();
                if b.is_empty() || b.contains('/') {
                    return Err(DesError::Invalid(format!("malformed key version {b:?}")));
                }
                Some(b.to_string())
            }
            (None, None) => None,
        };
        Ok(KeySpec {
            vault: normalize_vault_url(&vault),
            name,
            version,
        })
    }

    pub(super) fn is_platform_key(&self) -> bool {
        self.vault == crate::vault::local::URL && self.name == PLATFORM_KEY
    }
}

fn normalize_vault_url(url: &str) -> String {
    if url == "local" {
        crate::vault::local::URL.to_string()
    } else if url.starts_with("https://") {
        crate::vault::http::normalize_url(url).unwrap_or_else(|_| url.to_string())
    } else {
        url.to_string()
    }
}

/// Whether two vault URLs name the same vault (`local` = `local:`, https without a trailing
/// slash).
pub(crate) fn same_vault(a: &str, b: &str) -> bool {
    normalize_vault_url(a) == normalize_vault_url(b)
}

/// Who a DES acts as: `--identity` (and optionally `--credential`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentitySpec {
    /// Identity name.
    pub name: String,
    /// Credential file; `$CMKFS_HOME/credentials/<name>.json` when `None`.
    pub credential_file: Option<PathBuf>,
}

pub(super) fn resolve_identity(home: &Home, spec: &IdentitySpec) -> Result<DesIdentity, DesError> {
    if !vault::valid_identity_name(&spec.name) {
        return Err(DesError::Invalid(format!(
            "invalid identity {:?}: use 1-127 letters, digits and dashes (not `owner`)",
            spec.name
        )));
    }
    let path = match &spec.credential_file {
        Some(p) => p.clone(),
        None => home
            .root()
            .join("credentials")
            .join(format!("{}.json", spec.name)),
    };
    if !path.exists() {
        return Err(DesError::Invalid(format!(
            "no credential for identity {} at {} (create the identity with `cmkfs vault identity \
             create {}`, or give its file with --credential)",
            spec.name,
            path.display(),
            spec.name
        )));
    }
    let path = fs::canonicalize(&path).map_err(|e| DesError::io(&path, e))?;
    Ok(DesIdentity {
        name: spec.name.clone(),
        credential_file: path,
    })
}

/// Opens `url` as `identity` (the vault owner when `None`).
pub(super) fn open_vault_as(
    home: &Home,
    url: &str,
    identity: Option<&DesIdentity>,
) -> Result<Box<dyn Vault>, DesError> {
    let Some(id) = identity else {
        return Ok(vault::open(url, home)?);
    };
    let cred = Credential::load(&id.credential_file)?;
    if cred.identity != id.name {
        return Err(DesError::Invalid(format!(
            "credential file {} is for identity {}, not {}",
            id.credential_file.display(),
            cred.identity,
            id.name
        )));
    }
    if !same_vault(&cred.vault, url) {
        return Err(DesError::Invalid(format!(
            "the credential of {} is for vault {:?}, but the key is in {url:?}",
            id.name, cred.vault
        )));
    }
    Ok(vault::open_with_credential(home, &cred)?)
}

/// Opens the vault of a DES's active key as the DES identity.
pub fn open_vault(home: &Home, des: &DiskEncryptionSet) -> Result<Box<dyn Vault>, DesError> {
    let kid = des.active_key_id()?;
    open_vault_as(home, &kid.vault, des.identity.as_ref())
}

/// Checks everything a DES needs of its key, through `vault` as the DES identity `who`, and
/// returns the exact version: not cmkfs's own platform key; get/wrapKey/unwrapKey for the
/// identity; the version enabled, currently valid and allowing wrapKey/unwrapKey; purge
/// protection on the vault.
///
/// Backends answer differently: where the vault reports its settings and the identity's
/// permissions (the local vault) they are read directly, so the refusal names exactly what is
/// missing; over the keys REST API, which has neither, purge protection comes from the key's
/// `recoveryLevel` (Azure reports `Recoverable` / `CustomizedRecoverable`, without
/// `+Purgeable`, exactly when purge protection is on) and the permissions are proven by
/// wrapping and unwrapping a random 64-byte probe.
pub fn check_key(vault: &dyn Vault, spec: &KeySpec, who: &str) -> Result<KeyInfo, DesError> {
    if spec.is_platform_key() {
        return Err(DesError::Refused(format!(
            "{PLATFORM_KEY} is cmkfs's platform key, not a customer-managed key: customer-managed \
             keys are irreversible, a Disk Encryption Set cannot use (or go back to) the platform key"
        )));
    }
    let no_purge_protection = || {
        DesError::Refused(format!(
            "vault {} does not have purge protection on: a Disk Encryption Set needs it, so that \
             its key cannot be purged while volumes depend on it (turn it on with `cmkfs vault \
             config --purge-protection on`)",
            spec.vault
        ))
    };
    // `Invalid` is how a backend says it cannot answer (see `vault::unsupported`).
    let props = match vault.properties() {
        Ok(p) => Some(p),
        Err(VaultError::Invalid(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if props.as_ref().is_some_and(|p| !p.purge_protection) {
        return Err(no_purge_protection());
    }
    let have = match vault.permissions(&spec.name) {
        Ok(h) => Some(h),
        Err(VaultError::Invalid(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(have) = &have {
        let missing: Vec<&str> = REQUIRED_PERMISSIONS
            .iter()
            .filter(|p| !have.contains(p))
            .map(|p| p.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(DesError::Refused(format!(
                "identity {who} lacks the {} permission{} on key {} (grant them with `cmkfs vault \
                 policy set {who} --key {} --permissions get,wrapKey,unwrapKey`)",
                missing.join(", "),
                if missing.len() == 1 { "" } else { "s" },
                spec.name,
                spec.name
            )));
        }
    }
    let info = match vault.get_key(&spec.name, spec.version.as_deref()) {
        Ok(i) => i,
        Err(VaultError::Denied {
            reason: DenyReason::KeyDisabled,
            what,
        }) => {
            return Err(DesError::Refused(format!(
                "key {what} is disabled: a Disk Encryption Set needs an enabled key (enable it \
                 with `cmkfs vault key update {} --enable`)",
                spec.name
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if props.is_none()
        && (info.recovery_level.is_empty() || info.recovery_level.contains("Purgeable"))
    {
        return Err(no_purge_protection());
    }
    for op in ["wrapKey", "unwrapKey"] {
        if !info.key_ops.iter().any(|o| o == op) {
            return Err(DesError::Refused(format!(
                "key {} does not allow {op} (its key_ops are {}); a Disk Encryption Set needs \
                 wrapKey and unwrapKey",
                info.kid,
                info.key_ops.join(", ")
            )));
        }
    }
    let now = crate::volume::unix_now();
    if info.nbf.is_some_and(|n| now < n) || info.exp.is_some_and(|x| now >= x) {
        return Err(DesError::Refused(format!(
            "key {} is expired or not yet valid: the vault would refuse to wrap with it",
            info.kid
        )));
    }
    if have.is_none() {
        probe_wrap_unwrap(vault, &info, who)?;
    }
    Ok(info)
}

/// Proves wrapKey and unwrapKey by a round trip of a random probe (never a real DEK).
fn probe_wrap_unwrap(vault: &dyn Vault, info: &KeyInfo, who: &str) -> Result<(), DesError> {
    let refused = |op: &str, e: VaultError| {
        DesError::Refused(format!(
            "identity {who} cannot {op} with key {} ({e}); a Disk Encryption Set needs get, \
             wrapKey and unwrapKey",
            info.kid
        ))
    };
    let probe = Dek::generate().map_err(|e| DesError::Invalid(format!("no randomness: {e}")))?;
    let w = vault
        .wrap_key(
            &info.name,
            Some(&info.version),
            info.wrap_alg,
            probe.as_bytes(),
        )
        .map_err(|e| refused("wrapKey", e))?;
    let back = vault
        .unwrap_key(&w.kid, w.alg, &w.value)
        .map_err(|e| refused("unwrapKey", e))?;
    if back.as_slice() != probe.as_bytes() {
        return Err(DesError::Invalid(format!(
            "key {} does not unwrap what it wrapped",
            info.kid
        )));
    }
    Ok(())
}

/// Opens cmkfs's platform vault (the `local:` vault of `home`, as its owner) and makes sure
/// the platform key exists and is enabled, creating it on first use.
pub fn ensure_platform_key(home: &Home) -> Result<(Box<dyn Vault>, KeyInfo), DesError> {
    let v = vault::open_or_create(crate::vault::local::URL, home)?;
    let info = match v.get_key(PLATFORM_KEY, None) {
        Ok(i) => i,
        Err(VaultError::NotFound(_)) => v.create_key(
            PLATFORM_KEY,
            &CreateKeyOptions {
                key_size: PLATFORM_KEY_SIZE,
                ..CreateKeyOptions::default()
            },
        )?,
        Err(VaultError::Denied { reason, what }) => {
            return Err(DesError::Refused(format!(
                "cmkfs's platform key is unusable ({what}: {reason}); double-encrypted volumes \
                 need it"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    Ok((v, info))
}
