//! The vaults this machine talks to: local configuration, never the backing store.
//!
//! A volume header names its vault in its key id (`<vault-url>/keys/<name>/<version>`), but a
//! header is untrusted input: whoever can write the backing directory can write it. So a URL
//! in a header (or in a command's `--vault`) is only a *reference* to a vault configured here;
//! cmkfs connects to nothing else and loads no PKCS#11 module from anywhere else (as
//! cryptsetup loads token plugins only from its own directory, never from a LUKS header).
//!
//! - `local:` (the embedded vault of `$CMKFS_HOME`) is always configured.
//! - `cmkfs vault add NAME URL` configures an `https://` vault (optionally with a pinned CA
//!   and a credential file) or a `pkcs11:` token. A PKCS#11 module must be an absolute path
//!   to a regular file owned by root and not writable by group or others, in directories
//!   owned by root and not writable by group or others, none of them a cmkfs backing
//!   directory; it is checked again before every load.
//! - Stored in `$CMKFS_HOME/vaults.json` (0600), replaced atomically under a lock.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{http, local, pkcs11::Pkcs11Url, valid_key_name, Credential, VaultError};
use crate::home::Home;

/// File of the configured vaults in `$CMKFS_HOME`.
pub const FILE: &str = "vaults.json";
const LOCK_FILE: &str = ".vaults.lock";
const SCHEMA: u32 = 1;
/// The volume header's file name (`volume::header::HEADER_FILE`; the vault room does not
/// depend on the volume room): a directory holding it is a cmkfs backing directory.
const VOLUME_HEADER: &str = "cmkfs.volume.json";

/// The kind of a vault URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaultKind {
    /// `local:`, the embedded vault.
    Local,
    /// `https://HOST[:PORT]`, a Key Vault-compatible server.
    Https,
    /// `pkcs11:/module.so?token=LABEL...`, an HSM token.
    Pkcs11,
}

/// One configured vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfiguredVault {
    /// Local name (`--vault NAME` accepts it).
    pub name: String,
    /// Backend.
    pub kind: VaultKind,
    /// The URL as key ids carry it (https: normalized; pkcs11: module, token, PIN file).
    pub url: String,
    /// https: PEM certificate(s) the server's certificate must chain to (read at `vault add`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// https: the credential file to connect with (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<PathBuf>,
    /// pkcs11: the module path, checked at `vault add` and before every load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<PathBuf>,
    /// Unix seconds.
    pub added: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VaultsFile {
    schema: u32,
    vaults: Vec<ConfiguredVault>,
}

/// What identifies a vault, whatever extra parameters a URL carries.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    Local,
    Https(String),
    Pkcs11 { module: PathBuf, token: String },
}

fn identity(url: &str) -> Result<Identity, VaultError> {
    if url == local::URL || url == "local" {
        return Ok(Identity::Local);
    }
    if url.starts_with("https://") {
        return Ok(Identity::Https(http::normalize_url(url)?));
    }
    if url.starts_with("pkcs11:") {
        let u = Pkcs11Url::parse(url)?;
        return Ok(Identity::Pkcs11 {
            module: u.module,
            token: u.token,
        });
    }
    Err(VaultError::Invalid(format!(
        "unsupported vault URL {url:?} (supported: local:, https://HOST[:PORT], \
         pkcs11:/path/module.so?token=LABEL&pin-source=file:/path)"
    )))
}

fn path(home: &Home) -> PathBuf {
    home.root().join(FILE)
}

fn store_err(p: &Path, e: impl std::fmt::Display) -> VaultError {
    VaultError::Store(format!("{}: {e}", p.display()))
}

fn load(home: &Home) -> Result<VaultsFile, VaultError> {
    let p = path(home);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VaultsFile::default()),
        Err(e) => return Err(store_err(&p, e)),
    };
    let f: VaultsFile = serde_json::from_slice(&bytes)
        .map_err(|e| store_err(&p, format!("not a list of configured vaults ({e})")))?;
    if f.schema != SCHEMA {
        return Err(store_err(&p, format!("unknown schema {}", f.schema)));
    }
    Ok(f)
}

/// Runs `f` on the configured vaults under the lock and saves what it leaves.
fn update<T>(
    home: &Home,
    f: impl FnOnce(&mut VaultsFile) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    crate::fsutil::create_private_dir(home.root()).map_err(|e| store_err(home.root(), e))?;
    let lock_path = home.root().join(LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| store_err(&lock_path, e))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(store_err(&lock_path, e));
        }
    }
    let mut file = load(home)?;
    file.schema = SCHEMA;
    let out = f(&mut file)?;
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| store_err(&path(home), e))?;
    json.push(b'\n');
    crate::fsutil::write_atomic(&path(home), &json, 0o600)
        .map_err(|e| store_err(&path(home), e))?;
    Ok(out)
}

/// Every configured vault besides `local:` (which always is), in the order added.
pub fn list(home: &Home) -> Result<Vec<ConfiguredVault>, VaultError> {
    Ok(load(home)?.vaults)
}

/// The configured vault a URL refers to, or a configured vault's name resolved. `Ok(None)` for
/// `local:`, which needs no entry.
pub fn lookup(home: &Home, url_or_name: &str) -> Result<Option<ConfiguredVault>, VaultError> {
    let vaults = load(home)?.vaults;
    if !url_or_name.contains(':') {
        if url_or_name == "local" {
            return Ok(None);
        }
        return vaults
            .into_iter()
            .find(|v| v.name == url_or_name)
            .map(Some)
            .ok_or_else(|| {
                VaultError::Invalid(format!(
                    "no vault named {url_or_name:?} is configured (see `cmkfs vault list-configured`)"
                ))
            });
    }
    let want = identity(url_or_name)?;
    if want == Identity::Local {
        return Ok(None);
    }
    for v in vaults {
        if identity(&v.url).is_ok_and(|i| i == want) {
            return Ok(Some(v));
        }
    }
    Err(VaultError::NotConfigured {
        url: url_or_name.to_string(),
    })
}

/// Options of `cmkfs vault add`.
#[derive(Clone, Debug, Default)]
pub struct AddOptions {
    /// https: PEM file of the CA to pin.
    pub ca: Option<PathBuf>,
    /// https: credential file to connect with.
    pub credential: Option<PathBuf>,
}

/// Configures a vault (see the module docs for what is checked). PKCS#11 tokens are opened
/// once (module loaded, token found, PIN checked) before they are recorded.
pub fn add(
    home: &Home,
    name: &str,
    url: &str,
    opts: &AddOptions,
) -> Result<ConfiguredVault, VaultError> {
    if !valid_key_name(name) || name.eq_ignore_ascii_case("local") {
        return Err(VaultError::Invalid(format!(
            "invalid vault name {name:?}: use 1-127 letters, digits and dashes (not `local`)"
        )));
    }
    let (kind, url, module) = match identity(url)? {
        Identity::Local => {
            return Err(VaultError::Invalid(
                "local: is the embedded vault and always configured".into(),
            ))
        }
        Identity::Https(u) => (VaultKind::Https, u, None),
        Identity::Pkcs11 { module, .. } => {
            let parsed = Pkcs11Url::parse(url)?;
            if parsed.has_pin_value() {
                return Err(VaultError::Invalid(
                    "a configured PKCS#11 vault takes its PIN from a file: put the PIN in a 0600 \
                     file and use pin-source=file:/path (or set $CMKFS_PKCS11_PIN), not pin-value"
                        .into(),
                ));
            }
            check_module(&module)?;
            (VaultKind::Pkcs11, parsed.vault_url(), Some(module))
        }
    };
    if kind == VaultKind::Pkcs11 && (opts.ca.is_some() || opts.credential.is_some()) {
        return Err(VaultError::Invalid(
            "--ca and --credential are for https:// vaults (a token's credential is its PIN)"
                .into(),
        ));
    }
    let ca_pem = match &opts.ca {
        Some(p) => {
            let pem = fs::read_to_string(p)
                .map_err(|e| VaultError::Invalid(format!("cannot read {}: {e}", p.display())))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(VaultError::Invalid(format!(
                    "{} holds no PEM certificate",
                    p.display()
                )));
            }
            Some(pem)
        }
        None => None,
    };
    let credential = match &opts.credential {
        Some(p) => {
            let c = Credential::load(p)?;
            if http::normalize_url(&c.vault).ok().as_deref() != Some(url.as_str()) {
                return Err(VaultError::Invalid(format!(
                    "credential {} is for vault {:?}, not {url}",
                    p.display(),
                    c.vault
                )));
            }
            Some(
                fs::canonicalize(p)
                    .map_err(|e| VaultError::Invalid(format!("{}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    let entry = ConfiguredVault {
        name: name.to_string(),
        kind,
        url,
        ca_pem,
        credential,
        module,
        added: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    if kind == VaultKind::Pkcs11 {
        // Prove it works before trusting it: module, token, PIN.
        super::pkcs11::Pkcs11Vault::open(&entry.url)?;
    }
    update(home, |f| {
        let want = identity(&entry.url)?;
        if let Some(v) = f.vaults.iter().find(|v| v.name == entry.name) {
            return Err(VaultError::Conflict(format!(
                "a vault named {} is configured already ({}); remove it first",
                v.name, v.url
            )));
        }
        if let Some(v) = f
            .vaults
            .iter()
            .find(|v| identity(&v.url).is_ok_and(|i| i == want))
        {
            return Err(VaultError::Conflict(format!(
                "{} is configured already as {}",
                entry.url, v.name
            )));
        }
        f.vaults.push(entry.clone());
        Ok(())
    })?;
    Ok(entry)
}

/// Forgets a configured vault: volumes whose keys are there stop mounting on this machine.
pub fn remove(home: &Home, name: &str) -> Result<ConfiguredVault, VaultError> {
    update(home, |f| {
        let i = f
            .vaults
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| {
                VaultError::NotFound(format!(
                    "no vault named {name:?} is configured (see `cmkfs vault list-configured`)"
                ))
            })?;
        Ok(f.vaults.remove(i))
    })
}

/// Checks that a PKCS#11 module may be loaded into a cmkfs process (see the module docs).
/// Called at `vault add` and before every load.
pub fn check_module(module: &Path) -> Result<(), VaultError> {
    let refuse = |why: String| {
        VaultError::Invalid(format!(
            "PKCS#11 module {} cannot be trusted: {why}",
            module.display()
        ))
    };
    if !module.is_absolute() {
        return Err(refuse("the path must be absolute".into()));
    }
    let canon = fs::canonicalize(module).map_err(|e| refuse(e.to_string()))?;
    let meta = fs::metadata(&canon).map_err(|e| refuse(e.to_string()))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let owned_by_root_and_closed = |what: &str, p: &Path, m: &fs::Metadata| {
        if m.uid() != 0 {
            return Err(refuse(format!(
                "{what} {} is owned by uid {}, not root",
                p.display(),
                m.uid()
            )));
        }
        if m.permissions().mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "{what} {} is writable by group or others",
                p.display()
            )));
        }
        Ok(())
    };
    owned_by_root_and_closed("the file", &canon, &meta)?;
    // A symlink on the way is only as safe as the directory it sits in (checked below) and
    // its own owner.
    if let Ok(l) = fs::symlink_metadata(module) {
        if l.file_type().is_symlink() && l.uid() != 0 {
            return Err(refuse(format!(
                "the link {} is owned by uid {}, not root",
                module.display(),
                l.uid()
            )));
        }
    }
    for dir in module.ancestors().skip(1).chain(canon.ancestors().skip(1)) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let m = fs::metadata(dir).map_err(|e| refuse(format!("{}: {e}", dir.display())))?;
        owned_by_root_and_closed("directory", dir, &m)?;
        if dir.join(VOLUME_HEADER).exists() {
            return Err(refuse(format!(
                "it lies inside the cmkfs backing directory {}",
                dir.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_name_matches_the_volume_room() {
        assert_eq!(VOLUME_HEADER, crate::volume::header::HEADER_FILE);
    }

    #[test]
    fn urls_match_by_vault_identity() {
        assert_eq!(identity("local").unwrap(), Identity::Local);
        assert_eq!(
            identity("https://h:1/").unwrap(),
            identity("https://h:1").unwrap()
        );
        assert_eq!(
            identity("pkcs11:/m.so?token=t&pin-source=file:/a").unwrap(),
            identity("pkcs11:/m.so?token=t").unwrap()
        );
        assert_ne!(
            identity("pkcs11:/m.so?token=t").unwrap(),
            identity("pkcs11:/n.so?token=t").unwrap()
        );
    }

    #[test]
    fn unconfigured_vaults_are_refused_and_configured_ones_found() {
        let d = tempfile::tempdir().unwrap();
        let home = Home::at(d.path().join("home"));
        assert_eq!(lookup(&home, "local:").unwrap(), None);
        let e = lookup(&home, "https://vault.example:8443").unwrap_err();
        assert!(matches!(e, VaultError::NotConfigured { .. }), "{e}");
        assert!(e.to_string().contains("cmkfs vault add"), "{e}");
        let v = add(
            &home,
            "prod",
            "https://vault.example:8443/",
            &AddOptions::default(),
        )
        .unwrap();
        assert_eq!(v.url, "https://vault.example:8443");
        assert_eq!(
            lookup(&home, "https://vault.example:8443").unwrap(),
            Some(v.clone())
        );
        assert_eq!(lookup(&home, "prod").unwrap(), Some(v.clone()));
        assert!(add(
            &home,
            "again",
            "https://vault.example:8443",
            &AddOptions::default()
        )
        .is_err());
        assert!(add(&home, "local", "https://other:1", &AddOptions::default()).is_err());
        let mode = fs::metadata(path(&home)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        remove(&home, "prod").unwrap();
        assert!(lookup(&home, "https://vault.example:8443").is_err());
        assert!(remove(&home, "prod").is_err());
    }

    #[test]
    fn modules_outside_root_owned_directories_or_inside_backing_dirs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let so = d.path().join("x.so");
        fs::write(&so, b"not really").unwrap();
        // A temp dir is under /tmp (world-writable, sticky): refused whoever owns the file.
        let e = check_module(&so).unwrap_err().to_string();
        assert!(e.contains("cannot be trusted"), "{e}");
        assert!(check_module(Path::new("relative.so")).is_err());
        assert!(check_module(Path::new("/nonexistent/x.so")).is_err());
    }
}
