//! Identities (who asks the vault: a name and a bearer secret whose SHA-256 the vault keeps)
//! and their access policies (identity × key or `*` → permissions). Owner only.

use super::*;

impl LocalVault {
    /// Creates an identity and returns its credential (the only time the secret exists in
    /// the clear: the vault stores its SHA-256). Owner only.
    pub fn create_identity(&self, name: &str) -> Result<(IdentityInfo, Credential), VaultError> {
        self.audited("IdentityCreate", format!("{URL}/identities/{name}"), |_| {
            self.require_owner("creating identities")?;
            check_identity_name(name)?;
            // 32 random bytes: a bearer secret that cannot be guessed, so one SHA-256 suffices.
            let mut raw = Zeroizing::new([0u8; 32]);
            getrandom::getrandom(&mut *raw)
                .map_err(|e| VaultError::Store(format!("no randomness: {e}")))?;
            let secret = Zeroizing::new(URL_SAFE_NO_PAD.encode(*raw));
            self.mutate(|_| {
                if self.store.read_identity(name)?.is_some() {
                    return Err(VaultError::Conflict(format!(
                        "identity {name} already exists (delete it first to issue a new credential)"
                    )));
                }
                let rec = IdentityRecord {
                    format: store::FORMAT,
                    name: name.to_string(),
                    created: self.now(),
                    secret_sha256: hex::encode(sha256(secret.as_bytes())),
                    policies: Default::default(),
                };
                self.store.create_identity(&rec)?;
                Ok((
                    IdentityInfo {
                        name: rec.name.clone(),
                        created: rec.created,
                    },
                    Credential {
                        vault: URL.into(),
                        identity: rec.name,
                        secret: secret.clone(),
                        ca_cert: None,
                        azure: None,
                    },
                ))
            })
        })
    }

    /// Identities, sorted by name (owner only).
    pub fn list_identities(&self) -> Result<Vec<IdentityInfo>, VaultError> {
        self.audited("IdentityList", format!("{URL}/identities"), |_| {
            self.require_owner("listing identities")?;
            self.store.read_vault()?;
            let mut out = Vec::new();
            for name in self.store.identity_names()? {
                if let Some(rec) = self.store.read_identity(&name)? {
                    out.push(IdentityInfo {
                        name: rec.name,
                        created: rec.created,
                    });
                }
            }
            Ok(out)
        })
    }

    /// Deletes an identity and its policies: its credential stops working at once.
    pub fn delete_identity(&self, name: &str) -> Result<(), VaultError> {
        self.audited("IdentityDelete", format!("{URL}/identities/{name}"), |_| {
            self.require_owner("deleting identities")?;
            check_identity_name(name)?;
            self.mutate(|_| {
                self.identity_record(name)?;
                self.store.remove_identity(name)
            })
        })
    }

    fn identity_record(&self, name: &str) -> Result<IdentityRecord, VaultError> {
        self.store.read_identity(name)?.ok_or_else(|| {
            VaultError::NotFound(format!(
                "identity {name} does not exist in vault {URL} (see `cmkfs vault identity list`)"
            ))
        })
    }

    /// Sets (replaces) the permissions of `identity` on `scope`; an empty list removes the
    /// policy. A named key must exist (active or soft-deleted). Owner only.
    pub fn set_policy(
        &self,
        identity: &str,
        scope: &PolicyScope,
        perms: &[Permission],
    ) -> Result<AccessPolicy, VaultError> {
        self.audited("AccessPolicySet", format!("{URL}/identities/{identity}"), |_| {
            self.require_owner("changing access policies")?;
            check_identity_name(identity)?;
            if let PolicyScope::Key(k) = scope {
                check_name(k)?;
            }
            self.mutate(|_| {
                let mut rec = self.identity_record(identity)?;
                if let PolicyScope::Key(k) = scope {
                    if self.store.read_key(k)?.is_none() {
                        return Err(VaultError::NotFound(format!(
                            "key {k} does not exist in vault {URL} (use --all-keys for a policy on every key)"
                        )));
                    }
                }
                let set: BTreeSet<Permission> = perms.iter().copied().collect();
                if set.is_empty() {
                    rec.policies.remove(scope.as_str());
                } else {
                    rec.policies.insert(scope.as_str().to_string(), set.clone());
                }
                self.store.write_identity(&rec)?;
                Ok(AccessPolicy {
                    identity: identity.to_string(),
                    key: scope.as_str().to_string(),
                    permissions: set.into_iter().collect(),
                })
            })
        })
    }

    /// Removes the policy of `identity` on `scope`. Owner only.
    pub fn remove_policy(&self, identity: &str, scope: &PolicyScope) -> Result<(), VaultError> {
        self.audited(
            "AccessPolicyRemove",
            format!("{URL}/identities/{identity}"),
            |_| {
                self.require_owner("changing access policies")?;
                check_identity_name(identity)?;
                self.mutate(|_| {
                    let mut rec = self.identity_record(identity)?;
                    if rec.policies.remove(scope.as_str()).is_none() {
                        return Err(VaultError::NotFound(format!(
                            "identity {identity} has no access policy on {}",
                            match scope {
                                PolicyScope::AllKeys => "all keys".to_string(),
                                PolicyScope::Key(k) => format!("key {k}"),
                            }
                        )));
                    }
                    self.store.write_identity(&rec)
                })
            },
        )
    }

    /// Access policies, of one identity or all, sorted by identity then key. Owner only.
    pub fn list_policies(&self, identity: Option<&str>) -> Result<Vec<AccessPolicy>, VaultError> {
        self.audited("AccessPolicyList", format!("{URL}/identities"), |_| {
            self.require_owner("listing access policies")?;
            self.store.read_vault()?;
            let names = match identity {
                Some(n) => {
                    check_identity_name(n)?;
                    self.identity_record(n)?;
                    vec![n.to_string()]
                }
                None => self.store.identity_names()?,
            };
            let mut out = Vec::new();
            for name in names {
                let Some(rec) = self.store.read_identity(&name)? else {
                    continue;
                };
                for (key, perms) in &rec.policies {
                    out.push(AccessPolicy {
                        identity: rec.name.clone(),
                        key: key.clone(),
                        permissions: perms.iter().copied().collect(),
                    });
                }
            }
            Ok(out)
        })
    }
}
