//! `cmkfs bench ...`: argument parsing and printing; the measuring is in [`crate::bench`].

use clap::{Args, Subcommand};

use crate::bench::{run_sectors, Op, SectorBenchConfig, SectorReport, SIZES};

/// Benchmarks.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// AES-256-XTS sector throughput (4 KiB sectors) for 4 KiB, 64 KiB and 1 MiB requests, on
    /// 1 and N threads, beside OpenSSL's AES-256-XTS when the `openssl` binary is present.
    Sectors(SectorsArgs),
}

#[derive(Args, Debug)]
struct SectorsArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Threads for the "N threads" figures (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Rounds; each figure is the best of this many (noise only ever slows a run down).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Print one JSON object instead of a table (fields: see `cmkfs::bench::SectorReport::to_json`).
    #[arg(long)]
    json: bool,
    /// Do not run `openssl speed`.
    #[arg(long)]
    no_openssl: bool,
}

/// Runs `cmkfs bench ...`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchCommand::Sectors(s) => sectors(s),
    }
}

fn sectors(a: SectorsArgs) -> anyhow::Result<()> {
    let cfg = SectorBenchConfig {
        seconds: a.seconds,
        threads: a.threads,
        openssl: !a.no_openssl,
        rounds: a.rounds,
    };
    let report = run_sectors(&cfg, |step| eprintln!("measuring: {step}"))?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &SectorReport) {
    println!(
        "AES-256-XTS, {} B sectors, implementation {}, best of {} x {} s per figure \
         (MB = 10^6 bytes)",
        r.unit_size, r.implementation, r.rounds, r.seconds
    );
    let mut threads: Vec<usize> = r.results.iter().map(|m| m.threads).collect();
    threads.dedup();
    print!("{:<10}{:>9}", "request", "threads");
    println!("{:>16}{:>16}", "encrypt MB/s", "decrypt MB/s");
    for size in SIZES {
        for &t in &threads {
            let fig = |op| {
                r.get(op, size, t)
                    .map_or("-".to_string(), |m| format!("{:.0}", m.mb_per_s()))
            };
            let label = if size >= 1 << 20 {
                format!("{} MiB", size >> 20)
            } else {
                format!("{} KiB", size >> 10)
            };
            println!(
                "{label:<10}{t:>9}{:>16}{:>16}",
                fig(Op::Encrypt),
                fig(Op::Decrypt)
            );
        }
    }
    match &r.openssl {
        Some(o) => {
            println!(
                "{:<10}{:>9}{:>16.0}{:>16.0}   ({})",
                "openssl", 1, o.encrypt_mb_per_s, o.decrypt_mb_per_s, o.version
            );
            if let (Some(e), Some(d), Some(oe), Some(od)) = (
                r.ratio_vs_openssl(Op::Encrypt),
                r.ratio_vs_openssl(Op::Decrypt),
                r.get(Op::Encrypt, 4096, 1),
                r.get(Op::Decrypt, 4096, 1),
            ) {
                // openssl speed divides by user CPU time; so does this comparison.
                println!(
                    "ours / OpenSSL, 4 KiB, 1 thread, per CPU-second: encrypt {e:.2}x \
                     ({:.0} MB/s), decrypt {d:.2}x ({:.0} MB/s)",
                    oe.mb_per_cpu_s(),
                    od.mb_per_cpu_s()
                );
            }
        }
        None => println!(
            "openssl: no figure ({})",
            r.openssl_note.as_deref().unwrap_or("unknown")
        ),
    }
    if let (Some(e), Some(d)) = (
        r.scaling_2_threads(Op::Encrypt),
        r.scaling_2_threads(Op::Decrypt),
    ) {
        println!("2 threads / 1 thread, 1 MiB: encrypt {e:.2}x, decrypt {d:.2}x");
    }
}
