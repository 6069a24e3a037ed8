//! Sealing the embedded vault at rest (see [`super::seal`] for the format): the store's master
//! key, sealing and opening private keys, `cmkfs vault seal`, passphrase changes, sealed
//! credential files, and the warning for a store still in clear.

use super::*;

impl LocalVault {
    /// Tells the user, once per process and store, that the store keeps its keys in clear.
    pub(super) fn warn_if_unsealed(&self) {
        static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        if QUIET_UNSEALED.load(std::sync::atomic::Ordering::Relaxed)
            || !matches!(seal::read_record(self.store.dir()), Ok(None))
        {
            return;
        }
        let mut w = WARNED.lock().unwrap_or_else(|e| e.into_inner());
        if w.iter().any(|p| p == self.store.dir()) {
            return;
        }
        w.push(self.store.dir().to_path_buf());
        eprintln!(
            "cmkfs: warning: the vault {} is not sealed (its keys are stored in clear): run `cmkfs vault seal`",
            self.store.dir().display()
        );
    }

    /// The store's master key (`None` for a legacy unsealed store), resolved once per
    /// connection.
    pub(super) fn master(&self) -> Result<Option<Arc<seal::MasterKey>>, VaultError> {
        if let Some(m) = self.master.get() {
            return Ok(m.clone());
        }
        let m = seal::master_key(self.store.dir())?;
        Ok(self.master.get_or_init(|| m).clone())
    }

    /// The bytes to store for a version's private key: sealed (a legacy store is refused).
    pub(super) fn seal_private_key(
        &self,
        name: &str,
        version: &str,
        pkcs8: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        match self.master()? {
            Some(mk) => Ok(Zeroizing::new(mk.seal_blob(
                seal::SealRole::KekPrivateKey,
                &format!("{name}/{version}"),
                pkcs8,
            )?)),
            None if seal::read_record(self.store.dir())?.is_some() => Err(VaultError::Conflict(
                "the vault was sealed while this operation ran: run it again".into(),
            )),
            // A legacy store keeps the keys it has, but gets no new key in clear: a user of an
            // encrypted filesystem expects a new key to be protected at rest.
            None => Err(VaultError::Invalid(format!(
                "the vault {} is not sealed, and cmkfs writes no new key in clear: seal it first \
                 with `cmkfs vault seal`",
                self.store.dir().display()
            ))),
        }
    }

    /// The PKCS#8 DER of a version from its stored bytes.
    pub(super) fn open_private_key(
        &self,
        name: &str,
        version: &str,
        stored: Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let what = format!("the private key of {}", kid(name, version));
        if let Some(env) = seal::Envelope::parse(&stored) {
            let mk = self.master()?.ok_or_else(|| {
                VaultError::Store(format!(
                    "{what} is sealed but the vault {} has no seal.json (restore it from a backup)",
                    self.store.dir().display()
                ))
            })?;
            return mk.open_blob(
                &env,
                seal::SealRole::KekPrivateKey,
                Some(&format!("{name}/{version}")),
                &what,
            );
        }
        match seal::read_record(self.store.dir())? {
            Some(rec) if rec.complete => Err(VaultError::Store(format!(
                "{what} is stored in clear although the vault is sealed (a file put there by \
                 hand?): if it is yours, `cmkfs vault seal` seals it"
            ))),
            // A legacy store, or a seal still in progress.
            _ => Ok(stored),
        }
    }

    /// Seals the store in place (owner only): a master key is made and wrapped under the
    /// passphrase, then every clear private key (KEK versions, the server's TLS keys) and
    /// every clear credential file in `credentials_dir` is rewritten sealed, each atomically;
    /// last, the seal is marked complete. An interrupted run leaves every file whole, clear
    /// or sealed, and running it again (with the same passphrase) finishes the job.
    pub fn seal(
        &self,
        credentials_dir: Option<&Path>,
        kdf: seal::KdfParams,
    ) -> Result<SealReport, VaultError> {
        self.audited("VaultSeal", URL.into(), |_| {
            self.require_owner("sealing the vault")?;
            let _lock = self.store.lock()?;
            self.store.read_vault()?;
            self.store.cleanup();
            let dir = self.store.dir();
            let (mk, resumed) = seal::begin_seal(dir, self.now(), kdf)?;
            let mut n = 0;
            for (name, version, path) in self.store.version_key_files()? {
                let role_name = format!("{name}/{version}");
                n += usize::from(seal::seal_file_in_place(
                    &mk,
                    &path,
                    seal::SealRole::KekPrivateKey,
                    &role_name,
                )?);
            }
            for (file, role) in [
                ("key.pem", seal::SealRole::TlsKey),
                ("ca-key.pem", seal::SealRole::TlsCaKey),
            ] {
                let path = dir.join("tls").join(file);
                n += usize::from(seal::seal_file_in_place(&mk, &path, role, file)?);
            }
            if let Some(cdir) = credentials_dir {
                let mut files: Vec<PathBuf> = match std::fs::read_dir(cdir) {
                    Ok(es) => es.flatten().map(|e| e.path()).collect(),
                    Err(_) => Vec::new(),
                };
                files.sort();
                for path in files {
                    let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
                        continue;
                    };
                    if !file.ends_with(".json") || file.starts_with('.') {
                        continue;
                    }
                    // Only what parses as a credential: other files are not ours to touch.
                    let is_cred = std::fs::read(&path).ok().is_some_and(|b| {
                        let b = Zeroizing::new(b);
                        serde_json::from_slice::<Credential>(&b).is_ok()
                    });
                    if is_cred {
                        n += usize::from(seal::seal_file_in_place(
                            &mk,
                            &path,
                            seal::SealRole::Credential,
                            file,
                        )?);
                    }
                }
            }
            seal::finish_seal(dir)?;
            let _ = self.master.set(Some(mk.clone()));
            Ok(SealReport {
                id: mk.id().to_string(),
                resumed,
                sealed_files: n,
            })
        })
    }

    /// Changes the passphrase the master key is wrapped under (owner only): the old one is
    /// checked first; sealed files are untouched (the master key stays the same).
    pub fn change_passphrase(
        &self,
        old: &unlock::Passphrase,
        new: &unlock::Passphrase,
        kdf: seal::KdfParams,
    ) -> Result<(), VaultError> {
        self.audited("VaultChangePassphrase", URL.into(), |_| {
            self.require_owner("changing the vault passphrase")?;
            let _lock = self.store.lock()?;
            seal::change_passphrase(self.store.dir(), old, new, kdf)
        })
    }

    /// Seals bytes for a credential file in `$CMKFS_HOME/credentials`; `None` for a legacy
    /// unsealed store (the file is then written in clear, as before).
    pub fn seal_credential(
        &self,
        file_name: &str,
        json: &[u8],
    ) -> Result<Option<Vec<u8>>, VaultError> {
        self.require_owner("sealing credentials")?;
        match self.master()? {
            Some(mk) => mk
                .seal_blob(seal::SealRole::Credential, file_name, json)
                .map(Some),
            None => Ok(None),
        }
    }
}
