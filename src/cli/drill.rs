//! `cmkfs drill MOUNTPOINT --revoke disable|policy|delete [--restore] [--json] [--plot FILE]`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::drill::{self, DrillOptions, Revoke};
use crate::home::Home;

/// `cmkfs drill`.
#[derive(Args, Debug)]
pub struct DrillArgs {
    /// Mountpoint of a live cmkfs mount (of this CMKFS_HOME).
    mountpoint: PathBuf,
    /// How to revoke access to the KEK.
    #[arg(long, value_enum)]
    revoke: Revoke,
    /// Restore access afterwards, measure the time to heal and verify the probe.
    #[arg(long)]
    restore: bool,
    /// JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Draw the timeline as an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Give up waiting for a path to be denied (or to heal) after this long.
    #[arg(long, default_value = "60s", value_parser = super::volume::parse_duration)]
    timeout: Duration,
    /// Probe file size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    probe_size: usize,
}

pub fn run(a: DrillArgs) -> anyhow::Result<()> {
    let opts = DrillOptions {
        revoke: a.revoke,
        restore: a.restore,
        timeout: a.timeout,
        probe_size: a.probe_size,
    };
    let r = drill::run(&Home::from_env(), &a.mountpoint, &opts)?;
    if let Some(p) = &a.plot {
        std::fs::write(p, drill::svg(&r)).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "drill: revoke={:?} mount={} key={}",
            r.revoke,
            r.mountpoint.display(),
            r.key_id
        );
        println!(
            "       push={} bound={:.0} ms",
            if r.push { "on" } else { "off" },
            r.bound_ms
        );
        for (t, what) in &r.timeline {
            println!("{t:>10.1} ms  {what}");
        }
        println!(
            "cut-off {}  heal {}  plaintext after cut-off: {} bytes",
            r.cutoff_ms
                .map(|c| format!("{c:.1} ms"))
                .unwrap_or("never".into()),
            r.heal_ms
                .map(|c| format!("{c:.1} ms"))
                .unwrap_or("-".into()),
            r.leaked_bytes
        );
        println!("verdict: {}", r.verdict);
        for f in &r.failures {
            println!("  - {f}");
        }
    }
    if r.verdict != "PASS" {
        std::process::exit(3);
    }
    Ok(())
}
