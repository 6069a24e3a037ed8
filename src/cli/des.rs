//! `cmkfs des create | show | list | delete | update`: Disk Encryption Sets. Parses and
//! prints; the rules live in [`crate::des`].

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::des::{
    self, CreateRequest, DiskEncryptionSet, EncryptionType, Hooks, IdentitySpec, Progress,
    RotationReport, UpdateRequest, VolumeState,
};
use crate::home::Home;

/// Volumes from which a key change shows a progress bar (on a terminal).
const PROGRESS_BAR_FROM: usize = 2;

/// Disk Encryption Sets.
#[derive(Args, Debug)]
pub struct DesArgs {
    #[command(subcommand)]
    command: DesCommand,
}

#[derive(Subcommand, Debug)]
enum DesCommand {
    /// Create a Disk Encryption Set: a vault key (customer-managed), the identity that uses
    /// it, the encryption type and auto-rotation.
    #[command(disable_version_flag = true)]
    Create {
        /// Name: 1-80 letters, digits, dashes and underscores.
        name: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        identity: IdentityArgs,
        /// EncryptionAtRestWithCustomerKey, or EncryptionAtRestWithPlatformAndCustomerKeys
        /// (double encryption: a second layer under cmkfs's platform key).
        #[arg(long, value_name = "TYPE", default_value = "EncryptionAtRestWithCustomerKey", value_parser = parse_type)]
        encryption_type: EncryptionType,
        /// Move to the key's newest version automatically (within one key-check interval of
        /// a mounted volume).
        #[arg(long)]
        auto_rotate: bool,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a Disk Encryption Set: active key, previous keys, rotation state, identity, volumes.
    Show {
        /// Name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List Disk Encryption Sets.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a Disk Encryption Set (refused while volumes use it).
    Delete {
        /// Name.
        name: String,
    },
    /// Change the key (a new version, or a different customer key: every volume's DEK is
    /// rewrapped, mounted ones included, data untouched), the identity or auto-rotation;
    /// also finishes an interrupted key change and clears autoKeyRotationError.
    #[command(disable_version_flag = true)]
    Update {
        /// Name.
        name: String,
        /// New key: a name, `<vault-url>/keys/<name>` or a full versioned key id.
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// Key version (with --key, or alone for a version of the current key).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// Vault URL for a bare key name (default: the current key's vault).
        #[arg(long, value_name = "URL")]
        vault: Option<String>,
        #[command(flatten)]
        identity: IdentityArgs,
        /// The encryption type cannot change: given, it must match.
        #[arg(long, value_name = "TYPE", value_parser = parse_type)]
        encryption_type: Option<EncryptionType>,
        /// Turn auto-rotation on.
        #[arg(long, conflicts_with = "no_auto_rotate")]
        auto_rotate: bool,
        /// Turn auto-rotation off.
        #[arg(long)]
        no_auto_rotate: bool,
        /// Drop a volume that no longer exists from the list (repeatable).
        #[arg(long, value_name = "CIPHERDIR")]
        forget_volume: Vec<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct KeyArgs {
    /// The key: a name, `<vault-url>/keys/<name>` or a full versioned key id.
    #[arg(long, value_name = "KEY")]
    key: String,
    /// Key version (the newest when not given and the key id has none).
    #[arg(long, value_name = "V")]
    version: Option<String>,
    /// Vault URL for a bare key name.
    #[arg(long, value_name = "URL", default_value = "local:")]
    vault: String,
}

#[derive(Args, Debug)]
struct IdentityArgs {
    /// The identity the set reaches the vault as (needs get, wrapKey and unwrapKey on the
    /// key); the vault owner when not given.
    #[arg(long, value_name = "ID")]
    identity: Option<String>,
    /// The identity's credential file (default `$CMKFS_HOME/credentials/ID.json`).
    #[arg(long, value_name = "FILE", requires = "identity")]
    credential: Option<PathBuf>,
}

impl IdentityArgs {
    fn spec(&self) -> Option<IdentitySpec> {
        self.identity.as_ref().map(|name| IdentitySpec {
            name: name.clone(),
            credential_file: self.credential.clone(),
        })
    }
}

fn parse_type(s: &str) -> Result<EncryptionType, String> {
    s.parse().map_err(|e: des::DesError| e.to_string())
}

/// Runs `cmkfs des ...`.
pub fn run(a: DesArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    match a.command {
        DesCommand::Create {
            name,
            key,
            identity,
            encryption_type,
            auto_rotate,
            json,
        } => {
            let d = des::create(
                &home,
                &CreateRequest {
                    name,
                    key: key.key,
                    version: key.version,
                    vault: key.vault,
                    identity: identity.spec(),
                    encryption_type,
                    auto_rotate,
                },
            )?;
            if json {
                return print_json(&Shown::new(&d));
            }
            println!(
                "created Disk Encryption Set {} with key {}",
                d.name, d.active_key.key_url
            );
            print_des(&d);
            Ok(())
        }
        DesCommand::Show { name, json } => {
            let d = des::show(&home, &name)?;
            if json {
                return print_json(&Shown::new(&d));
            }
            print_des(&d);
            Ok(())
        }
        DesCommand::List { json } => {
            let all = des::list(&home)?;
            if json {
                let shown: Vec<Shown> = all.iter().map(Shown::new).collect();
                return print_json(&shown);
            }
            if all.is_empty() {
                println!(
                    "no Disk Encryption Sets (create one with `cmkfs des create NAME --key KEY`)"
                );
            }
            for d in &all {
                println!(
                    "{:<24} {:<44} {:>3} volume{}  auto-rotate {}{}",
                    d.name,
                    d.encryption_type,
                    d.volumes.len(),
                    if d.volumes.len() == 1 { " " } else { "s" },
                    if d.rotation_to_latest_key_version_enabled {
                        "on "
                    } else {
                        "off"
                    },
                    if d.previous_keys.is_empty() {
                        ""
                    } else {
                        "  (rotation in progress)"
                    }
                );
                println!("  {}", d.active_key.key_url);
            }
            Ok(())
        }
        DesCommand::Delete { name } => {
            des::delete(&home, &name)?;
            println!("deleted Disk Encryption Set {name}");
            Ok(())
        }
        DesCommand::Update {
            name,
            key,
            version,
            vault,
            identity,
            encryption_type,
            auto_rotate,
            no_auto_rotate,
            forget_volume,
            json,
        } => {
            let req = UpdateRequest {
                key,
                version,
                vault,
                identity: identity.spec(),
                auto_rotate: match (auto_rotate, no_auto_rotate) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                encryption_type,
                forget_volumes: forget_volume,
            };
            let mut bar: Option<ProgressBar> = None;
            let mut progress = |p: &Progress| {
                if p.total < PROGRESS_BAR_FROM {
                    return;
                }
                // indicatif draws to stderr only when it is a terminal.
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(p.total as u64);
                    if let Ok(style) = ProgressStyle::with_template(
                        "rewrapping {bar:30} {pos}/{len} volumes {msg}",
                    ) {
                        b.set_style(style);
                    }
                    b
                });
                b.set_position(p.done as u64);
                if let Some(v) = p.volume {
                    b.set_message(v.display().to_string());
                }
            };
            let result = des::update(
                &home,
                &name,
                &req,
                &mut Hooks {
                    progress: Some(&mut progress),
                    fault: None,
                },
            );
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            let report = result?;
            if json {
                #[derive(Serialize)]
                struct Out<'a> {
                    #[serde(flatten)]
                    des: Shown<'a>,
                    rotation: &'a Option<RotationReport>,
                }
                return print_json(&Out {
                    des: Shown::new(&report.des),
                    rotation: &report.rotation,
                });
            }
            match &report.rotation {
                Some(r) => println!(
                    "Disk Encryption Set {} now uses {}: {} volume{} rewrapped, {} already on it",
                    r.des,
                    r.to,
                    r.rewrapped(),
                    if r.rewrapped() == 1 { "" } else { "s" },
                    r.volumes.len() - r.rewrapped()
                ),
                None => println!("updated Disk Encryption Set {}", report.des.name),
            }
            print_des(&report.des);
            Ok(())
        }
    }
}

/// The record plus the live state of its volumes.
#[derive(Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    des: &'a DiskEncryptionSet,
    #[serde(rename = "volumeStates")]
    volume_states: Vec<VolumeState>,
}

impl<'a> Shown<'a> {
    fn new(des: &'a DiskEncryptionSet) -> Shown<'a> {
        Shown {
            des,
            volume_states: des::volume_states(des),
        }
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_des(d: &DiskEncryptionSet) {
    println!("name                 {}", d.name);
    println!("encryptionType       {}", d.encryption_type);
    println!("activeKey            {}", d.active_key.key_url);
    if d.previous_keys.is_empty() {
        println!("previousKeys         (none)");
    } else {
        for (i, k) in d.previous_keys.iter().enumerate() {
            let label = if i == 0 { "previousKeys" } else { "" };
            println!("{label:<20} {} (rotation in progress)", k.key_url);
        }
    }
    println!(
        "autoRotation         {}",
        if d.rotation_to_latest_key_version_enabled {
            "on (rotationToLatestKeyVersionEnabled)"
        } else {
            "off"
        }
    );
    println!(
        "lastKeyRotation      {}",
        d.last_key_rotation_timestamp.as_deref().unwrap_or("never")
    );
    match &d.auto_key_rotation_error {
        Some(e) => println!(
            "autoKeyRotationError {} at {}: {} (auto-rotation paused until `cmkfs des update {}`)",
            e.code, e.time, e.message, d.name
        ),
        None => println!("autoKeyRotationError (none)"),
    }
    match &d.identity {
        Some(i) => println!(
            "identity             {} ({})",
            i.name,
            i.credential_file.display()
        ),
        None => println!("identity             owner (the vault owner)"),
    }
    let states = des::volume_states(d);
    if states.is_empty() {
        println!(
            "volumes              (none; bind one with `cmkfs init CIPHERDIR --des {}`)",
            d.name
        );
    }
    for (i, s) in states.iter().enumerate() {
        let label = if i == 0 { "volumes" } else { "" };
        println!("{label:<20} {} [{}]", s.cipherdir.display(), s.state);
    }
}
