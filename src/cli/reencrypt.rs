//! `cmkfs volume reencrypt CIPHERDIR [--online] [--json] [--credential FILE]`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::home::Home;
use crate::keyring::KeyringConfig;
use crate::volume::header::VolumeHeader;
use crate::volume::lock::VolumeLock;
use crate::volume::reencrypt::{Hooks, Progress, Report, Session};
use crate::volume::Volume;

/// `cmkfs volume ...`.
#[derive(Args, Debug)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Replace the volume's DEK: re-encrypt every name and file under a new one (crash-safe
    /// and resumable; run it again to resume). The old DEK is gone from the header at the end.
    Reencrypt(ReencryptArgs),
}

/// `cmkfs volume reencrypt`.
#[derive(Args, Debug)]
pub struct ReencryptArgs {
    /// Backing directory of the volume.
    cipherdir: PathBuf,
    /// Re-encrypt a mounted volume inside its mount, which stays in use (without it, a
    /// mounted volume is refused).
    #[arg(long)]
    online: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Reach the vault as this identity (as `cmkfs mount --credential`); by default the
    /// volume's Disk Encryption Set identity, else the vault owner.
    #[arg(long, value_name = "FILE")]
    credential: Option<PathBuf>,
    /// Delete what `cmkfs fsck --repair` set aside in `cmkfs.quarantine/` (it cannot be
    /// re-encrypted, and would be unreadable once the old DEK is gone); without it, a
    /// non-empty quarantine makes the command refuse.
    #[arg(long)]
    discard_quarantine: bool,
}

/// Runs `cmkfs volume ...`.
pub fn run(a: VolumeArgs) -> anyhow::Result<()> {
    match a.command {
        VolumeCommand::Reencrypt(r) => reencrypt(r),
    }
}

fn reencrypt(a: ReencryptArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let root = std::fs::canonicalize(&a.cipherdir)
        .with_context(|| format!("{}", a.cipherdir.display()))?;
    let header = VolumeHeader::read(&root)?;
    crate::unlock::check_configured(&home, &header)?;
    if let Some((mountpoint, pid)) = crate::fsck::find_mount(&root, &home) {
        if !a.online {
            bail!(
                "{} is mounted at {} (daemon {pid}); add --online to re-encrypt it in place \
                 while it stays in use, or unmount it first",
                root.display(),
                mountpoint.display()
            );
        }
        return super::control::reencrypt_online(&home, &mountpoint, a.json, a.discard_quarantine);
    }
    if a.online && !a.json {
        eprintln!(
            "cmkfs: {} is not mounted: re-encrypting it offline",
            root.display()
        );
    }
    let lock = VolumeLock::exclusive(&root)?;
    let header = VolumeHeader::read(&root)?;
    if crate::volume::upgrade::needed(&root, &header) {
        bail!(
            "{} needs `cmkfs upgrade` (format v1) before it can be re-encrypted",
            root.display()
        );
    }
    let (vault, _) = super::volume::volume_vault(&home, &header, a.credential.as_deref())?;
    let (keyring, header, handle) =
        crate::unlock::unlock_with_handle(&home, vault, &root, &header, KeyringConfig::default())?;
    let keyring = Arc::new(keyring);
    let vol = Volume::open(&root, header, keyring.clone(), 0)?;
    // Another volume's header would have every file rewritten under its key.
    vol.check_root_names()?;
    let access = crate::unlock::ReencryptAccess::new(&home, keyring.vault(), handle)?;
    let bar = Bar::new(!a.json);
    let mut progress = |p: &Progress| bar.show(p);
    let report = Session::new(
        &vol,
        &access,
        None,
        Hooks {
            progress: Some(&mut progress),
            fault: None,
        },
    )
    .discard_quarantine(a.discard_quarantine)
    .run()
    .with_context(|| format!("re-encrypting {}", root.display()))?;
    bar.done();
    // A header update this command (or another) made when it was killed left its temp file;
    // with the lock held exclusively none is in flight, so a completed run leaves none.
    // Listing the root moves its atime: put back, as the run kept every time.
    let stale = crate::volume::keep_times(vol.root_dir().fd(), || {
        VolumeHeader::remove_stale_temps(&root)
    })
    .with_context(|| format!("removing leftover header temp files in {}", root.display()))?;
    if stale > 0 {
        tracing::info!(
            files = stale,
            "removed header temp files of interrupted updates"
        );
    }
    drop(lock);
    print_report(&root, &report, a.json)
}

/// A progress bar on a terminal (indicatif draws to stderr only when it is one).
pub(crate) struct Bar {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Bar {
    pub(crate) fn new(on: bool) -> Bar {
        let bar = on.then(|| {
            let b = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg:10} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style);
            }
            b
        });
        Bar {
            bar,
            started: Instant::now(),
        }
    }

    pub(crate) fn show(&self, p: &Progress) {
        if let Some(b) = &self.bar {
            b.set_message(p.phase.clone());
            b.set_length(p.bytes_total.max(p.bytes_done));
            b.set_position(p.bytes_done);
        }
    }

    pub(crate) fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    #[allow(dead_code)]
    pub(crate) fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// Prints what a re-encryption did.
pub(crate) fn print_report(root: &std::path::Path, r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let mbs = if r.seconds > 0.0 {
        r.bytes as f64 / r.seconds / 1e6
    } else {
        0.0
    };
    println!(
        "{} re-encrypted under a new DEK (key generation {}, fingerprint {}){}: {} files, \
         {:.1} MB in {:.1} s ({mbs:.0} MB/s); {} names, {} symlink targets, {} extended \
         attributes sealed again; the old DEK is gone from the header",
        root.display(),
        r.key_generation,
        r.dek_fingerprint,
        if r.resumed { ", resumed" } else { "" },
        r.files,
        r.bytes as f64 / 1e6,
        r.seconds,
        r.names,
        r.symlink_targets,
        r.xattrs
    );
    if r.quarantine_discarded > 0 {
        println!(
            "{} entries of cmkfs.quarantine/ were deleted (--discard-quarantine)",
            r.quarantine_discarded
        );
    }
    if r.missed > 0 {
        // A bug the final check caught: worth a report, though nothing was lost.
        eprintln!(
            "cmkfs: warning: {} file(s) were missed by the walks and converted by the final \
             check (nothing was lost; please report it)",
            r.missed
        );
    }
    Ok(())
}
