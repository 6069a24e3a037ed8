//! `cmkfs bench sectors`: a quick throughput measurement of the sector path (the
//! [`SectorEngine`] over an [`XtsCipher`] with 4096-byte units), with OpenSSL's AES-256-XTS
//! measured in the same run as the yardstick.
//!
//! This is the library half; the CLI only parses arguments and prints a [`SectorReport`].
//! Criterion benches (`cargo bench --bench sector`) give steadier numbers; this command is for
//! users and scripts, and finishes in well under a minute with the defaults.
//!
//! What is measured: one caller issues requests of one size back to back on the same buffer
//! (encrypting, or decrypting, in place) for a fixed time, after a short warm-up. With more
//! than one engine thread, only requests of at least
//! [`PARALLEL_MIN_BYTES`](crate::engine::PARALLEL_MIN_BYTES) are split across
//! threads; smaller ones stay on the calling thread by design (concurrency across small
//! requests comes from the FUSE threads), so their N-thread figure matches the 1-thread one.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::crypto::{CryptoError, XtsCipher};
use crate::engine::{Holes, SectorEngine};

/// Data unit size measured (the cmkfs sector).
pub const UNIT_SIZE: usize = 4096;

/// Request sizes measured: one sector, the parallel threshold, and a FUSE `max_write`.
pub const SIZES: [usize; 3] = [4096, 64 * 1024, 1024 * 1024];

/// What to measure.
#[derive(Clone, Debug)]
pub struct SectorBenchConfig {
    /// Time per measurement, in seconds (also passed to `openssl speed -seconds`, rounded up to
    /// a whole second, its granularity).
    pub seconds: f64,
    /// The "many threads" engine size; 0 = available cores. 1-thread figures are always taken,
    /// and 2-thread ones too (for the scaling ratio) when `threads` is more than 2.
    pub threads: usize,
    /// Run `openssl speed` when the `openssl` binary exists.
    pub openssl: bool,
    /// Rounds: every figure (ours and OpenSSL's) is measured once per round, the rounds run
    /// one after the other, and the best figure of each counts. On a shared machine noise only
    /// ever slows a run down, so the best is the closest to what the code does, and
    /// interleaving gives both sides of each ratio the same conditions.
    pub rounds: usize,
}

impl Default for SectorBenchConfig {
    fn default() -> Self {
        SectorBenchConfig {
            seconds: 1.0,
            threads: 0,
            openssl: true,
            rounds: 2,
        }
    }
}

/// Encrypt or decrypt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`SectorEngine::encrypt`].
    Encrypt,
    /// [`SectorEngine::decrypt`] with [`Holes::Decrypt`].
    Decrypt,
}

impl Op {
    /// `"encrypt"` or `"decrypt"`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// Direction.
    pub op: Op,
    /// Request size in bytes.
    pub size: usize,
    /// Engine threads.
    pub threads: usize,
    /// Bytes processed during the timed period.
    pub bytes: u64,
    /// Length of the timed period (wall clock).
    pub elapsed: Duration,
    /// User CPU time the whole process spent in the timed period (all engine threads).
    pub cpu: Duration,
}

impl Measurement {
    /// Throughput in MB/s (10^6 bytes per second of wall-clock time, OpenSSL's unit).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    /// Throughput per second of user CPU time, MB/s. This is what `openssl speed` reports by
    /// default (it divides by user time), and it does not count time the thread spent
    /// descheduled, so it is the fair figure to compare with OpenSSL's on a busy machine.
    pub fn mb_per_cpu_s(&self) -> f64 {
        self.bytes as f64 / self.cpu.as_secs_f64().max(1e-9) / 1e6
    }
}

/// User CPU time of this process so far.
fn user_cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass; an all-zero `rusage` is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer; it cannot fail with these arguments.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    Duration::from_secs(ru.ru_utime.tv_sec as u64)
        + Duration::from_micros(ru.ru_utime.tv_usec as u64)
}

/// OpenSSL's AES-256-XTS on 4096-byte buffers, one thread.
#[derive(Clone, Debug)]
pub struct OpenSslFigure {
    /// `openssl version` output.
    pub version: String,
    /// Encryption, MB/s.
    pub encrypt_mb_per_s: f64,
    /// Decryption, MB/s.
    pub decrypt_mb_per_s: f64,
    /// The encryption command line, to reproduce.
    pub command: String,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct SectorReport {
    /// The cipher implementation measured (`"aes-ni"` or `"portable"`).
    pub implementation: &'static str,
    /// Data unit size.
    pub unit_size: usize,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Rounds run; each figure is the best of that many.
    pub rounds: usize,
    /// The "many threads" figure's thread count.
    pub threads: usize,
    /// All figures (the best of the rounds), ordered by thread count, size, then encrypt
    /// before decrypt.
    pub results: Vec<Measurement>,
    /// OpenSSL's figure (best of the rounds), when `openssl` was found and asked for.
    pub openssl: Option<OpenSslFigure>,
    /// Why there is no OpenSSL figure, when there is none.
    pub openssl_note: Option<String>,
}

/// A failure of the benchmark itself.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// `seconds` is not a positive finite number.
    #[error("--seconds must be a positive number, got {0}")]
    BadSeconds(f64),
    /// `rounds` is 0.
    #[error("--rounds must be at least 1")]
    BadRounds,
    /// The engine could not start its threads.
    #[error("cannot start the sector engine: {0}")]
    Engine(#[from] std::io::Error),
    /// The cipher refused (cannot happen with the fixed parameters used here).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl SectorReport {
    /// The figure for `op`, `size`, `threads`, if measured.
    pub fn get(&self, op: Op, size: usize, threads: usize) -> Option<&Measurement> {
        self.results
            .iter()
            .find(|m| m.op == op && m.size == size && m.threads == threads)
    }

    /// Ours (1 thread, 4 KiB requests) / OpenSSL (4 KiB, one thread) for `op`, both per
    /// second of user CPU time (what `openssl speed` measures).
    pub fn ratio_vs_openssl(&self, op: Op) -> Option<f64> {
        let o = self.openssl.as_ref()?;
        let theirs = match op {
            Op::Encrypt => o.encrypt_mb_per_s,
            Op::Decrypt => o.decrypt_mb_per_s,
        };
        Some(self.get(op, 4096, 1)?.mb_per_cpu_s() / theirs)
    }

    /// 2 threads / 1 thread on 1 MiB requests for `op`.
    pub fn scaling_2_threads(&self, op: Op) -> Option<f64> {
        let one = self.get(op, 1 << 20, 1)?.mb_per_s();
        Some(self.get(op, 1 << 20, 2)?.mb_per_s() / one)
    }

    /// The report as one JSON object. Field names are stable:
    ///
    /// ```text
    /// {
    ///   "implementation": "aes-ni" | "portable",
    ///   "unit_size": 4096,            // bytes
    ///   "seconds": 1.0,               // per measurement
    ///   "rounds": 2,                  // each figure is the best of this many
    ///   "threads": 2,                 // the "N threads" engine size
    ///   "results": [                  // one per (op, size, threads)
    ///     {"op": "encrypt" | "decrypt", "size": 4096, "threads": 1,
    ///      "mb_per_s": 5012.3,        // per wall-clock second
    ///      "mb_per_cpu_s": 5020.1,    // per second of user CPU time, all threads
    ///      "bytes": 5012299776, "elapsed_s": 1.0, "cpu_s": 0.998}
    ///   ],
    ///   "openssl": {"version": "OpenSSL 3.0.19 ...", "encrypt_mb_per_s": 5400.1,
    ///               "decrypt_mb_per_s": 5390.7,    // per user-CPU second, as it reports
    ///               "command": "openssl speed ..."} | null,
    ///   "openssl_note": "why openssl is null" | null,
    ///   // ours / OpenSSL, 4 KiB requests, 1 thread, both per user-CPU second:
    ///   "ratio_vs_openssl": {"encrypt": 0.97, "decrypt": 0.98} | null,
    ///   // 1 MiB requests, 2 threads / 1 thread, wall clock:
    ///   "scaling_2_threads": {"encrypt": 1.93, "decrypt": 1.92} | null
    /// }
    /// ```
    ///
    /// MB are 10^6 bytes, as in `openssl speed`.
    pub fn to_json(&self) -> Value {
        let pair = |f: &dyn Fn(Op) -> Option<f64>| match (f(Op::Encrypt), f(Op::Decrypt)) {
            (Some(e), Some(d)) => json!({"encrypt": e, "decrypt": d}),
            _ => Value::Null,
        };
        json!({
            "implementation": self.implementation,
            "unit_size": self.unit_size,
            "seconds": self.seconds,
            "rounds": self.rounds,
            "threads": self.threads,
            "results": self.results.iter().map(|m| json!({
                "op": m.op.name(),
                "size": m.size,
                "threads": m.threads,
                "mb_per_s": m.mb_per_s(),
                "mb_per_cpu_s": m.mb_per_cpu_s(),
                "bytes": m.bytes,
                "elapsed_s": m.elapsed.as_secs_f64(),
                "cpu_s": m.cpu.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "openssl": self.openssl.as_ref().map(|o| json!({
                "version": o.version,
                "encrypt_mb_per_s": o.encrypt_mb_per_s,
                "decrypt_mb_per_s": o.decrypt_mb_per_s,
                "command": o.command,
            })),
            "openssl_note": self.openssl_note,
            "ratio_vs_openssl": pair(&|op| self.ratio_vs_openssl(op)),
            "scaling_2_threads": pair(&|op| self.scaling_2_threads(op)),
        })
    }
}

/// A fixed, obviously non-secret key (K1 != K2): the data is throwaway.
fn bench_key() -> [u8; 64] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
}

/// Times `op` on `size`-byte requests with `engine` for about `secs` seconds.
pub fn measure(
    engine: &SectorEngine,
    cipher: &XtsCipher,
    op: Op,
    size: usize,
    secs: f64,
) -> Result<Measurement, CryptoError> {
    let mut buf = vec![0x5au8; size];
    let once = |buf: &mut [u8]| match op {
        Op::Encrypt => engine.encrypt(cipher, 0x1234_5678, 0, buf),
        Op::Decrypt => engine.decrypt(cipher, 0x1234_5678, 0, buf, Holes::Decrypt),
    };
    // Warm-up: caches, pool threads, CPU clocks.
    let warm = Duration::from_secs_f64((secs * 0.1).min(0.2));
    let t0 = Instant::now();
    while t0.elapsed() < warm {
        once(&mut buf)?;
    }
    let target = Duration::from_secs_f64(secs);
    // Check the clock every ~1 MiB of work, so timing does not dominate 4 KiB requests.
    let batch = ((1 << 20) / size).max(1);
    let mut bytes = 0u64;
    let cpu0 = user_cpu_time();
    let start = Instant::now();
    loop {
        for _ in 0..batch {
            once(&mut buf)?;
        }
        bytes += (batch * size) as u64;
        let elapsed = start.elapsed();
        if elapsed >= target {
            return Ok(Measurement {
                op,
                size,
                threads: engine.threads(),
                bytes,
                elapsed,
                cpu: user_cpu_time().saturating_sub(cpu0),
            });
        }
    }
}

/// Runs `openssl speed -mr -evp aes-256-xts -bytes 4096 -seconds S [-decrypt]` and returns
/// its figure in MB/s. `-mr` output has a line `+F:<n>:AES-256-XTS:<bytes per second>`.
fn openssl_speed(seconds: u64, decrypt: bool) -> Result<f64, String> {
    let secs = seconds.to_string();
    let mut args = vec![
        "speed",
        "-mr",
        "-evp",
        "aes-256-xts",
        "-bytes",
        "4096",
        "-seconds",
        &secs,
    ];
    if decrypt {
        args.push("-decrypt");
    }
    let out = Command::new("openssl")
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_openssl_mr(&text).ok_or_else(|| {
        format!(
            "could not read `openssl speed` output (status {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// Parses the `+F:` line of `openssl speed -mr` into MB/s.
fn parse_openssl_mr(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("+F:"))?;
    let bps: f64 = line.rsplit(':').next()?.trim().parse().ok()?;
    (bps.is_finite() && bps > 0.0).then_some(bps / 1e6)
}

fn openssl_version() -> Result<String, String> {
    let out = Command::new("openssl")
        .arg("version")
        .output()
        .map_err(|e| format!("`openssl` not found ({e})"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs the whole sector benchmark; `progress` is called with a line of text before each
/// step (the CLI prints it to stderr).
///
/// Each round measures every (size, thread count, direction) of ours and then OpenSSL's
/// encrypt and decrypt; [`SectorBenchConfig::rounds`] rounds run back to back and the best
/// figure of each is kept (by throughput per CPU-second for the 1-thread 4 KiB figures, the
/// ones compared with OpenSSL; by wall-clock throughput for the others).
pub fn run_sectors(
    cfg: &SectorBenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<SectorReport, BenchError> {
    if !(cfg.seconds.is_finite() && cfg.seconds > 0.0) {
        return Err(BenchError::BadSeconds(cfg.seconds));
    }
    if cfg.rounds == 0 {
        return Err(BenchError::BadRounds);
    }
    let cipher = XtsCipher::new(&bench_key(), UNIT_SIZE)?;
    let many = SectorEngine::new(cfg.threads)?;
    let n = many.threads();
    let mut counts = vec![1, n];
    if n > 2 {
        counts.insert(1, 2);
    }
    counts.dedup();
    let engines = counts
        .iter()
        .map(|&t| {
            if t == n {
                Ok(None)
            } else {
                SectorEngine::new(t).map(Some)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    let version = if cfg.openssl {
        openssl_version()
    } else {
        Err("not requested".to_string())
    };
    let secs = (cfg.seconds.ceil() as u64).max(1);
    let mut openssl_err = version.as_ref().err().cloned();
    let mut theirs = [0f64; 2];
    let mut results: Vec<Measurement> = Vec::new();
    for round in 1..=cfg.rounds {
        for (&t, extra) in counts.iter().zip(&engines) {
            let engine = extra.as_ref().unwrap_or(&many);
            for size in SIZES {
                for op in [Op::Encrypt, Op::Decrypt] {
                    progress(&format!(
                        "round {round}: {} {} KiB, {t} thread(s)",
                        op.name(),
                        size / 1024
                    ));
                    let m = measure(engine, &cipher, op, size, cfg.seconds)?;
                    let rate = |m: &Measurement| {
                        if t == 1 && size == 4096 {
                            m.mb_per_cpu_s()
                        } else {
                            m.mb_per_s()
                        }
                    };
                    match results
                        .iter_mut()
                        .find(|b| b.op == op && b.size == size && b.threads == t)
                    {
                        Some(b) if rate(&m) > rate(b) => *b = m,
                        Some(_) => {}
                        None => results.push(m),
                    }
                }
            }
        }
        if openssl_err.is_none() {
            for (i, op) in [Op::Encrypt, Op::Decrypt].into_iter().enumerate() {
                progress(&format!("round {round}: openssl speed, {}", op.name()));
                match openssl_speed(secs, op == Op::Decrypt) {
                    Ok(v) => theirs[i] = theirs[i].max(v),
                    Err(e) => openssl_err = Some(e),
                }
            }
        }
    }
    let openssl = match (&version, &openssl_err) {
        (Ok(version), None) => Some(OpenSslFigure {
            version: version.clone(),
            encrypt_mb_per_s: theirs[0],
            decrypt_mb_per_s: theirs[1],
            command: format!(
                "openssl speed -mr -evp aes-256-xts -bytes 4096 -seconds {secs} [-decrypt]"
            ),
        }),
        _ => None,
    };
    Ok(SectorReport {
        implementation: cipher.implementation(),
        unit_size: UNIT_SIZE,
        seconds: cfg.seconds,
        rounds: cfg.rounds,
        threads: n,
        results,
        openssl,
        openssl_note: openssl_err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openssl_mr() {
        let out = "+DT:AES-256-XTS:1:4096\n+R:1:AES-256-XTS:1.000000\n+H:4096\n\
                   +F:25:AES-256-XTS:4068404851.61\n";
        let v = parse_openssl_mr(out).unwrap();
        assert!((v - 4068.40485161).abs() < 1e-6);
        assert_eq!(parse_openssl_mr("nothing here"), None);
        assert_eq!(parse_openssl_mr("+F:1:x:nan"), None);
    }

    #[test]
    fn tiny_run_produces_json() {
        let cfg = SectorBenchConfig {
            seconds: 0.01,
            threads: 2,
            openssl: false,
            rounds: 2,
        };
        let r = run_sectors(&cfg, |_| {}).unwrap();
        assert_eq!(r.results.len(), 12);
        assert!(r.results.iter().all(|m| m.mb_per_s() > 0.0));
        assert_eq!(r.openssl_note.as_deref(), Some("not requested"));
        assert!(r.scaling_2_threads(Op::Encrypt).is_some());
        let j = r.to_json();
        assert_eq!(j["unit_size"], 4096);
        assert_eq!(j["results"][0]["op"], "encrypt");
        assert!(j["ratio_vs_openssl"].is_null());
        assert!(j["scaling_2_threads"]["decrypt"].is_number());
    }

    #[test]
    fn rejects_bad_seconds() {
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let cfg = SectorBenchConfig {
                seconds: s,
                ..SectorBenchConfig::default()
            };
            assert!(matches!(
                run_sectors(&cfg, |_| {}),
                Err(BenchError::BadSeconds(_))
            ));
        }
        let cfg = SectorBenchConfig {
            rounds: 0,
            ..SectorBenchConfig::default()
        };
        assert!(matches!(
            run_sectors(&cfg, |_| {}),
            Err(BenchError::BadRounds)
        ));
    }
}
