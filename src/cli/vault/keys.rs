//! `cmkfs vault key ...`: the KEK lifecycle on every backend (create, import, rotate, update,
//! enable/disable, delete, recover, purge, rotation policies) and how keys are printed.

use super::*;

#[derive(Subcommand, Debug)]
pub(super) enum KeyCommand {
    /// Create a key (RSA, its first version).
    Create {
        /// Key name: 1-127 letters, digits and dashes.
        name: String,
        /// RSA modulus size: 2048, 3072 or 4096.
        #[arg(long, default_value_t = 3072, value_name = "BITS")]
        key_size: u32,
        /// Default wrap algorithm recorded for the key.
        #[arg(long, value_enum, default_value_t = AlgArg::RsaOaep256)]
        alg: AlgArg,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import an RSA private key (PKCS#8 PEM/DER, or PKCS#1 PEM) as a new version.
    Import {
        /// Key name (created when absent).
        name: String,
        /// The private key file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Wrap algorithm of a new key (default RSA-OAEP-256); an existing key keeps its own.
        #[arg(long, value_enum)]
        alg: Option<AlgArg>,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (their latest versions).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one version (the latest by default), disabled ones included.
    #[command(disable_version_flag = true)]
    Show {
        /// Key name.
        name: String,
        /// Version id (32 hex digits).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Print JSON (with the full versioned `kid`).
        #[arg(long)]
        json: bool,
    },
    /// List every version of a key, oldest first.
    Versions {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a new version with the same size and operations.
    Rotate {
        /// Key name.
        name: String,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply every due rotation policy now (new versions, near-expiry notices); a vault
    /// server and mounts of the embedded vault also do it on their own.
    RotateDue {
        /// Print the new versions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or set a key's rotation policy (ISO 8601 durations: P90D, P3M, PT48H).
    RotationPolicy {
        /// Key name.
        name: String,
        /// Rotate this long after the latest version was created.
        #[arg(long, value_name = "DURATION", conflicts_with = "rotate_before_expiry")]
        rotate_after_create: Option<String>,
        /// Rotate this long before the latest version expires.
        #[arg(long, value_name = "DURATION")]
        rotate_before_expiry: Option<String>,
        /// Record a near-expiry notice this long before the latest version expires.
        #[arg(long, value_name = "DURATION")]
        notify_before_expiry: Option<String>,
        /// Expiry given to every new version.
        #[arg(long, value_name = "DURATION")]
        expiry: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable a key: every version (or only `--version V`), so that every volume wrapped by
    /// it is cut off, whichever version wraps its DEK. Prints the versions it disabled.
    #[command(disable_version_flag = true)]
    Disable {
        /// Key name.
        name: String,
        /// Disable only this version (32 hex digits), as Key Vault's API does.
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Print the versions changed as JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Enable a key: every version (or only `--version V`); the counterpart of `disable`.
    #[command(disable_version_flag = true)]
    Enable {
        /// Key name.
        name: String,
        /// Enable only this version (32 hex digits).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Print the versions changed as JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Change a version's attributes (`--enable`/`--disable` without `--version`: every
    /// version, as `key enable`/`key disable`).
    #[command(disable_version_flag = true, group(ArgGroup::new("change").required(true).multiple(true)
        .args(["enable", "disable", "nbf", "exp", "key_ops"])))]
    Update {
        /// Key name.
        name: String,
        /// Version id (the latest by default; for --enable/--disable, every version by
        /// default).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Enable the version (every version without --version).
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Disable the version (every version without --version): every operation with it
        /// is refused.
        #[arg(long)]
        disable: bool,
        /// Not-before: RFC 3339 time, `now`, `+DURATION`, `-DURATION`, `@UNIXSECS` or `none`.
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        nbf: Option<String>,
        /// Expiry, same forms as --nbf.
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        exp: Option<String>,
        /// Permitted operations, comma-separated (wrapKey,unwrapKey,...).
        #[arg(long, value_name = "OPS", value_delimiter = ',')]
        key_ops: Option<Vec<String>>,
        /// Print the updated version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Soft-delete a key: recoverable until the retention period ends.
    Delete {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List soft-deleted keys.
    ListDeleted {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a soft-deleted key.
    ShowDeleted {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Undo a soft delete.
    Recover {
        /// Key name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a soft-deleted key for good (refused under purge protection until the
    /// retention period has passed).
    Purge {
        /// Key name.
        name: String,
    },
}

impl KeyCommand {
    /// Whether this adds a key (`create`, `import`): the only key commands that may create
    /// the embedded vault on first use.
    pub(super) fn adds_a_key(&self) -> bool {
        matches!(self, KeyCommand::Create { .. } | KeyCommand::Import { .. })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum AlgArg {
    /// RSA-OAEP with SHA-256.
    #[value(name = "RSA-OAEP-256")]
    RsaOaep256,
    /// RSA-OAEP with SHA-1 (for HSMs without SHA-2 OAEP).
    #[value(name = "RSA-OAEP")]
    RsaOaep,
}

impl From<AlgArg> for WrapAlg {
    fn from(a: AlgArg) -> WrapAlg {
        match a {
            AlgArg::RsaOaep256 => WrapAlg::RsaOaep256,
            AlgArg::RsaOaep => WrapAlg::RsaOaep,
        }
    }
}

pub(super) fn key(v: &dyn Vault, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create {
            name,
            key_size,
            alg,
            json,
        } => {
            let opts = CreateKeyOptions {
                key_size,
                wrap_alg: alg.into(),
            };
            let info = with_progress("generating the RSA key", || v.create_key(&name, &opts))?;
            print_key(&info, json, "created")
        }
        KeyCommand::Import {
            name,
            file,
            alg,
            json,
        } => {
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?,
            );
            let der = crate::vault::local::read_private_key(&bytes)
                .with_context(|| format!("cannot import {}", file.display()))?;
            let info = v.import_key(
                &name,
                &der,
                &ImportKeyOptions {
                    wrap_alg: alg.map(Into::into),
                },
            )?;
            print_key(&info, json, "imported")
        }
        KeyCommand::List { json } => {
            let keys = v.list_keys()?;
            if json {
                return print_json(&keys);
            }
            if keys.is_empty() {
                println!("no keys (create one with `cmkfs vault key create NAME`)");
                return Ok(());
            }
            print_table(
                &[
                    "NAME",
                    "LATEST VERSION",
                    "SIZE",
                    "ENABLED",
                    "EXPIRES",
                    "UPDATED",
                ],
                keys.iter().map(|k| {
                    vec![
                        k.name.clone(),
                        k.version.clone(),
                        k.key_size.to_string(),
                        yes_no(k.enabled).into(),
                        opt_time(k.exp),
                        time(k.updated),
                    ]
                }),
            );
            Ok(())
        }
        KeyCommand::Show {
            name,
            version,
            json,
        } => {
            let info = v.describe_key(&name, version.as_deref())?;
            print_key(&info, json, "")
        }
        KeyCommand::Versions { name, json } => {
            let versions = v.list_key_versions(&name)?;
            if json {
                return print_json(&versions);
            }
            print_table(
                &[
                    "VERSION",
                    "SIZE",
                    "ENABLED",
                    "NOT BEFORE",
                    "EXPIRES",
                    "CREATED",
                ],
                versions.iter().map(|k| {
                    vec![
                        k.version.clone(),
                        k.key_size.to_string(),
                        yes_no(k.enabled).into(),
                        opt_time(k.nbf),
                        opt_time(k.exp),
                        time(k.created),
                    ]
                }),
            );
            Ok(())
        }
        KeyCommand::Rotate { name, json } => {
            let info = with_progress("generating the new RSA key version", || v.rotate_key(&name))?;
            print_key(&info, json, "rotated")
        }
        KeyCommand::RotateDue { json } => {
            let made = with_progress("applying due rotation policies", || v.apply_due_rotations())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&made)?);
            } else if made.is_empty() {
                println!("no rotation was due");
            } else {
                for k in &made {
                    println!("rotated by policy: {}", k.kid);
                }
            }
            Ok(())
        }
        KeyCommand::RotationPolicy {
            name,
            rotate_after_create,
            rotate_before_expiry,
            notify_before_expiry,
            expiry,
            json,
        } => {
            use crate::vault::local::policy::{LifetimeAction, PolicyAction, RotationPolicy};
            let setting = rotate_after_create.is_some()
                || rotate_before_expiry.is_some()
                || notify_before_expiry.is_some()
                || expiry.is_some();
            let p = if setting {
                let mut actions = Vec::new();
                if rotate_after_create.is_some() || rotate_before_expiry.is_some() {
                    actions.push(LifetimeAction {
                        action: PolicyAction::Rotate,
                        time_after_create: rotate_after_create,
                        time_before_expiry: rotate_before_expiry,
                    });
                }
                if let Some(t) = notify_before_expiry {
                    actions.push(LifetimeAction {
                        action: PolicyAction::Notify,
                        time_after_create: None,
                        time_before_expiry: Some(t),
                    });
                }
                v.set_rotation_policy(
                    &name,
                    &RotationPolicy {
                        actions,
                        expiry_time: expiry,
                        ..Default::default()
                    },
                )?
            } else {
                v.rotation_policy(&name)?
            };
            print_policy(&name, &p, json)
        }
        KeyCommand::Update {
            name,
            version,
            enable,
            disable,
            nbf,
            exp,
            key_ops,
            json,
        } => {
            let enabled = if enable {
                Some(true)
            } else if disable {
                Some(false)
            } else {
                None
            };
            // Without --version, enabling or disabling is for the key as a whole: a volume
            // wrapped by an older version must be cut off too (revocation).
            let mut changed = Vec::new();
            if let (Some(e), None) = (enabled, &version) {
                changed = set_enabled(v, &name, None, e)?;
            }
            let upd = KeyUpdate {
                enabled: if version.is_some() { enabled } else { None },
                nbf: nbf
                    .as_deref()
                    .map(|t| parse_time(t).context("--nbf"))
                    .transpose()?,
                exp: exp
                    .as_deref()
                    .map(|t| parse_time(t).context("--exp"))
                    .transpose()?,
                key_ops: key_ops.map(|ops| ops.into_iter().map(|o| o.trim().to_string()).collect()),
                tags: None,
            };
            let info = if upd == KeyUpdate::default() {
                // The latest version as it is now (`get` would refuse a disabled one).
                v.list_key_versions(&name)?
                    .into_iter()
                    .max_by_key(|k| k.created)
                    .with_context(|| format!("key {name} has no versions"))?
            } else {
                v.update_key(&name, version.as_deref(), &upd)?
            };
            if !json {
                print_enabled_changes(&changed, enabled.unwrap_or(true));
            }
            print_key(&info, json, "updated")
        }
        KeyCommand::Disable {
            name,
            version,
            json,
        } => {
            let changed = set_enabled(v, &name, version.as_deref(), false)?;
            if json {
                return print_json(&changed);
            }
            print_enabled_changes(&changed, false);
            Ok(())
        }
        KeyCommand::Enable {
            name,
            version,
            json,
        } => {
            let changed = set_enabled(v, &name, version.as_deref(), true)?;
            if json {
                return print_json(&changed);
            }
            print_enabled_changes(&changed, true);
            Ok(())
        }
        KeyCommand::Delete { name, json } => {
            let d = v.delete_key(&name)?;
            if json {
                return print_json(&d);
            }
            println!(
                "deleted key {name}: recoverable until {} (`cmkfs vault key recover {name}`)",
                time(d.scheduled_purge_date)
            );
            Ok(())
        }
        KeyCommand::ListDeleted { json } => {
            let keys = v.list_deleted_keys()?;
            if json {
                return print_json(&keys);
            }
            if keys.is_empty() {
                println!("no deleted keys");
                return Ok(());
            }
            print_table(
                &["NAME", "DELETED", "SCHEDULED PURGE", "RECOVERY ID"],
                keys.iter().map(|d| {
                    vec![
                        d.key.name.clone(),
                        time(d.deleted_date),
                        time(d.scheduled_purge_date),
                        d.recovery_id.clone(),
                    ]
                }),
            );
            Ok(())
        }
        KeyCommand::ShowDeleted { name, json } => {
            let d = v.get_deleted_key(&name)?;
            print_deleted(&d, json)
        }
        KeyCommand::Recover { name, json } => {
            let info = v.recover_deleted_key(&name)?;
            print_key(&info, json, "recovered")
        }
        KeyCommand::Purge { name } => {
            v.purge_deleted_key(&name)?;
            println!("purged key {name}: its versions are gone for good");
            Ok(())
        }
    }
}

fn print_policy(
    name: &str,
    p: &crate::vault::local::policy::RotationPolicy,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let actions: Vec<serde_json::Value> = p
            .actions
            .iter()
            .map(|a| {
                serde_json::json!({
                    "action": a.action.as_str(),
                    "timeAfterCreate": a.time_after_create,
                    "timeBeforeExpiry": a.time_before_expiry,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "key": name,
                "lifetimeActions": actions,
                "expiryTime": p.expiry_time,
                "created": p.created,
                "updated": p.updated,
            }))?
        );
        return Ok(());
    }
    if p.created.is_none() {
        println!("key {name}: no rotation policy set (the default: notify 30 days before expiry)");
    } else {
        println!("key {name}: rotation policy");
    }
    for a in &p.actions {
        match (&a.time_after_create, &a.time_before_expiry) {
            (Some(t), _) => println!(
                "  {} {t} after the latest version's creation",
                a.action.as_str()
            ),
            (_, Some(t)) => println!(
                "  {} {t} before the latest version's expiry",
                a.action.as_str()
            ),
            _ => {}
        }
    }
    println!(
        "  new versions expire: {}",
        p.expiry_time
            .as_deref()
            .map_or("never (no expiryTime)".to_string(), |e| format!(
                "{e} after creation"
            ))
    );
    Ok(())
}

/// Enables or disables `version` of key `name`, or every version of it: the newest first, so
/// that new wraps stop before old unwraps do. Versions already in that state are left alone.
/// Returns the versions changed; on an error, says which ones were changed before it.
fn set_enabled(
    v: &dyn Vault,
    name: &str,
    version: Option<&str>,
    enabled: bool,
) -> anyhow::Result<Vec<KeyInfo>> {
    let upd = KeyUpdate {
        enabled: Some(enabled),
        ..Default::default()
    };
    let mut targets = match version {
        Some(ver) => vec![v.get_key(name, Some(ver))?],
        None => v.list_key_versions(name)?,
    };
    // Newest first; the listing is oldest first, which breaks ties of `created` (seconds).
    targets.sort_by_key(|k| k.created);
    targets.reverse();
    let mut changed = Vec::new();
    for k in targets.into_iter().filter(|k| k.enabled != enabled) {
        match v.update_key(name, Some(&k.version), &upd) {
            Ok(info) => changed.push(info),
            Err(e) => {
                let done: Vec<&str> = changed
                    .iter()
                    .map(|k: &KeyInfo| k.version.as_str())
                    .collect();
                return Err(anyhow::Error::new(e).context(format!(
                    "{} version {} of key {name} (changed before the error: {})",
                    if enabled { "enabling" } else { "disabling" },
                    k.version,
                    if done.is_empty() {
                        "none".to_string()
                    } else {
                        done.join(", ")
                    }
                )));
            }
        }
    }
    Ok(changed)
}

/// One line per version [`set_enabled`] changed, or a line saying nothing needed to change.
fn print_enabled_changes(changed: &[KeyInfo], enabled: bool) {
    let verb = if enabled { "enabled" } else { "disabled" };
    if changed.is_empty() {
        println!("no version changed: every version concerned was {verb} already");
    }
    for k in changed {
        println!("{verb} {}", k.kid);
    }
}

fn print_key(k: &KeyInfo, json: bool, verb: &str) -> anyhow::Result<()> {
    if json {
        return print_json(k);
    }
    if !verb.is_empty() {
        println!("{verb} {}", k.kid);
    }
    let rows = [
        ("kid", k.kid.clone()),
        ("name", k.name.clone()),
        ("version", k.version.clone()),
        ("type", format!("{} {}", k.kty, k.key_size)),
        ("enabled", yes_no(k.enabled).into()),
        ("not before", opt_time(k.nbf)),
        ("expires", opt_time(k.exp)),
        ("key_ops", k.key_ops.join(",")),
        ("wrap alg", k.wrap_alg.to_string()),
        (
            "origin",
            if k.imported {
                "imported"
            } else {
                "generated in the vault"
            }
            .into(),
        ),
        ("created", time(k.created)),
        ("updated", time(k.updated)),
        (
            "recovery",
            format!("{} ({} days)", k.recovery_level, k.recoverable_days),
        ),
    ];
    for (label, value) in rows {
        println!("{:<12}{value}", format!("{label}:"));
    }
    Ok(())
}

fn print_deleted(d: &DeletedKeyInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(d);
    }
    println!("{:<17}{}", "recovery id:", d.recovery_id);
    println!("{:<17}{}", "deleted:", time(d.deleted_date));
    println!("{:<17}{}", "scheduled purge:", time(d.scheduled_purge_date));
    print_key(&d.key, false, "")
}
