//! `cmkfs vault ...`: keys, identities, access policies, settings and the audit log of the
//! embedded vault. Parses and prints; the rules live in `vault::local`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::fsutil::create_private_dir;
use crate::home::Home;
use crate::vault::local::seal::{self, KdfParams};
use crate::vault::local::unlock;
use crate::vault::local::{AuditEvent, ConfigUpdate, LocalVault, PolicyScope};
use crate::vault::{
    CreateKeyOptions, Credential, DeletedKeyInfo, ImportKeyOptions, KeyInfo, KeyUpdate, Permission,
    Vault, VaultProperties, WrapAlg,
};

mod access;
mod configured;
mod keys;
mod output;
mod sealing;
mod serve;
mod settings;

use access::*;
use configured::*;
use keys::*;
use output::*;
use sealing::*;
use serve::*;
use settings::*;

/// Vault administration.
#[derive(Args, Debug)]
pub struct VaultArgs {
    /// Act as the identity of this credential file (its access policies apply) instead of
    /// the vault owner.
    #[arg(long, global = true, value_name = "FILE")]
    credential: Option<PathBuf>,
    /// The vault `key` commands act on: `local:` (default), `https://HOST:PORT` (with
    /// --credential, or a credential in $CMKFS_HOME/credentials), or
    /// `pkcs11:/path/module.so?token=LABEL&pin-source=file:/path`.
    #[arg(long, global = true, value_name = "URL")]
    vault: Option<String>,
    #[command(subcommand)]
    command: VaultCommand,
}

#[derive(Subcommand, Debug)]
enum VaultCommand {
    /// Keys and their versions.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Identities that may use the vault (each with a credential file).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Access policies: identity × key → permissions.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show or change vault settings (soft-delete retention, purge protection).
    Config(ConfigArgs),
    /// Read the audit log (one line per vault operation).
    Audit(AuditArgs),
    /// Serve the vault store over HTTPS with Azure Key Vault's keys REST API.
    Serve(ServeArgs),
    /// Seal the embedded vault at rest: its private keys, TLS keys and the credentials in
    /// $CMKFS_HOME/credentials are encrypted under a master key wrapped by a passphrase
    /// (Argon2id). Resumes an interrupted seal; a new vault is created sealed.
    Seal(SealArgs),
    /// Unseal the vault for a while: the master key is cached in the kernel keyring (user
    /// keyring) so that commands and mounts need no passphrase until it times out.
    Unseal(UnsealArgs),
    /// Drop the cached master key from the kernel keyring (running mounts and servers keep
    /// theirs until they stop).
    Lock,
    /// Change the passphrase the master key is wrapped under (the old one is asked first).
    ChangePassphrase(ChangePassphraseArgs),
    /// Trust a vault on this machine: volumes (whose headers only name vaults) and commands
    /// may then use it. local: always is.
    Add(AddArgs),
    /// Stop trusting a configured vault (volumes with keys there stop mounting here).
    Remove {
        /// Name given at `vault add`.
        name: String,
    },
    /// List the vaults this machine trusts.
    ListConfigured {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl VaultArgs {
    /// Whether this is `vault serve` (a long-running server).
    pub(crate) fn is_serve(&self) -> bool {
        matches!(self.command, VaultCommand::Serve(_))
    }
}

/// Runs `cmkfs vault ...`.
pub fn run(a: VaultArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let command = match a.command {
        VaultCommand::Serve(s) => return serve(&home, s),
        VaultCommand::Seal(s) => return seal(&home, s),
        VaultCommand::Unseal(u) => return unseal(&home, u),
        VaultCommand::Lock => return lock(&home),
        VaultCommand::ChangePassphrase(c) => return change_passphrase(&home, c),
        // `--credential FILE` (global) is the credential the vault is used with.
        VaultCommand::Add(add) => return add_vault(&home, add, a.credential),
        VaultCommand::Remove { name } => return remove_vault(&home, &name),
        VaultCommand::ListConfigured { json } => return list_configured(&home, json),
        VaultCommand::Key(k) => {
            // Key commands work on every backend; the others are the embedded vault's.
            let cred = a.credential.as_deref().map(Credential::load).transpose()?;
            let url = match (&a.vault, &cred) {
                (Some(u), _) => u.clone(),
                (None, Some(c)) => c.vault.clone(),
                (None, None) => crate::vault::local::URL.to_string(),
            };
            // Only a command that adds a key may create the embedded vault; the others
            // (list, show, rotate...) would leave an empty vault behind a "not found".
            let v = match &cred {
                Some(c) => crate::vault::connect(&url, &home, Some(c))?,
                None if k.adds_a_key() => crate::vault::open_or_create(&url, &home)?,
                None => crate::vault::open(&url, &home)?,
            };
            return key(v.as_ref(), k);
        }
        other => other,
    };
    if let Some(u) = a
        .vault
        .as_deref()
        .filter(|u| !matches!(*u, "local:" | "local"))
    {
        bail!("--vault {u}: identities, policies, settings and the audit log are managed on the vault host, with the local: vault");
    }
    let vault = match &a.credential {
        Some(path) => {
            LocalVault::open_with_credential(&home.vault_dir(), &Credential::load(path)?)?
        }
        // Adding an identity or changing a setting may start a vault; reading or removing
        // something from one that does not exist says so and creates nothing.
        None if command_may_create(&command) => LocalVault::open(&home.vault_dir())?,
        None => LocalVault::open_existing(&home.vault_dir())?,
    };
    match command {
        VaultCommand::Key(_)
        | VaultCommand::Serve(_)
        | VaultCommand::Seal(_)
        | VaultCommand::Unseal(_)
        | VaultCommand::Lock
        | VaultCommand::ChangePassphrase(_)
        | VaultCommand::Add(_)
        | VaultCommand::Remove { .. }
        | VaultCommand::ListConfigured { .. } => Ok(()),
        VaultCommand::Identity(i) => identity(&vault, &home, i),
        VaultCommand::Policy(p) => policy(&vault, p),
        VaultCommand::Config(c) => config(&vault, c),
        VaultCommand::Audit(a) => audit(&vault, a),
    }
}

/// Whether a command on the embedded vault's identities, policies or settings may create
/// the vault on first use: one that adds an identity or changes a setting.
fn command_may_create(c: &VaultCommand) -> bool {
    match c {
        VaultCommand::Identity(i) => i.adds_an_identity(),
        VaultCommand::Config(c) => c.changes_something(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_valid() {
        use clap::CommandFactory as _;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("none").unwrap(), None);
        assert_eq!(parse_time("@100").unwrap(), Some(100));
        assert_eq!(parse_time("1970-01-01T00:01:40Z").unwrap(), Some(100));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = parse_time("+1h").unwrap().unwrap();
        assert!(t >= now + 3599 && t <= now + 3700);
        assert!(parse_time("-1d").unwrap().unwrap() < now);
        assert!(parse_time("tomorrow").is_err());
    }
}
