//! Where the vault master key comes from when a process needs it: a passphrase (an explicit
//! `--passphrase-file`, `$CMKFS_PASSPHRASE_FILE`, the systemd credential
//! `cmkfs-vault-passphrase` in `$CREDENTIALS_DIRECTORY`, or a prompt on the terminal), and the
//! kernel keyring, where `cmkfs vault unseal` leaves the unsealed key for a while so that later
//! commands need no passphrase.
//!
//! The keyring entry is a `user` key named `cmkfs:vault:<seal id>` in the user keyring (`@u`),
//! readable by the user's processes only, with a timeout; `cmkfs vault lock` invalidates it.
//! Anyone who can run code as that user while it is there can read it: that is the trade a
//! cache makes (as ssh-agent does).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::seal::{KdfParams, MasterKey};
use crate::vault::VaultError;

// ---------------------------------------------------------------------------------------------
// Where a passphrase comes from
// ---------------------------------------------------------------------------------------------

/// The environment variable naming a passphrase file.
pub const PASSPHRASE_ENV: &str = "CMKFS_PASSPHRASE_FILE";
/// The systemd credential name (`LoadCredential=cmkfs-vault-passphrase:/path`).
pub const SYSTEMD_CREDENTIAL: &str = "cmkfs-vault-passphrase";
/// The environment variable choosing the Argon2id parameters of new seals.
pub const KDF_ENV: &str = "CMKFS_VAULT_KDF";

/// An explicit passphrase source for this process (`--passphrase-file`, tests).
#[derive(Clone)]
pub enum PassphraseSource {
    /// The first line of a file.
    File(PathBuf),
    /// A value (tests, embedding programs).
    Value(Arc<Zeroizing<String>>),
}

static SOURCE: Mutex<Option<PassphraseSource>> = Mutex::new(None);
static KDF: Mutex<Option<KdfParams>> = Mutex::new(None);

/// Sets where this process reads the vault passphrase from, before the environment
/// (`$CMKFS_PASSPHRASE_FILE`), the systemd credential and the terminal prompt.
pub fn set_passphrase_source(src: Option<PassphraseSource>) {
    *SOURCE.lock().unwrap_or_else(|e| e.into_inner()) = src;
}

/// Sets the Argon2id parameters of seals this process creates (before `$CMKFS_VAULT_KDF`).
pub fn set_kdf_params(p: Option<KdfParams>) {
    *KDF.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// The Argon2id parameters for a new seal: the process setting, `$CMKFS_VAULT_KDF`, else
/// [`KdfParams::DEFAULT`].
pub fn kdf_params() -> Result<KdfParams, VaultError> {
    if let Some(p) = *KDF.lock().unwrap_or_else(|e| e.into_inner()) {
        return Ok(p);
    }
    match std::env::var(KDF_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            KdfParams::parse(&v).map_err(|e| VaultError::Invalid(format!("${KDF_ENV}: {e}")))
        }
        _ => Ok(KdfParams::DEFAULT),
    }
}

/// A passphrase and where it came from (for messages).
pub struct Passphrase {
    /// The secret.
    pub value: Zeroizing<String>,
    /// `file /path`, `$CMKFS_PASSPHRASE_FILE (/path)`, `the terminal`...
    pub origin: String,
}

/// Longest passphrase file read (a passphrase is one line).
const MAX_PASSPHRASE_FILE: u64 = 64 * 1024;

/// Reads a passphrase from the first line of a file (`origin` names it in messages). Like
/// ssh with a private key, a regular file that others may read (or anyone but its owner may
/// write) is refused: chmod 600. Pipes (`--passphrase-file <(...)`) have no such bits.
pub fn read_passphrase_file(path: &Path, origin: String) -> Result<Passphrase, VaultError> {
    read_passphrase(path, origin, false)
}

/// [`read_passphrase_file`]; `systemd`: a credential systemd placed in the unit's private
/// `$CREDENTIALS_DIRECTORY`, which may be group-readable by design (0440).
fn read_passphrase(path: &Path, origin: String, systemd: bool) -> Result<Passphrase, VaultError> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let cannot = |e: std::io::Error| {
        VaultError::Invalid(format!(
            "cannot read the vault passphrase from {origin}: {e}"
        ))
    };
    let f = fs::File::open(path).map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    if meta.is_file() {
        let mode = meta.mode() & 0o777;
        // Group read is what a systemd credential (0440) or a root:root 0640 file gets;
        // nothing else may reach a passphrase file.
        let group_read_ok = systemd || (meta.uid() == 0 && meta.gid() == 0);
        let too_open =
            mode & 0o007 != 0 || mode & 0o020 != 0 || (mode & 0o040 != 0 && !group_read_ok);
        // As ssh's StrictModes: a file another user owns is theirs to rewrite (chmod too).
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(VaultError::Invalid(format!(
                "the vault passphrase file {} (from {origin}) belongs to another user (uid {}), \
                 who could change it: use a file owned by you or root (chown)",
                path.display(),
                meta.uid()
            )));
        }
        if too_open {
            return Err(VaultError::Invalid(format!(
                "the vault passphrase file {} (from {origin}) may be read or changed by others \
                 (mode {mode:03o}): run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(MAX_PASSPHRASE_FILE)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        VaultError::Invalid(format!("the vault passphrase in {origin} is not UTF-8"))
    })?;
    // The first line: a file written by `echo` or an editor ends with a newline.
    let line = text.split(['\n', '\r']).next().unwrap_or("");
    if line.is_empty() {
        return Err(VaultError::Invalid(format!(
            "the vault passphrase in {origin} is empty"
        )));
    }
    Ok(Passphrase {
        value: Zeroizing::new(line.to_string()),
        origin,
    })
}

/// Whether a passphrase can be had without a terminal.
fn configured_source() -> Result<Option<Passphrase>, VaultError> {
    let src = SOURCE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match src {
        Some(PassphraseSource::File(p)) => {
            let o = format!("--passphrase-file {}", p.display());
            return read_passphrase_file(&p, o).map(Some);
        }
        Some(PassphraseSource::Value(v)) => {
            return Ok(Some(Passphrase {
                value: (*v).clone(),
                origin: "the passphrase given to this process".into(),
            }))
        }
        None => {}
    }
    if let Some(p) = std::env::var_os(PASSPHRASE_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        let o = format!("${PASSPHRASE_ENV} ({})", p.display());
        return read_passphrase_file(&p, o).map(Some);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(dir).join(SYSTEMD_CREDENTIAL);
        if p.exists() {
            let o = format!("the systemd credential {SYSTEMD_CREDENTIAL}");
            return read_passphrase(&p, o, true).map(Some);
        }
    }
    Ok(None)
}

fn on_terminal() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

fn no_source(what: &str) -> VaultError {
    VaultError::Unavailable(format!(
        "{what} needs the vault passphrase: pass --passphrase-file FILE, set ${PASSPHRASE_ENV}, \
         give a systemd credential {SYSTEMD_CREDENTIAL}, run on a terminal, or cache the key \
         first with `cmkfs vault unseal`"
    ))
}

fn prompt(text: &str) -> Result<Zeroizing<String>, VaultError> {
    rpassword::prompt_password(text)
        .map(Zeroizing::new)
        .map_err(|e| VaultError::Invalid(format!("cannot read the passphrase: {e}")))
}

/// The passphrase of an existing seal, from the first configured source or the terminal.
pub fn passphrase(what: &str) -> Result<Passphrase, VaultError> {
    if let Some(p) = configured_source()? {
        return Ok(p);
    }
    if on_terminal() {
        return Ok(Passphrase {
            value: prompt(&format!("Passphrase of {what}: "))?,
            origin: "the terminal".into(),
        });
    }
    Err(no_source(&format!("opening {what}")))
}

/// A new passphrase: the first configured source, or asked twice on the terminal.
pub fn new_passphrase(what: &str) -> Result<Passphrase, VaultError> {
    if let Some(p) = configured_source()? {
        return Ok(p);
    }
    if on_terminal() {
        return new_passphrase_on_terminal(what);
    }
    Err(no_source(&format!("creating {what}")))
}

/// A new passphrase asked twice on the terminal.
pub fn new_passphrase_on_terminal(what: &str) -> Result<Passphrase, VaultError> {
    if !on_terminal() {
        return Err(VaultError::Invalid(format!(
            "the new passphrase for {what} is asked on a terminal: pass --new-passphrase-file FILE"
        )));
    }
    let a = prompt(&format!("New passphrase for {what}: "))?;
    let b = prompt("Repeat the passphrase: ")?;
    if *a != *b {
        return Err(VaultError::Invalid(
            "the two passphrases differ: nothing was changed".into(),
        ));
    }
    if a.is_empty() {
        return Err(VaultError::Invalid("the passphrase is empty".into()));
    }
    Ok(Passphrase {
        value: a,
        origin: "the terminal".into(),
    })
}

pub(crate) fn wrong_passphrase(store: &Path, origin: &str) -> VaultError {
    VaultError::Invalid(format!(
        "the passphrase from {origin} does not open the vault {}: check it (or the file it is read from)",
        store.display()
    ))
}

// ---------------------------------------------------------------------------------------------
// The kernel keyring cache (`cmkfs vault unseal` / `lock`)
// ---------------------------------------------------------------------------------------------

fn keyring_description(id: &str) -> String {
    format!("cmkfs:vault:{id}")
}

fn keyring_err(e: linux_keyutils::KeyError) -> VaultError {
    VaultError::Unavailable(format!(
        "the kernel keyring is not usable here ({e:?}): use a passphrase file instead"
    ))
}

/// Puts `mk` into the user's kernel keyring for `timeout_secs` (replacing an older entry).
pub fn keyring_store(mk: &MasterKey, timeout_secs: u64) -> Result<(), VaultError> {
    use linux_keyutils::{KeyPermissionsBuilder, KeyRing, KeyRingIdentifier, Permission};
    let ring = KeyRing::from_special_id(KeyRingIdentifier::User, true).map_err(keyring_err)?;
    let key = ring
        .add_key(&keyring_description(mk.id()), &mk.bytes()[..])
        .map_err(keyring_err)?;
    // Any process of this user may read it (the mount daemon, services of the same user):
    // not only those that possess the session keyring it was added from.
    let perms = KeyPermissionsBuilder::builder()
        .posessor(Permission::ALL)
        .user(Permission::VIEW | Permission::READ | Permission::SEARCH)
        .build();
    key.set_perms(perms).map_err(keyring_err)?;
    key.set_timeout(usize::try_from(timeout_secs.max(1)).unwrap_or(usize::MAX))
        .map_err(keyring_err)?;
    Ok(())
}

/// The master key of seal `id` from the kernel keyring, if it is there.
pub(crate) fn keyring_load(id: &str) -> Option<MasterKey> {
    use linux_keyutils::{KeyRing, KeyRingIdentifier};
    let ring = KeyRing::from_special_id(KeyRingIdentifier::User, false).ok()?;
    let key = ring.search(&keyring_description(id)).ok()?;
    let mut buf = Zeroizing::new([0u8; 64]);
    let n = key.read(&mut *buf).ok()?;
    MasterKey::from_bytes(id, buf.get(..n)?)
}

/// Removes seal `id` from the kernel keyring; whether it was there.
pub fn keyring_drop(id: &str) -> Result<bool, VaultError> {
    use linux_keyutils::{KeyError, KeyRing, KeyRingIdentifier};
    let ring = match KeyRing::from_special_id(KeyRingIdentifier::User, false) {
        Ok(r) => r,
        Err(KeyError::KeyDoesNotExist) => return Ok(false),
        Err(e) => return Err(keyring_err(e)),
    };
    let mut any = false;
    // Several entries can exist (unseal from different sessions); drop them all.
    while let Ok(key) = ring.search(&keyring_description(id)) {
        key.invalidate().map_err(keyring_err)?;
        any = true;
    }
    Ok(any)
}

// ---------------------------------------------------------------------------------------------
// Handing the master key to a child process (the mount daemon `cmkfs mount` starts)
// ---------------------------------------------------------------------------------------------

/// The environment variable naming the pipe a parent hands the master key through.
pub const KEY_FD_ENV: &str = "CMKFS_VAULT_KEY_FD";

/// Hands `mk` to the child `cmd` will start, through a pipe whose read end the child inherits
/// (its number in `$CMKFS_VAULT_KEY_FD`): a passphrase typed into `cmkfs mount` then serves
/// the daemon, which has no terminal. The key is written into the pipe now (it fits the pipe
/// buffer), so nothing waits on the child.
pub fn hand_to_child(
    cmd: &mut std::process::Command,
    mk: &MasterKey,
) -> Result<std::os::fd::OwnedFd, VaultError> {
    use std::io::Write as _;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::os::unix::process::CommandExt as _;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(VaultError::Unavailable(format!(
            "cannot hand the vault key to the daemon: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut msg = Zeroizing::new(Vec::with_capacity(100));
    msg.extend_from_slice(mk.id().as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(&mk.bytes()[..]);
    std::fs::File::from(write)
        .write_all(&msg)
        .map_err(|e| VaultError::Unavailable(format!("cannot hand the vault key on: {e}")))?;
    let fd = read.as_raw_fd();
    cmd.env(KEY_FD_ENV, fd.to_string());
    // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on a descriptor the
    // child inherited from us.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    Ok(read)
}

/// Takes a master key handed down by the parent ([`hand_to_child`]) into this process's
/// cache. Call once at start, before other threads exist (it clears the variable).
pub fn take_handed_key() {
    use std::io::Read as _;
    use std::os::fd::FromRawFd as _;
    let Some(v) = std::env::var_os(KEY_FD_ENV) else {
        return;
    };
    std::env::remove_var(KEY_FD_ENV);
    let Some(fd) = v
        .to_str()
        .and_then(|s| s.parse::<i32>().ok())
        .filter(|&fd| fd > 2)
    else {
        return;
    };
    // SAFETY: the parent passed this descriptor for us to own; it is read once and closed.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut buf = Zeroizing::new(Vec::new());
    if f.read_to_end(&mut buf).is_err() {
        return;
    }
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return;
    };
    let Ok(id) = std::str::from_utf8(&buf[..nl]) else {
        return;
    };
    if let Some(mk) = MasterKey::from_bytes(id, &buf[nl + 1..]) {
        super::seal::cache_put(mk);
    }
}

/// Unit tests: the test passphrase and the cheap Argon2id setting for this process.
#[cfg(test)]
pub(crate) fn use_test_passphrase() {
    set_passphrase_source(Some(PassphraseSource::Value(Arc::new(Zeroizing::new(
        "cmkfs test passphrase".to_string(),
    )))));
    set_kdf_params(Some(KdfParams::TEST));
}
