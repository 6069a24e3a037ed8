//! Vault-wide settings: soft-delete retention, purge protection, audit log rotation.

use super::*;

impl LocalVault {
    /// Current settings.
    pub fn config(&self) -> Result<VaultProperties, VaultError> {
        self.audited("VaultGet", URL.into(), |_| self.props())
    }

    pub(super) fn props(&self) -> Result<VaultProperties, VaultError> {
        self.authenticate()?;
        let cfg = self.store.read_vault()?;
        Ok(VaultProperties {
            url: URL.into(),
            soft_delete: true,
            retention_days: cfg.retention_days,
            purge_protection: cfg.purge_protection,
        })
    }

    /// The audit log's rotation settings: (size limit in bytes, rotated files kept).
    pub fn audit_rotation(&self) -> Result<(u64, u32), VaultError> {
        let cfg = self.store.read_vault()?;
        Ok((cfg.audit_max_bytes, cfg.audit_keep))
    }

    /// Changes settings (owner only). Retention must be 7-90 days; purge protection can be
    /// turned on, never off; while it is on, retention can grow but not shrink (shrinking
    /// would shorten the protection of keys deleted later).
    pub fn configure(&self, upd: &ConfigUpdate) -> Result<VaultProperties, VaultError> {
        self.audited("VaultPatch", URL.into(), |_| {
            self.require_owner("changing vault settings")?;
            if let Some(d) = upd.retention_days {
                if !(MIN_RETENTION_DAYS..=MAX_RETENTION_DAYS).contains(&d) {
                    return Err(VaultError::Invalid(format!(
                        "retention of {d} days is out of range: use {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS} days"
                    )));
                }
            }
            if upd.audit_max_bytes.is_some_and(|b| b != 0 && b < 4096) {
                return Err(VaultError::Invalid(
                    "the audit log size limit must be 0 (never rotate) or at least 4096 bytes".into(),
                ));
            }
            if upd.audit_keep.is_some_and(|k| !(1..=1000).contains(&k)) {
                return Err(VaultError::Invalid(
                    "keep 1 to 1000 rotated audit logs".into(),
                ));
            }
            self.mutate(|cfg| {
                let mut new = cfg.clone();
                if let Some(b) = upd.audit_max_bytes {
                    new.audit_max_bytes = b;
                }
                if let Some(k) = upd.audit_keep {
                    new.audit_keep = k;
                }
                if upd.purge_protection == Some(false) && cfg.purge_protection {
                    return Err(VaultError::Conflict(
                        "purge protection is on and can never be turned off".into(),
                    ));
                }
                if upd.purge_protection == Some(true) {
                    new.purge_protection = true;
                }
                if let Some(d) = upd.retention_days {
                    if cfg.purge_protection && d < cfg.retention_days {
                        return Err(VaultError::Conflict(format!(
                            "purge protection is on: retention can grow but not shrink below {} days",
                            cfg.retention_days
                        )));
                    }
                    new.retention_days = d;
                }
                self.store.write_vault(&new)?;
                Ok(())
            })?;
            self.props()
        })
    }
}
