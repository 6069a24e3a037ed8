//! The command line: parses, calls the library, prints. No logic of its own.

mod backup;
mod bench;
mod control;
mod des;
mod drill;
mod fsck;
mod reencrypt;
mod status;
mod upgrade;
mod vault;
mod volume;

use clap::{Parser, Subcommand};

/// Transparent-encryption filesystem with customer-managed, revocable keys.
#[derive(Parser, Debug)]
#[command(name = "cmkfs", version, about, propagate_version = true)]
pub struct Cli {
    /// Read the embedded vault's passphrase from the first line of this file (also
    /// $CMKFS_PASSPHRASE_FILE, or the systemd credential cmkfs-vault-passphrase; else a prompt
    /// on a terminal, or the key `cmkfs vault unseal` cached).
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new encrypted volume in an empty backing directory.
    Init(volume::InitArgs),
    /// Mount a volume (daemonizes and returns once the mount is ready).
    Mount(volume::MountArgs),
    /// Unmount a mounted volume.
    Umount(volume::UmountArgs),
    /// Show a volume's header (never the key).
    Info(volume::InfoArgs),
    /// Show whether volumes are accessible: state, reason, key, checks, denied requests.
    Status(status::StatusArgs),
    /// Rehearse a revocation on a live mount and measure how fast every path is cut off.
    Drill(drill::DrillArgs),
    /// Internal: the mmap probe process of a drill.
    #[command(name = "__mmap-probe", hide = true)]
    MmapProbe {
        /// File to map.
        file: std::path::PathBuf,
    },
    /// Manage the vault: keys and their versions.
    Vault(vault::VaultArgs),
    /// Disk Encryption Sets: key, identity, rotation and double encryption for volumes.
    Des(des::DesArgs),
    /// Measure throughput.
    Bench(bench::BenchArgs),
    /// Check a volume's backing directory; --repair fixes it (exit 0 clean, 1 repaired,
    /// 2 problems left, 8 could not check).
    Fsck(fsck::FsckArgs),
    /// Back up a volume's ciphertext and structure to one archive, its DEK wrapped by a key
    /// of your choice (a point-in-time view: a mounted volume's writes are frozen meanwhile).
    Backup(backup::BackupArgs),
    /// Restore an archive into a new volume under a Disk Encryption Set (verified first;
    /// nothing is written if anything fails); --new-dek re-encrypts it under a fresh DEK.
    Restore(backup::RestoreArgs),
    /// Volume maintenance: `reencrypt` (replace the DEK).
    Volume(reencrypt::VolumeArgs),
    /// Convert a volume made by an older cmkfs to the current on-disk format, in place
    /// (crash-safe and resumable; `mount` does it too).
    Upgrade(upgrade::UpgradeArgs),
}

impl Cli {
    /// Whether a closed stdout/stderr pipe should end the command by SIGPIPE, as for any Unix
    /// tool. Not for the mount daemon and the vault server (long-running, their readers may
    /// go away) nor the drill's probe process.
    pub fn quiet_on_closed_pipe(&self) -> bool {
        match &self.command {
            Command::Mount(m) => !m.is_foreground(),
            Command::Vault(v) => !v.is_serve(),
            Command::MmapProbe { .. } => false,
            _ => true,
        }
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // A master key handed down by `cmkfs mount` to its daemon.
    crate::vault::local::unlock::take_handed_key();
    if let Some(p) = cli.passphrase_file {
        crate::vault::local::unlock::set_passphrase_source(Some(
            crate::vault::local::unlock::PassphraseSource::File(p),
        ));
    }
    if !matches!(cli.command, Command::MmapProbe { .. }) {
        crate::home::Home::from_env().secure()?;
    }
    match cli.command {
        Command::Init(a) => volume::init(a),
        Command::Mount(a) => volume::mount(a),
        Command::Umount(a) => volume::umount(a),
        Command::Info(a) => volume::info(a),
        Command::Status(a) => status::run(a),
        Command::Drill(a) => drill::run(a),
        Command::MmapProbe { file } => crate::drill::mmap_probe_main(&file),
        Command::Vault(a) => vault::run(a),
        Command::Des(a) => des::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Fsck(a) => fsck::run(a),
        Command::Upgrade(a) => upgrade::run(a),
        Command::Volume(a) => reencrypt::run(a),
        Command::Backup(a) => backup::run_backup(a),
        Command::Restore(a) => backup::run_restore(a),
    }
}
