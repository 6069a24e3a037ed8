//! `cmkfs fsck CIPHERDIR [--repair] [--json] [--no-key] [--credential FILE]`.
//!
//! Exit status (like e2fsck's): 0 clean, 1 problems found and all repaired, 2 problems left
//! (found without `--repair`, or not repairable), 8 fsck could not run (not a volume, mounted
//! while `--repair` was asked for, the key could not be had, I/O error). Command-line usage
//! errors also exit 2, with clap's one-line message and no report.

use std::path::PathBuf;

use clap::Args;

use crate::fsck::{
    self, Fix, KeyCheck, Options, Outcome, ProblemKind, Report, Severity, EXIT_ERROR,
};
use crate::home::Home;
use crate::volume::header::VolumeHeader;

/// `cmkfs fsck`.
#[derive(Args, Debug)]
pub struct FsckArgs {
    /// Backing directory of the volume (unmounted for --repair).
    cipherdir: PathBuf,
    /// Repair what can be repaired without the data and move what cannot into
    /// CIPHERDIR/cmkfs.quarantine/<time>/ (nothing is deleted but metadata nothing needs).
    #[arg(long)]
    repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Do not unwrap the key: check the structure only (names, symlink targets and the header
    /// MAC are not checked).
    #[arg(long)]
    no_key: bool,
    /// Reach the vault as this identity (as `cmkfs mount --credential`); by default the
    /// volume's Disk Encryption Set identity, else the vault owner, as a mount would.
    #[arg(long, value_name = "FILE", conflicts_with = "no_key")]
    credential: Option<PathBuf>,
}

/// Runs fsck and exits with its status (never returns normally).
pub fn run(a: FsckArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let opener = |h: &VolumeHeader| {
        super::volume::volume_vault(&home, h, a.credential.as_deref())
            .map(|(v, _)| v)
            .map_err(|e| {
                e.chain()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ")
            })
    };
    let opts = Options {
        repair: a.repair,
        vault: if a.no_key { None } else { Some(&opener) },
        home: &home,
    };
    match fsck::run(&a.cipherdir, &opts) {
        Ok(report) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_human(&report);
            }
            std::process::exit(report.exit_code);
        }
        Err(e) => {
            if a.json {
                let doc = serde_json::json!({
                    "schema": fsck::REPORT_SCHEMA,
                    "cipherdir": a.cipherdir,
                    "error": e.to_string(),
                    "exit_code": EXIT_ERROR,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            eprintln!("cmkfs: error: fsck: {e}");
            std::process::exit(EXIT_ERROR);
        }
    }
}

fn print_human(r: &Report) {
    let keys = match r.keys {
        KeyCheck::Verified => "key verified",
        KeyCheck::NotUsed => "structure only, key not used",
        KeyCheck::HeaderUnusable => "header unusable, names not checked",
    };
    println!(
        "{} (volume {}, {keys})",
        r.cipherdir.display(),
        r.volume_id.as_deref().unwrap_or("?")
    );
    let c = &r.counts;
    println!(
        "  checked {} directories, {} files, {} symlinks, {} special files ({} long names)",
        c.directories, c.files, c.symlinks, c.special, c.long_names
    );
    for p in &r.problems {
        let sev = match p.severity {
            Severity::Error => "problem",
            Severity::Warning => "warning",
        };
        let kind = serde_json::to_value(p.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let whose = match (&p.plaintext, &p.plaintext_dir) {
            (Some(pl), _) => format!(" ({})", pl.display()),
            (None, Some(d)) => format!(" (in {})", d.display()),
            _ => String::new(),
        };
        println!("  {sev}: {kind}: {}{whose}", p.backing.display());
        println!("      {}", p.detail);
        let fix = match p.fix {
            Fix::Remove => "remove",
            Fix::Quarantine => "move to the quarantine",
            Fix::Restore => "restore the header from its temp copy",
            Fix::Recreate => "write a fresh directory id",
            Fix::None => "none",
        };
        if p.severity == Severity::Warning {
            continue;
        }
        if !r.repair {
            println!("      repair: {fix}");
        } else if p.repaired {
            let done = match p.fix {
                Fix::Remove => "removed",
                Fix::Restore => "header restored from its temp copy",
                Fix::Recreate => "fresh directory id written",
                Fix::Quarantine | Fix::None => "done",
            };
            match &p.moved_to {
                Some(to) => println!("      repaired: moved to {}", to.display()),
                None => println!("      repaired: {done}"),
            }
        } else {
            println!(
                "      NOT repaired ({fix}){}",
                p.repair_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
    let errors = r.errors().count();
    match r.outcome {
        Outcome::Clean => {
            // Not corruption, but the user's files may be there (see the warning above).
            let set_aside = r
                .problems
                .iter()
                .any(|p| p.kind == ProblemKind::QuarantineNotEmpty);
            if set_aside {
                println!("clean, but cmkfs.quarantine/ holds entries the mount does not show (see above)");
            } else {
                println!("clean");
            }
        }
        Outcome::Repaired => {
            print!("repaired: {errors} problem{}", plural(errors));
            if let Some(q) = &r.quarantine {
                print!(
                    " ({} set aside in {})",
                    r.errors().filter(|p| p.moved_to.is_some()).count(),
                    q.display()
                );
            }
            println!();
        }
        Outcome::ProblemsLeft => {
            let left = r.errors().filter(|p| !p.repaired).count();
            print!("{left} problem{} left", plural(left));
            if !r.repair {
                let fixable = r.errors().filter(|p| p.fix != Fix::None).count();
                print!(" ({fixable} repairable with --repair)");
            }
            println!();
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
