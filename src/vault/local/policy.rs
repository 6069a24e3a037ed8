//! Key rotation policies, which the vault *applies*: a `Rotate` lifetime action makes a new
//! key version on schedule (`timeAfterCreate` of the latest version, or `timeBeforeExpiry` of
//! its expiry), `expiryTime` gives every new version an expiry, and a `Notify` action records
//! one `KeyNearExpiry` audit event per version (Key Vault publishes it to Event Grid; cmkfs
//! has the audit log). Shapes and rules follow Key Vault's `KeyRotationPolicy`
//! (api-version 7.3 and later).
//!
//! Who applies them: a vault server on its own timer, and the embedded vault whenever a
//! long-running process checks its key (a mount's monitor) or `cmkfs vault key rotate-due`
//! runs. Policy rotations are audited as `KeyRotate` by the caller `(rotation policy)`.
//!
//! Durations are ISO 8601 (`P90D`, `P3M`, `PT48H`, `P1Y10D`); a year counts 365 days and a
//! month 30. Key Vault's limits apply: rotation at least 7 days after creation or before
//! expiry, `expiryTime` at least 28 days. `CMKFS_VAULT_POLICY_LIMITS=test` lowers every limit
//! to one second, for test suites only.

use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::audit::AuditEvent;
use super::store::{KeyRecord, LifetimeActionRecord, RotationPolicyRecord};
use super::{check_name, damaged, key_url, kid, rsa, CreateMode, LocalVault};
use crate::vault::{KeyInfo, Permission, VaultError};

const DAY: u64 = 86_400;

/// The audit log's caller for what the vault does by itself on a policy's schedule.
pub const POLICY_CALLER: &str = "(rotation policy)";

/// A lifetime action's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyAction {
    /// Make a new key version.
    Rotate,
    /// Record a near-expiry notice.
    Notify,
}

impl PolicyAction {
    /// Key Vault's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Rotate => "Rotate",
            PolicyAction::Notify => "Notify",
        }
    }

    /// Case-insensitive, as the service compares it.
    pub fn parse(s: &str) -> Result<PolicyAction, VaultError> {
        if s.eq_ignore_ascii_case("rotate") {
            Ok(PolicyAction::Rotate)
        } else if s.eq_ignore_ascii_case("notify") {
            Ok(PolicyAction::Notify)
        } else {
            Err(VaultError::Invalid(format!(
                "unknown lifetime action {s:?} (expected Rotate or Notify)"
            )))
        }
    }
}

/// One lifetime action and its trigger (exactly one of the two durations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifetimeAction {
    /// What to do.
    pub action: PolicyAction,
    /// ISO 8601 duration after the latest version's creation.
    pub time_after_create: Option<String>,
    /// ISO 8601 duration before the latest version's expiry.
    pub time_before_expiry: Option<String>,
}

/// A key's rotation policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Lifetime actions (at most one `Rotate` and one `Notify`).
    pub actions: Vec<LifetimeAction>,
    /// ISO 8601 expiry given to each new version.
    pub expiry_time: Option<String>,
    /// Unix seconds; `None` for the default policy of a key that never had one set.
    pub created: Option<u64>,
    /// Unix seconds.
    pub updated: Option<u64>,
}

impl RotationPolicy {
    /// What a key without a policy reports, as Key Vault does: notify 30 days before expiry.
    pub fn default_policy() -> RotationPolicy {
        RotationPolicy {
            actions: vec![LifetimeAction {
                action: PolicyAction::Notify,
                time_after_create: None,
                time_before_expiry: Some("P30D".into()),
            }],
            ..Default::default()
        }
    }

    fn from_record(r: &RotationPolicyRecord) -> RotationPolicy {
        RotationPolicy {
            actions: r
                .actions
                .iter()
                .filter_map(|a| {
                    Some(LifetimeAction {
                        action: PolicyAction::parse(&a.action).ok()?,
                        time_after_create: a.time_after_create.clone(),
                        time_before_expiry: a.time_before_expiry.clone(),
                    })
                })
                .collect(),
            expiry_time: r.expiry_time.clone(),
            created: Some(r.created),
            updated: Some(r.updated),
        }
    }
}

/// Smallest durations a policy may use, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyLimits {
    /// `timeAfterCreate` and `timeBeforeExpiry` of a rotation; also the gap a rotation must
    /// leave before the version's expiry.
    pub min_rotation: u64,
    /// `timeBeforeExpiry` of a notice.
    pub min_notice: u64,
    /// `expiryTime`.
    pub min_expiry: u64,
}

impl PolicyLimits {
    /// Key Vault's limits.
    pub const SERVICE: PolicyLimits = PolicyLimits {
        min_rotation: 7 * DAY,
        min_notice: 7 * DAY,
        min_expiry: 28 * DAY,
    };
    /// One second each (`CMKFS_VAULT_POLICY_LIMITS=test`).
    pub const TEST: PolicyLimits = PolicyLimits {
        min_rotation: 1,
        min_notice: 1,
        min_expiry: 1,
    };

    /// The limits in force in this process.
    pub fn current() -> PolicyLimits {
        match std::env::var("CMKFS_VAULT_POLICY_LIMITS").as_deref() {
            Ok("test") => PolicyLimits::TEST,
            _ => PolicyLimits::SERVICE,
        }
    }
}

/// Parses an ISO 8601 duration (`PnYnMnWnDTnHnMnS`, integer fields) into seconds.
pub fn parse_duration(s: &str) -> Result<u64, VaultError> {
    let bad = || {
        VaultError::Invalid(format!(
            "{s:?} is not an ISO 8601 duration (examples: P90D, P3M, PT48H, P1Y10D)"
        ))
    };
    let rest = s.strip_prefix('P').ok_or_else(bad)?;
    let mut total: u64 = 0;
    let mut in_time = false;
    let mut num = String::new();
    let mut any = false;
    let mut time_fields = 0usize;
    for c in rest.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        if c == 'T' {
            if in_time || !num.is_empty() {
                return Err(bad());
            }
            in_time = true;
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match (in_time, c) {
            (false, 'Y') => 365 * DAY,
            (false, 'M') => 30 * DAY,
            (false, 'W') => 7 * DAY,
            (false, 'D') => DAY,
            (true, 'H') => 3600,
            (true, 'M') => 60,
            (true, 'S') => 1,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        any = true;
        time_fields += usize::from(in_time);
    }
    if !num.is_empty() || !any || (in_time && time_fields == 0) {
        return Err(bad());
    }
    Ok(total)
}

fn duration_at_least(s: &str, min: u64, what: &str) -> Result<u64, VaultError> {
    let d = parse_duration(s)?;
    if d < min {
        return Err(VaultError::Invalid(format!(
            "{what} {s} is too short: it must be at least {}",
            humantime::format_duration(std::time::Duration::from_secs(min))
        )));
    }
    Ok(d)
}

/// Checks a policy against Key Vault's rules (see the module docs).
pub fn validate(p: &RotationPolicy, limits: PolicyLimits) -> Result<(), VaultError> {
    let expiry = match &p.expiry_time {
        Some(e) => Some(duration_at_least(e, limits.min_expiry, "expiryTime")?),
        None => None,
    };
    let mut seen = Vec::new();
    for a in &p.actions {
        if seen.contains(&a.action) {
            return Err(VaultError::Invalid(format!(
                "the policy has two {} actions: at most one Rotate and one Notify",
                a.action.as_str()
            )));
        }
        seen.push(a.action);
        let (after, before) = (&a.time_after_create, &a.time_before_expiry);
        match (after, before) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(VaultError::Invalid(format!(
                    "the {} action needs exactly one trigger: timeAfterCreate or timeBeforeExpiry",
                    a.action.as_str()
                )))
            }
            _ => {}
        }
        if a.action == PolicyAction::Notify && after.is_some() {
            return Err(VaultError::Invalid(
                "a Notify action is triggered by timeBeforeExpiry only".into(),
            ));
        }
        let min = match a.action {
            PolicyAction::Rotate => limits.min_rotation,
            PolicyAction::Notify => limits.min_notice,
        };
        if let Some(t) = after {
            let t = duration_at_least(t, min, "timeAfterCreate")?;
            if let Some(e) = expiry {
                if t.saturating_add(limits.min_rotation) > e {
                    return Err(VaultError::Invalid(format!(
                        "timeAfterCreate must leave at least {} before expiryTime",
                        humantime::format_duration(std::time::Duration::from_secs(
                            limits.min_rotation
                        ))
                    )));
                }
            }
        }
        if let Some(t) = before {
            let t = duration_at_least(t, min, "timeBeforeExpiry")?;
            if expiry.is_some_and(|e| t >= e) {
                return Err(VaultError::Invalid(
                    "timeBeforeExpiry must be shorter than expiryTime".into(),
                ));
            }
        }
    }
    Ok(())
}

/// The expiry of a version created now (`created`) under the key's policy, if any.
pub(super) fn new_version_expiry(
    rec: &KeyRecord,
    created: u64,
    limits: PolicyLimits,
) -> Result<Option<u64>, VaultError> {
    match rec
        .rotation_policy
        .as_ref()
        .and_then(|p| p.expiry_time.as_ref())
    {
        // Checked when the policy was set; limits may have changed since (test setting), so
        // only the syntax is re-checked here.
        Some(e) => {
            let _ = limits;
            Ok(Some(created.saturating_add(parse_duration(e)?)))
        }
        None => Ok(None),
    }
}

/// What is due for a key now.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Rotate { latest: String },
    Notify { latest: String, exp: u64 },
}

fn due(rec: &KeyRecord, now: u64) -> Result<Vec<Due>, VaultError> {
    let (Some(p), None) = (&rec.rotation_policy, &rec.deleted) else {
        return Ok(Vec::new());
    };
    let latest = rec.latest().ok_or_else(|| damaged(&rec.name))?;
    let mut out = Vec::new();
    for a in &p.actions {
        let Ok(action) = PolicyAction::parse(&a.action) else {
            continue;
        };
        let at = match (&a.time_after_create, &a.time_before_expiry, latest.exp) {
            (Some(t), _, _) => Some(latest.created.saturating_add(parse_duration(t)?)),
            (None, Some(t), Some(exp)) => Some(exp.saturating_sub(parse_duration(t)?)),
            _ => None,
        };
        if at.is_none_or(|at| now < at) {
            continue;
        }
        out.push(match action {
            PolicyAction::Rotate => Due::Rotate {
                latest: latest.version.clone(),
            },
            PolicyAction::Notify => {
                if rec.near_expiry_notified.as_deref() == Some(latest.version.as_str()) {
                    continue;
                }
                Due::Notify {
                    latest: latest.version.clone(),
                    exp: latest.exp.unwrap_or(0),
                }
            }
        });
    }
    Ok(out)
}

fn to_record(p: &RotationPolicy, created: u64, now: u64) -> RotationPolicyRecord {
    RotationPolicyRecord {
        created,
        updated: now,
        expiry_time: p.expiry_time.clone(),
        actions: p
            .actions
            .iter()
            .map(|a| LifetimeActionRecord {
                action: a.action.as_str().into(),
                time_after_create: a.time_after_create.clone(),
                time_before_expiry: a.time_before_expiry.clone(),
            })
            .collect(),
    }
}

impl LocalVault {
    /// The rotation limits of this connection.
    pub(super) fn limits(&self) -> PolicyLimits {
        PolicyLimits::current()
    }

    /// A key's rotation policy (Key Vault's default one when none was set). Needs the
    /// `getrotationpolicy` permission.
    pub fn get_rotation_policy(&self, name: &str) -> Result<RotationPolicy, VaultError> {
        self.audited(
            "KeyRotationPolicyGet",
            format!("{}/rotationpolicy", key_url(name)),
            |_| {
                check_name(name)?;
                self.require(Permission::GetRotationPolicy, name)?;
                self.store.read_vault()?;
                let rec = self.active_key(name)?;
                Ok(rec
                    .rotation_policy
                    .as_ref()
                    .map_or_else(RotationPolicy::default_policy, RotationPolicy::from_record))
            },
        )
    }

    /// Replaces a key's rotation policy (needs `setrotationpolicy`); it applies from the next
    /// check on. Invalid policies are refused whole.
    pub fn set_rotation_policy(
        &self,
        name: &str,
        policy: &RotationPolicy,
    ) -> Result<RotationPolicy, VaultError> {
        self.audited(
            "KeyRotationPolicyUpdate",
            format!("{}/rotationpolicy", key_url(name)),
            |_| {
                check_name(name)?;
                validate(policy, self.limits())?;
                self.require(Permission::SetRotationPolicy, name)?;
                self.mutate(|_| {
                    let mut rec = self.active_key(name)?;
                    let now = self.now();
                    let created = rec.rotation_policy.as_ref().map_or(now, |p| p.created);
                    let new = to_record(policy, created, now);
                    rec.rotation_policy = Some(new.clone());
                    self.store.write_key(&rec)?;
                    Ok(RotationPolicy::from_record(&new))
                })
            },
        )
    }

    /// Applies every due rotation policy action (see the module docs); returns the versions
    /// created. Any authenticated connection may ask: the vault acts on its own schedule, not
    /// with the caller's permissions. Failures of one key do not stop the others; the first
    /// is returned after all were tried.
    pub fn apply_rotation_policies(&self) -> Result<Vec<KeyInfo>, VaultError> {
        self.authenticate()?;
        self.store.read_vault()?;
        let now = self.now();
        let mut made = Vec::new();
        let mut first_err = None;
        for name in self.store.key_names()? {
            let Ok(Some(rec)) = self.store.read_key(&name) else {
                continue;
            };
            let todo = match due(&rec, now) {
                Ok(t) => t,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            for d in todo {
                let r = match d {
                    Due::Rotate { latest } => {
                        self.policy_rotate(&rec, &latest).map(|k| made.extend(k))
                    }
                    Due::Notify { latest, exp } => self.policy_notify(&name, &latest, exp),
                };
                if let Err(e) = r {
                    tracing::warn!(key = %name, error = %e, "rotation policy action failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if made.is_empty() => Err(e),
            _ => Ok(made),
        }
    }

    fn policy_audit(
        &self,
        op: &str,
        id: &str,
        started: SystemTime,
        t0: Instant,
        r: Result<&str, &VaultError>,
    ) {
        let mut ev = AuditEvent::new(op, POLICY_CALLER, id, started, t0.elapsed(), r.err());
        if let Ok(desc) = r {
            ev.result_description = desc.to_string();
        }
        self.write_audit(&ev);
    }

    /// Rotates `rec` unless someone else already did (its latest version is no longer
    /// `latest`): `None` then.
    fn policy_rotate(&self, rec: &KeyRecord, latest: &str) -> Result<Option<KeyInfo>, VaultError> {
        let started = SystemTime::now();
        let t0 = Instant::now();
        let size = rec.latest().ok_or_else(|| damaged(&rec.name))?.key_size;
        let m = rsa::generate(size)?;
        let r = self.add_version_if_latest(&rec.name, &m, latest);
        match &r {
            Ok(Some(info)) => self.policy_audit(
                "KeyRotate",
                &info.kid,
                started,
                t0,
                Ok("rotated by the key's rotation policy"),
            ),
            Ok(None) => {}
            Err(e) => self.policy_audit("KeyRotate", &key_url(&rec.name), started, t0, Err(e)),
        }
        r
    }

    fn add_version_if_latest(
        &self,
        name: &str,
        m: &rsa::Material,
        latest: &str,
    ) -> Result<Option<KeyInfo>, VaultError> {
        match self.add_version_checked(name, m, false, None, CreateMode::Rotate, Some(latest)) {
            Ok(k) => Ok(Some(k)),
            Err(VaultError::Conflict(m)) if m == super::ALREADY_ROTATED => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn policy_notify(&self, name: &str, latest: &str, exp: u64) -> Result<(), VaultError> {
        let started = SystemTime::now();
        let t0 = Instant::now();
        let noted = self.mutate(|_| {
            let Some(mut rec) = self.store.read_key(name)? else {
                return Ok(false);
            };
            if rec.near_expiry_notified.as_deref() == Some(latest)
                || rec.latest().map(|v| v.version.as_str()) != Some(latest)
            {
                return Ok(false);
            }
            rec.near_expiry_notified = Some(latest.to_string());
            self.store.write_key(&rec)?;
            Ok(true)
        })?;
        if noted {
            let desc = format!(
                "key version expires at {} (rotation policy notice)",
                super::fmt_time(exp)
            );
            self.policy_audit("KeyNearExpiry", &kid(name, latest), started, t0, Ok(&desc));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("P90D").unwrap(), 90 * DAY);
        assert_eq!(parse_duration("P3M").unwrap(), 90 * DAY);
        assert_eq!(parse_duration("PT48H").unwrap(), 48 * 3600);
        assert_eq!(parse_duration("P1Y10D").unwrap(), 375 * DAY);
        assert_eq!(parse_duration("PT1M30S").unwrap(), 90);
        assert_eq!(parse_duration("P1W").unwrap(), 7 * DAY);
        for bad in [
            "", "P", "PT", "90D", "P1H", "PT1D", "P1.5D", "P1DT", "P-1D", "PxD",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    fn act(a: PolicyAction, after: Option<&str>, before: Option<&str>) -> LifetimeAction {
        LifetimeAction {
            action: a,
            time_after_create: after.map(str::to_string),
            time_before_expiry: before.map(str::to_string),
        }
    }

    #[test]
    fn service_rules() {
        let l = PolicyLimits::SERVICE;
        let ok = RotationPolicy {
            actions: vec![
                act(PolicyAction::Rotate, Some("P30D"), None),
                act(PolicyAction::Notify, None, Some("P7D")),
            ],
            expiry_time: Some("P90D".into()),
            ..Default::default()
        };
        validate(&ok, l).unwrap();
        let mut p = ok.clone();
        p.actions[0] = act(PolicyAction::Rotate, Some("P6D"), None);
        assert!(validate(&p, l).is_err(), "rotation under 7 days");
        let mut p = ok.clone();
        p.expiry_time = Some("P27D".into());
        assert!(validate(&p, l).is_err(), "expiry under 28 days");
        let mut p = ok.clone();
        p.actions[0] = act(PolicyAction::Rotate, Some("P85D"), None);
        assert!(validate(&p, l).is_err(), "rotation too close to expiry");
        let mut p = ok.clone();
        p.actions[1] = act(PolicyAction::Notify, Some("P10D"), None);
        assert!(validate(&p, l).is_err(), "notify after create");
        let mut p = ok.clone();
        p.actions
            .push(act(PolicyAction::Rotate, Some("P10D"), None));
        assert!(validate(&p, l).is_err(), "two rotations");
        let mut p = ok;
        p.actions[0] = act(PolicyAction::Rotate, Some("P10D"), Some("P10D"));
        assert!(validate(&p, l).is_err(), "two triggers");
        validate(
            &RotationPolicy {
                actions: vec![act(PolicyAction::Rotate, Some("PT1S"), None)],
                ..Default::default()
            },
            PolicyLimits::TEST,
        )
        .unwrap();
    }
}
