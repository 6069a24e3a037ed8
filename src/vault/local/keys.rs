//! The key operations of the [`Vault`] trait for the embedded vault: create, import, get,
//! list, versions, update, rotate, wrap/unwrap, soft delete, recover, purge.

use super::*;

impl Vault for LocalVault {
    fn url(&self) -> String {
        URL.to_string()
    }

    fn apply_due_rotations(&self) -> Result<Vec<KeyInfo>, VaultError> {
        self.apply_rotation_policies()
    }

    fn rotation_policy(&self, name: &str) -> Result<policy::RotationPolicy, VaultError> {
        self.get_rotation_policy(name)
    }

    fn set_rotation_policy(
        &self,
        name: &str,
        p: &policy::RotationPolicy,
    ) -> Result<policy::RotationPolicy, VaultError> {
        LocalVault::set_rotation_policy(self, name, p)
    }

    fn watch(&self) -> Option<std::sync::mpsc::Receiver<()>> {
        match crate::vault::watch::watch_file(&self.generation_path()) {
            Ok(rx) => Some(rx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the vault store; periodic checks only");
                None
            }
        }
    }

    fn create_key(&self, name: &str, opts: &CreateKeyOptions) -> Result<KeyInfo, VaultError> {
        self.audited("KeyCreate", key_url(name), |id| {
            check_name(name)?;
            rsa::check_key_size(opts.key_size)?;
            self.require(Permission::Create, name)?;
            self.store.read_vault()?;
            // Key generation is slow: outside the lock, so other writers are not held up.
            let m = rsa::generate(opts.key_size)?;
            let info = self.add_version(name, &m, false, Some(opts.wrap_alg), CreateMode::New)?;
            id.clone_from(&info.kid);
            Ok(info)
        })
    }

    fn get_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        self.audited("KeyGet", key_url(name), |id| {
            let info = self.describe(name, version, id)?;
            if !info.enabled {
                return Err(disabled(&info.kid));
            }
            Ok(info)
        })
    }

    fn describe_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        self.audited("KeyGet", key_url(name), |id| {
            self.describe(name, version, id)
        })
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, VaultError> {
        self.audited("KeyList", format!("{URL}/keys"), |_| {
            let cfg = self.store.read_vault()?;
            let ident = self.authenticate()?;
            let mut out = Vec::new();
            let mut any_allowed = ident.is_none();
            for name in self.store.key_names()? {
                if let Some(rec) = &ident {
                    if !effective(rec, &name).contains(&Permission::List) {
                        continue;
                    }
                    any_allowed = true;
                }
                let Some(rec) = self.store.read_key(&name)? else {
                    continue;
                };
                if rec.deleted.is_some() {
                    continue;
                }
                let latest = rec.latest().ok_or_else(|| damaged(&name))?;
                out.push(self.info(&cfg, &rec, latest));
            }
            if !any_allowed {
                if let Some(rec) = &ident {
                    if !rec.policies.values().any(|p| p.contains(&Permission::List)) {
                        return Err(denied(
                            DenyReason::PermissionDenied,
                            format!(
                                "{URL}/keys (identity {} lacks the list permission)",
                                rec.name
                            ),
                        ));
                    }
                }
            }
            Ok(out)
        })
    }

    fn list_key_versions(&self, name: &str) -> Result<Vec<KeyInfo>, VaultError> {
        self.audited("KeyListVersions", key_url(name), |_| {
            check_name(name)?;
            self.require(Permission::List, name)?;
            let cfg = self.store.read_vault()?;
            let rec = self.active_key(name)?;
            Ok(rec
                .versions
                .iter()
                .map(|v| self.info(&cfg, &rec, v))
                .collect())
        })
    }

    fn rotate_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        self.audited("KeyRotate", key_url(name), |id| {
            check_name(name)?;
            self.require(Permission::Rotate, name)?;
            self.store.read_vault()?;
            let rec = self.active_key(name)?;
            let size = rec.latest().ok_or_else(|| damaged(name))?.key_size;
            let m = rsa::generate(size)?;
            let info = self.add_version(name, &m, false, None, CreateMode::Rotate)?;
            id.clone_from(&info.kid);
            Ok(info)
        })
    }

    fn import_key(
        &self,
        name: &str,
        pkcs8_der: &[u8],
        opts: &ImportKeyOptions,
    ) -> Result<KeyInfo, VaultError> {
        self.audited("KeyImport", key_url(name), |id| {
            check_name(name)?;
            let m = rsa::material_from_pkcs8(pkcs8_der)?;
            self.require(Permission::Import, name)?;
            let info = self.add_version(name, &m, true, opts.wrap_alg, CreateMode::Import)?;
            id.clone_from(&info.kid);
            Ok(info)
        })
    }

    fn update_key(
        &self,
        name: &str,
        version: Option<&str>,
        upd: &KeyUpdate,
    ) -> Result<KeyInfo, VaultError> {
        self.audited("KeyUpdate", key_url(name), |id| {
            check_name(name)?;
            if let Some(ops) = &upd.key_ops {
                validate_key_ops(ops)?;
            }
            if let Some(tags) = &upd.tags {
                validate_tags(tags)?;
            }
            self.require(Permission::Update, name)?;
            self.mutate(|cfg| {
                let mut rec = self.active_key(name)?;
                let idx = {
                    let v = Self::lookup_version(&rec, version)?;
                    rec.versions
                        .iter()
                        .position(|x| x.version == v.version)
                        .ok_or_else(|| damaged(name))?
                };
                let now = self.now();
                let v = &mut rec.versions[idx];
                *id = kid(name, &v.version);
                if let Some(e) = upd.enabled {
                    v.enabled = e;
                }
                if let Some(n) = upd.nbf {
                    v.nbf = n;
                }
                if let Some(x) = upd.exp {
                    v.exp = x;
                }
                if let (Some(n), Some(x)) = (v.nbf, v.exp) {
                    if n >= x {
                        return Err(VaultError::Invalid(format!(
                            "not-before ({}) must be earlier than expiry ({})",
                            fmt_time(n),
                            fmt_time(x)
                        )));
                    }
                }
                if let Some(ops) = &upd.key_ops {
                    v.key_ops = ops.clone();
                }
                if let Some(tags) = &upd.tags {
                    v.tags = tags.clone();
                }
                v.updated = now;
                rec.updated = now;
                let out = rec.versions[idx].clone();
                self.store.write_key(&rec)?;
                Ok(self.info(cfg, &rec, &out))
            })
        })
    }

    fn delete_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        self.audited("KeyDelete", key_url(name), |_| {
            check_name(name)?;
            self.require(Permission::Delete, name)?;
            self.mutate(|cfg| {
                let mut rec = self.store.read_key(name)?.ok_or_else(|| not_found(name))?;
                if rec.deleted.is_some() {
                    return Err(VaultError::Conflict(format!(
                        "key {name} is already deleted (see `cmkfs vault key list-deleted`)"
                    )));
                }
                let now = self.now();
                let d = DeletedRecord {
                    deleted_date: now,
                    scheduled_purge_date: now + u64::from(cfg.retention_days) * DAY,
                };
                rec.deleted = Some(d.clone());
                rec.updated = now;
                self.store.write_key(&rec)?;
                self.deleted_info(cfg, &rec, &d)
            })
        })
    }

    fn list_deleted_keys(&self) -> Result<Vec<DeletedKeyInfo>, VaultError> {
        self.audited("KeyListDeleted", format!("{URL}/deletedkeys"), |_| {
            let cfg = self.store.read_vault()?;
            let ident = self.authenticate()?;
            if let Some(rec) = &ident {
                if !rec.policies.values().any(|p| p.contains(&Permission::List)) {
                    return Err(denied(
                        DenyReason::PermissionDenied,
                        format!(
                            "{URL}/deletedkeys (identity {} lacks the list permission)",
                            rec.name
                        ),
                    ));
                }
            }
            let mut out = Vec::new();
            for name in self.store.key_names()? {
                if let Some(rec) = &ident {
                    if !effective(rec, &name).contains(&Permission::List) {
                        continue;
                    }
                }
                let Some(rec) = self.store.read_key(&name)? else {
                    continue;
                };
                if let Some(d) = &rec.deleted {
                    out.push(self.deleted_info(&cfg, &rec, d)?);
                }
            }
            Ok(out)
        })
    }

    fn get_deleted_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        self.audited("KeyGetDeleted", format!("{URL}/deletedkeys/{name}"), |_| {
            check_name(name)?;
            self.require(Permission::Get, name)?;
            let cfg = self.store.read_vault()?;
            let rec = self.store.read_key(name)?.ok_or_else(|| not_found(name))?;
            let d = rec.deleted.clone().ok_or_else(|| not_deleted(name))?;
            self.deleted_info(&cfg, &rec, &d)
        })
    }

    fn recover_deleted_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        self.audited("KeyRecover", format!("{URL}/deletedkeys/{name}"), |id| {
            check_name(name)?;
            self.require(Permission::Recover, name)?;
            self.mutate(|cfg| {
                let mut rec = self.store.read_key(name)?.ok_or_else(|| not_found(name))?;
                if rec.deleted.is_none() {
                    return Err(not_deleted(name));
                }
                rec.deleted = None;
                rec.updated = self.now();
                self.store.write_key(&rec)?;
                let latest = rec.latest().ok_or_else(|| damaged(name))?;
                *id = kid(name, &latest.version);
                Ok(self.info(cfg, &rec, latest))
            })
        })
    }

    fn purge_deleted_key(&self, name: &str) -> Result<(), VaultError> {
        self.audited("KeyPurge", format!("{URL}/deletedkeys/{name}"), |_| {
            check_name(name)?;
            self.require(Permission::Purge, name)?;
            self.mutate_sparing(Some(name), |cfg| {
                let rec = self.store.read_key(name)?.ok_or_else(|| not_found(name))?;
                let Some(d) = &rec.deleted else {
                    return Err(VaultError::Conflict(format!(
                        "key {name} is not deleted: delete it first (`cmkfs vault key delete {name}`)"
                    )));
                };
                if cfg.purge_protection && self.now() < d.scheduled_purge_date {
                    return Err(VaultError::Conflict(format!(
                        "purge protection is on: key {name} cannot be purged before {} \
                         (it is purged automatically then; until then it can be recovered)",
                        fmt_time(d.scheduled_purge_date)
                    )));
                }
                self.store.purge_key(name)
            })
        })
    }

    fn properties(&self) -> Result<VaultProperties, VaultError> {
        self.config()
    }

    fn permissions(&self, name: &str) -> Result<Vec<Permission>, VaultError> {
        check_name(name)?;
        self.store.read_vault()?;
        Ok(self.permissions_on(name)?.into_iter().collect())
    }

    fn wrap_key(
        &self,
        name: &str,
        version: Option<&str>,
        alg: WrapAlg,
        plaintext: &[u8],
    ) -> Result<crate::vault::Wrapped, VaultError> {
        let target = match version {
            Some(v) => kid(name, v),
            None => key_url(name),
        };
        self.audited("KeyWrap", target, |id| {
            check_name(name)?;
            self.require(Permission::WrapKey, name)?;
            self.store.read_vault()?;
            let rec = self.active_key(name)?;
            let v = Self::lookup_version(&rec, version)?;
            *id = kid(name, &v.version);
            usable(v, id, "wrapKey")?;
            // Key Vault: outside nbf/exp a key may still decrypt/unwrap, but not encrypt/wrap.
            self.check_current(v, id, "wrap")?;
            let value = rsa::wrap(&v.n, &v.e, alg, plaintext)?;
            Ok(crate::vault::Wrapped {
                kid: KeyId {
                    vault: URL.into(),
                    name: name.into(),
                    version: v.version.clone(),
                },
                alg,
                value,
            })
        })
    }

    fn unwrap_key(
        &self,
        key: &KeyId,
        alg: WrapAlg,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.audited("KeyUnwrap", key.to_string(), |id| {
            if key.vault != URL {
                return Err(VaultError::Invalid(format!(
                    "key id {id} belongs to vault {:?}, not {URL}",
                    key.vault
                )));
            }
            check_name(&key.name)?;
            self.require(Permission::UnwrapKey, &key.name)?;
            self.store.read_vault()?;
            // The key id comes from a volume header: a key that is not there any more was
            // purged, which is the owner's decision (deny), not a typo.
            let purged = || {
                denied(
                    DenyReason::KeyPurged,
                    format!("{id} (the key version no longer exists in vault {URL})"),
                )
            };
            let rec = match self.active_key(&key.name) {
                Err(VaultError::NotFound(_)) => {
                    // Not the same as purged: a name that differs from one of ours only in
                    // case was never a key here (key ids are matched exactly), so the id was
                    // typed or edited wrongly — say so instead of "purged".
                    let names = self.store.key_names()?;
                    if let Some(near) = names
                        .iter()
                        .find(|n| n.eq_ignore_ascii_case(&key.name) && **n != key.name)
                    {
                        return Err(VaultError::Invalid(format!(
                            "{id}: vault {URL} has no key {:?} (key names are matched exactly; \
                             it has {near:?}): the key id was changed, e.g. in an edited volume \
                             header",
                            key.name
                        )));
                    }
                    return Err(purged());
                }
                other => other?,
            };
            let v = rec.version(&key.version).ok_or_else(purged)?;
            usable(v, id, "unwrapKey")?;
            self.unwrap_with(key, id, alg, wrapped)
        })
    }
}

impl LocalVault {
    /// Unwraps with the latest version of key `name`, as Key Vault does for an unwrap whose
    /// key id has no version: it needs only the unwrapKey permission (resolving the version is
    /// part of the operation, not a `get`). Returns the version used.
    pub fn unwrap_key_latest(
        &self,
        name: &str,
        alg: WrapAlg,
        wrapped: &[u8],
    ) -> Result<(KeyId, Zeroizing<Vec<u8>>), VaultError> {
        self.audited("KeyUnwrap", key_url(name), |id| {
            check_name(name)?;
            self.require(Permission::UnwrapKey, name)?;
            self.store.read_vault()?;
            let rec = self.active_key(name)?;
            let v = rec.latest().ok_or_else(|| damaged(name))?;
            *id = kid(name, &v.version);
            usable(v, id, "unwrapKey")?;
            let key = KeyId {
                vault: URL.into(),
                name: name.into(),
                version: v.version.clone(),
            };
            let plain = self.unwrap_with(&key, id, alg, wrapped)?;
            Ok((key, plain))
        })
    }

    /// Reads and opens a version's private key (PKCS#8 DER).
    pub(super) fn private_key_of(
        &self,
        key: &KeyId,
        id: &str,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let stored = self
            .store
            .read_version_key(&key.name, &key.version)?
            .ok_or_else(|| {
                VaultError::Store(format!("the private key of {id} is missing from the store"))
            })?;
        self.open_private_key(&key.name, &key.version, stored)
    }

    /// Reads, opens and uses a version's private key.
    pub(super) fn unwrap_with(
        &self,
        key: &KeyId,
        id: &str,
        alg: WrapAlg,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let pkcs8 = self.private_key_of(key, id)?;
        rsa::unwrap(&pkcs8, alg, wrapped)?.map_err(|()| VaultError::UnwrapFailed {
            kid: id.to_string(),
        })
    }

    pub(super) fn describe(
        &self,
        name: &str,
        version: Option<&str>,
        id: &mut String,
    ) -> Result<KeyInfo, VaultError> {
        check_name(name)?;
        self.require(Permission::Get, name)?;
        let cfg = self.store.read_vault()?;
        let rec = self.active_key(name)?;
        let v = Self::lookup_version(&rec, version)?;
        *id = kid(name, &v.version);
        Ok(self.info(&cfg, &rec, v))
    }
}
