//! `cmkfs init | mount | umount | info`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::fs::{CmkFs, FsOptions};
use crate::home::Home;
use crate::keyring::KeyringConfig;
use crate::monitor::{self, MonitorSinks, MountFacts};
use crate::mount::{self, MountConfig, RunRecord};
use crate::vault::{self, CreateKeyOptions, Credential, VaultError, WrapAlg};
use crate::volume::header::VolumeHeader;
use crate::volume::layout::Layout;
use crate::volume::lock::VolumeLock;
use crate::volume::{CreateOptions, Volume, DEFAULT_SECTOR_SIZE};

/// Set in the environment of the daemon that `cmkfs mount` starts: its stdout is a pipe on
/// which it reports `READY` or `ERROR: ...` once, then goes quiet.
const READY_ENV: &str = "CMKFS_DAEMON_READY_PIPE";
/// How long `cmkfs mount` waits for its daemon to be ready (vault calls included).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// `cmkfs init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Backing directory for the encrypted data (must be empty or absent).
    cipherdir: PathBuf,
    /// Vault key (KEK) that wraps the volume's DEK; created on first use.
    #[arg(long, default_value = "default")]
    key: String,
    /// RSA size when the key has to be created.
    #[arg(long, default_value_t = 3072, value_parser = parse_key_size)]
    key_size: u32,
    /// Vault URL: `local:`, `https://HOST:PORT` (credential from $CMKFS_HOME/credentials) or
    /// `pkcs11:/path/module.so?token=LABEL&pin-source=file:/path`.
    #[arg(long, default_value = "local:")]
    vault: String,
    /// Wrap algorithm when the key has to be created (RSA-OAEP for HSMs without SHA-2 OAEP).
    #[arg(long, default_value = "RSA-OAEP-256", value_parser = parse_alg)]
    alg: WrapAlg,
    /// XTS data unit (sector) size in bytes.
    #[arg(long, default_value_t = DEFAULT_SECTOR_SIZE, hide = true)]
    sector_size: u32,
    /// Print the new volume's info as JSON.
    #[arg(long)]
    json: bool,
    /// Bind the volume to this Disk Encryption Set: its key, identity and encryption type.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["key", "vault"])]
    des: Option<String>,
    /// On-disk format: 3 (default) puts each file's data at offset 4096, so every 4 KiB data
    /// unit is one page of the backing filesystem (fast random writes); 2 puts it right after
    /// the 32-byte file header: one backing block less per non-empty file, for trees of many
    /// tiny files. Fixed for the volume's life.
    #[arg(long, value_name = "VERSION", default_value = "3", value_parser = parse_format)]
    format: Layout,
}

fn parse_format(s: &str) -> Result<Layout, String> {
    match s {
        "3" => Ok(Layout::V3),
        "2" => Ok(Layout::V2),
        _ => Err(format!(
            "{s:?} is not a format cmkfs creates (3, the default, or 2)"
        )),
    }
}

fn parse_alg(s: &str) -> Result<WrapAlg, String> {
    s.parse().map_err(|e: VaultError| e.to_string())
}

fn parse_key_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (2048 | 3072 | 4096)) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a supported RSA size (2048, 3072 or 4096)"
        )),
    }
}

/// `cmkfs mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// Backing directory of the volume.
    cipherdir: PathBuf,
    /// Where the plaintext view appears (an existing directory).
    mountpoint: PathBuf,
    /// Stay in the foreground until unmounted (logs go to stderr).
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Allow other users to access the mount (kernel permission checks apply).
    #[arg(long)]
    allow_other: bool,
    /// FUSE worker threads (default: available cores, at least 2).
    #[arg(long)]
    threads: Option<usize>,
    /// Threads that encrypt and decrypt one large request (0 = available cores; 1 = the FUSE
    /// thread alone, no helper threads).
    #[arg(long, default_value_t = 0)]
    cipher_threads: usize,
    /// Re-validate the key with the vault this often (a real unwrap), e.g. 30s, 5m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    key_check_interval: Duration,
    /// How long an unreachable vault is tolerated before the volume is cut off; 0 = fail closed.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    grace_period: Duration,
    /// Longest a backup's write freeze holds the mount's writers without being renewed (the
    /// daemon lifts it then, so a stuck or killed `cmkfs backup` never leaves the mount
    /// frozen); `cmkfs backup` renews every second. At least 2s.
    #[arg(long, default_value = "30s", value_parser = parse_freeze_limit)]
    freeze_limit: Duration,
    /// Command run with `sh -c` on every state change, given the event as JSON on stdin.
    #[arg(long, value_name = "CMD")]
    on_state_change: Option<String>,
    /// Reach the vault as this identity (credential file from `cmkfs vault identity create`),
    /// so its access policies apply; the vault owner otherwise.
    #[arg(long, value_name = "FILE")]
    credential: Option<PathBuf>,
    /// Ignore the vault's push notifications and rely on periodic checks only.
    #[arg(long)]
    no_push: bool,
    /// Kernel readahead of the mount in KiB (sequential reads arrive as requests this large,
    /// up to 1 MiB); 0 keeps the kernel's default (128 KiB). Needs root.
    #[arg(long, value_name = "KIB", default_value_t = mount::DEFAULT_READAHEAD_KB)]
    readahead_kb: u32,
    /// Let the kernel cache writes and send them in large batches (FUSE writeback cache; the
    /// default): errors of cached writes then surface at fsync or close instead of at write
    /// (README, "Writes, errors and the writeback cache").
    #[arg(long, overrides_with = "no_writeback_cache")]
    writeback_cache: bool,
    /// Send every write to the daemon as it is made (no FUSE writeback cache): errors at
    /// write(2) itself, fewer bytes per request.
    #[arg(long, overrides_with = "writeback_cache")]
    no_writeback_cache: bool,
    /// Experimental: serve requests over FUSE io_uring queues (one per CPU) instead of
    /// read/write on /dev/fuse. Needs Linux 6.14+ with the fuse module parameter
    /// enable_uring set to Y.
    #[arg(long)]
    io_uring: bool,
    /// How long the kernel may cache names and attributes, e.g. 60s, 1s, 0. Changes made
    /// through the mount are always seen at once; a longer time only delays changes made to
    /// the backing directory behind the mount (another program or a sync client writing
    /// there): use 0 or 1s when that happens.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_cache_timeout)]
    cache_timeout: Duration,
}

impl MountArgs {
    /// Whether this process is (or becomes) the mount daemon.
    pub(crate) fn is_foreground(&self) -> bool {
        self.foreground
    }

    /// Whether the kernel's writeback cache is offered: unless `--no-writeback-cache` came
    /// last (the two switches override each other; on by default).
    fn writeback_cache(&self) -> bool {
        self.writeback_cache || !self.no_writeback_cache
    }
}

/// Durations as `30s`, `5m`, `1h`, or a plain number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 1h ({e})"))
}

/// `--cache-timeout`: a duration of at most an hour (the kernel counts it in whole seconds
/// plus nanoseconds; longer buys nothing, as every entry is revalidated after it anyway).
fn parse_cache_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > Duration::from_secs(3600) {
        return Err(format!(
            "{s:?} is too long: a cache timeout is at most 1h (use 0 to turn the cache off)"
        ));
    }
    Ok(d)
}

/// `--freeze-limit`: a duration of at least 2 s (`cmkfs backup` renews every second).
fn parse_freeze_limit(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) {
        return Err(format!(
            "{s:?} is too short: a freeze limit is at least 2s (a backup renews its freeze \
             every second)"
        ));
    }
    Ok(d)
}

/// `cmkfs umount`.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Mountpoint of a cmkfs volume.
    mountpoint: PathBuf,
    /// Detach now even if files are open (the mount goes away when they close).
    #[arg(long, short = 'l')]
    lazy: bool,
}

/// `cmkfs info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Backing directory of the volume.
    cipherdir: PathBuf,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub fn init(a: InitArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    // Refuse a bad target before the vault is touched (no key created for nothing).
    let existed = Volume::check_new_dir(&a.cipherdir)?;
    // cmkfs runs with umask 077 for its own state; a backing directory it creates gets the
    // mode the user's umask gives (the mounted root shows it).
    let user_mode = || {
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            let mode = 0o777 & !crate::process::user_umask();
            std::fs::set_permissions(&a.cipherdir, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", a.cipherdir.display()))
        } else {
            Ok(())
        }
    };
    if let Some(des) = &a.des {
        let header = crate::des::init_volume(&home, des, &a.cipherdir, a.sector_size, a.format)?;
        user_mode()?;
        return print_init(&a, &header);
    }
    if a.key == crate::des::PLATFORM_KEY {
        bail!("{} is cmkfs's platform key (it wraps only the inner key of double-encrypted volumes); choose another --key", a.key);
    }
    let v = vault::open_or_create(&a.vault, &home)?;
    // The key decides the wrap algorithm (HSMs without SHA-2 OAEP use RSA-OAEP).
    let wrap_alg = match v.get_key(&a.key, None) {
        Ok(k) => k.wrap_alg,
        Err(VaultError::NotFound(_)) => {
            let k = v
                .create_key(
                    &a.key,
                    &CreateKeyOptions {
                        key_size: a.key_size,
                        wrap_alg: a.alg,
                    },
                )
                .with_context(|| format!("creating key {:?}", a.key))?;
            eprintln!(
                "created vault key {} (RSA {}, {})",
                k.kid, k.key_size, k.wrap_alg
            );
            k.wrap_alg
        }
        Err(e) => return Err(e).with_context(|| format!("looking up key {:?}", a.key)),
    };
    let header = Volume::create(
        &a.cipherdir,
        v.as_ref(),
        &CreateOptions {
            key_name: a.key.clone(),
            key_version: None,
            wrap_alg,
            sector_size: a.sector_size,
            des: None,
            layout: a.format,
        },
    )?;
    user_mode()?;
    print_init(&a, &header)
}

fn print_init(a: &InitArgs, header: &VolumeHeader) -> anyhow::Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info_json(header))?);
    } else {
        println!(
            "initialized volume {} in {}\n  DEK wrapped by {} ({})",
            header.volume_id,
            a.cipherdir.display(),
            header.key_id,
            header.wrap_alg
        );
        if let Some(p) = &header.platform {
            println!(
                "  inner DEK wrapped by platform key {} ({})",
                p.key_id, p.wrap_alg
            );
        }
        if let Some(d) = &header.des {
            println!("  Disk Encryption Set {d}");
        }
    }
    Ok(())
}

fn info_json(h: &VolumeHeader) -> serde_json::Value {
    serde_json::json!({
        "volume_id": h.volume_id,
        "format_version": h.format_version,
        "created": h.created,
        "cipher": h.cipher,
        "sector_size": h.sector_size,
        "name_cipher": h.name_cipher,
        "key_id": h.key_id,
        "wrap_alg": h.wrap_alg,
        "dek_fingerprint": h.dek_fingerprint,
        "des": h.des,
        "platform_key_id": h.platform.as_ref().map(|p| &p.key_id),
        "mac_version": h.mac_version,
    })
}

pub fn info(a: InfoArgs) -> anyhow::Result<()> {
    let h = VolumeHeader::read(&a.cipherdir)?;
    crate::unlock::check_configured(&Home::from_env(), &h)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info_json(&h))?);
    } else {
        println!("volume       {}", h.volume_id);
        println!("format       {} v{}", h.format, h.format_version);
        println!(
            "cipher       {} ({}-byte sectors), names {}",
            h.cipher, h.sector_size, h.name_cipher
        );
        println!("key          {}", h.key_id);
        println!("wrap         {}", h.wrap_alg);
        println!("fingerprint  {}", h.dek_fingerprint);
        if let Some(d) = &h.des {
            println!("des          {d}");
        }
        if let Some(p) = &h.platform {
            println!(
                "platform     {} ({}; double encryption)",
                p.key_id, p.wrap_alg
            );
        }
    }
    Ok(())
}

pub fn umount(a: UmountArgs) -> anyhow::Result<()> {
    mount::unmount(
        &Home::from_env(),
        &a.mountpoint,
        a.lazy,
        Duration::from_secs(30),
    )?;
    Ok(())
}

pub fn mount(a: MountArgs) -> anyhow::Result<()> {
    if a.io_uring && !mount::io_uring_enabled() {
        bail!(
            "--io-uring: the kernel does not offer FUSE over io_uring ({} is not Y; it needs \
             Linux 6.14+ with CONFIG_FUSE_IO_URING; as root: echo Y > {})",
            mount::ENABLE_URING_PARAM,
            mount::ENABLE_URING_PARAM
        );
    }
    if a.foreground {
        return run_foreground(a);
    }
    // Catch the obvious mistakes here, before a daemon exists.
    mount::check_mountpoint(&a.mountpoint)?;
    mount::check_separate(&a.cipherdir, &a.mountpoint)?;
    let header = VolumeHeader::read(&a.cipherdir)?;
    crate::unlock::check_configured(&Home::from_env(), &header)?;
    let home = Home::from_env();
    refuse_second_mount(&a.cipherdir, &home)?;
    crate::fsutil::create_private_dir(&home.run_dir()).context("creating the run directory")?;
    let mp = std::fs::canonicalize(&a.mountpoint)?;
    let log_path = home.run_dir().join(format!(
        "mount-{}.log",
        hex::encode(
            &<sha2::Sha256 as sha2::Digest>::digest(mp.as_os_str().as_encoded_bytes())[..8]
        )
    ));
    let log = crate::fsutil::open_private_append(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    // An old volume is converted here, in the foreground (progress on the terminal, no
    // daemon start-up time limit), with its log lines in the mount's log.
    if crate::volume::upgrade::needed(&a.cipherdir, &header) {
        if let Ok(writer) = log.try_clone() {
            let _ = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(writer))
                .try_init();
        }
        // The terminal may see plaintext paths; the log gets backing paths only.
        drop(upgrade_before_mount(&a, &|user, log| {
            eprintln!("cmkfs: {user}");
            tracing::warn!("{log}");
        })?);
    }
    spawn_daemon(&a, mp, log, &log_path)
}

/// Refuses to mount a volume that is already mounted (by this or another `CMKFS_HOME`): two
/// daemons each cache file headers and take their own per-file locks, so a truncate through
/// one and a write through the other can leave a file without its header (data lost).
fn refuse_second_mount(cipherdir: &Path, home: &Home) -> anyhow::Result<()> {
    let root =
        std::fs::canonicalize(cipherdir).with_context(|| format!("{}", cipherdir.display()))?;
    if let Some((mountpoint, pid)) = crate::fsck::find_mount(&root, home) {
        let by = if pid == 0 {
            String::new()
        } else {
            format!(" (daemon {pid})")
        };
        bail!(
            "{} is already mounted at {}{by}; a volume can be mounted only once at a time \
             (use that mount, or unmount it first)",
            root.display(),
            mountpoint.display()
        );
    }
    Ok(())
}

/// Converts an old volume (or finishes an interrupted conversion) before it is mounted;
/// returns the volume lock, held exclusively. `say(user, log)` tells the user and the mount's
/// log (one line per call): the same line, except that the log's names no plaintext path.
fn upgrade_before_mount(a: &MountArgs, say: &dyn Fn(&str, &str)) -> anyhow::Result<VolumeLock> {
    let say_both = |line: &str| say(line, line);
    let home = Home::from_env();
    let root = std::fs::canonicalize(&a.cipherdir)
        .with_context(|| format!("{}", a.cipherdir.display()))?;
    if let Some((mountpoint, pid)) = crate::fsck::find_mount(&root, &home) {
        bail!(
            "{} needs a format upgrade but is mounted at {} (daemon {pid}); unmount it first",
            root.display(),
            mountpoint.display()
        );
    }
    let lock = VolumeLock::exclusive(&root)?;
    let header = VolumeHeader::read(&root)?;
    if !crate::volume::upgrade::needed(&root, &header) {
        return Ok(lock); // someone else finished it meanwhile
    }
    // A damaged journal is refused before anything is said or done.
    crate::volume::upgrade::pending_journal(&root, &header)?;
    if header.format_version < crate::volume::header::FORMAT_V2 {
        say_both(&format!(
            "{} is on-disk format v{}: converting it in place to format v{} before mounting \
             (one time; the same as `cmkfs upgrade`)",
            root.display(),
            header.format_version,
            crate::volume::header::FORMAT_V2
        ));
    } else {
        say_both(&format!(
            "{}: an upgrade of it was interrupted; finishing it before mounting",
            root.display()
        ));
    }
    let (vault, _) = volume_vault(&home, &header, a.credential.as_deref())?;
    let report = super::upgrade::convert(&root, &lock, vault.as_ref(), &header, true)?;
    say_both(&super::upgrade::summary(&report));
    for z in &report.zero_tails {
        let line = |p: &std::path::Path| {
            format!(
                "  {}: last {} bytes (offset {}) {}",
                p.display(),
                z.len,
                z.offset,
                match z.decision {
                    crate::volume::v1::TailDecision::Data =>
                        "recovered (format v1 read them as zeros)",
                    crate::volume::v1::TailDecision::Hole => "kept as zeros (a hole)",
                }
            )
        };
        say(
            &line(z.plaintext.as_ref().unwrap_or(&z.backing)),
            &line(&z.backing),
        );
    }
    Ok(lock)
}

fn spawn_daemon(
    a: &MountArgs,
    mp: PathBuf,
    log: std::fs::File,
    log_path: &std::path::Path,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(std::env::current_exe().context("locating the cmkfs executable")?);
    cmd.arg("mount")
        .arg(&a.cipherdir)
        .arg(&a.mountpoint)
        .arg("--foreground");
    if a.allow_other {
        cmd.arg("--allow-other");
    }
    if let Some(t) = a.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    cmd.arg("--cipher-threads")
        .arg(a.cipher_threads.to_string());
    cmd.arg("--key-check-interval")
        .arg(format!("{}ms", a.key_check_interval.as_millis()));
    cmd.arg("--grace-period")
        .arg(format!("{}ms", a.grace_period.as_millis()));
    cmd.arg("--freeze-limit")
        .arg(format!("{}ms", a.freeze_limit.as_millis()));
    if let Some(h) = &a.on_state_change {
        cmd.arg("--on-state-change").arg(h);
    }
    if a.no_push {
        cmd.arg("--no-push");
    }
    cmd.arg("--readahead-kb").arg(a.readahead_kb.to_string());
    cmd.arg(if a.writeback_cache() {
        "--writeback-cache"
    } else {
        "--no-writeback-cache"
    });
    if a.io_uring {
        cmd.arg("--io-uring");
    }
    cmd.arg("--cache-timeout")
        .arg(format!("{}ms", a.cache_timeout.as_millis()));
    if let Some(c) = &a.credential {
        cmd.arg("--credential")
            .arg(std::fs::canonicalize(c).with_context(|| format!("credential {}", c.display()))?);
    }
    cmd.env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal/session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    // A sealed embedded vault is unsealed here, where a terminal may be, and the key handed
    // to the daemon (which has none); failures are left for the daemon to report.
    let _key_pipe = hand_vault_key(&Home::from_env(), &a.cipherdir, &mut cmd);
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    drop(_key_pipe);
    let stdout = child.stdout.take().context("daemon stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) if line.trim() == "READY" => {
            println!("mounted {} at {}", a.cipherdir.display(), mp.display());
            Ok(())
        }
        Ok(line) if line.starts_with("ERROR: ") => bail!("{}", line["ERROR: ".len()..].trim()),
        Ok(_) => {
            let status = child.wait().ok();
            bail!(
                "the mount daemon exited before the mount was ready ({}); see {}",
                status.map(|s| s.to_string()).unwrap_or_default(),
                log_path.display()
            )
        }
        Err(_) => {
            let _ = child.kill();
            bail!(
                "the mount daemon was not ready after {}s; see {}",
                READY_TIMEOUT.as_secs(),
                log_path.display()
            )
        }
    }
}

/// Unseals the home's embedded vault when the volume may need it, and hands the master key
/// to the daemon `cmd` starts (see `unlock::hand_to_child`).
fn hand_vault_key(
    home: &Home,
    cipherdir: &std::path::Path,
    cmd: &mut Command,
) -> Option<std::os::fd::OwnedFd> {
    use crate::vault::local::{seal, unlock};
    let header = VolumeHeader::read(cipherdir).ok()?;
    let local = header.key_id.starts_with(vault::local::URL)
        || header.platform.is_some()
        || header.des.is_some();
    if !local {
        return None;
    }
    // No vault at all: the daemon says so (one line), nothing to warn about.
    if !home.vault_dir().join("vault.json").exists() {
        return None;
    }
    if matches!(seal::read_record(&home.vault_dir()), Ok(None))
        && header.key_id.starts_with(vault::local::URL)
    {
        // A sealed store that lost seal.json is no legacy one: the daemon says what is wrong.
        if seal::check_seal_not_lost(&home.vault_dir()).is_err() {
            return None;
        }
        eprintln!(
            "cmkfs: warning: the vault {} is not sealed (its keys are stored in clear): run `cmkfs vault seal`",
            home.vault_dir().display()
        );
        return None;
    }
    let mk = seal::master_key(&home.vault_dir()).ok()??;
    unlock::hand_to_child(cmd, &mk).ok()
}

fn run_foreground(a: MountArgs) -> anyhow::Result<()> {
    let ready_pipe = std::env::var_os(READY_ENV).is_some();
    init_logging();
    match serve(&a, ready_pipe) {
        Ok(()) => Ok(()),
        Err(e) if ready_pipe => {
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            tracing::error!("{msg}");
            let _ = writeln!(std::io::stdout(), "ERROR: {msg}");
            std::process::exit(1);
        }
        Err(e) => Err(e),
    }
}

fn serve(a: &MountArgs, ready_pipe: bool) -> anyhow::Result<()> {
    let home = Home::from_env();
    let mp = mount::check_mountpoint(&a.mountpoint)?;
    mount::check_separate(&a.cipherdir, &mp)?;
    mount::unmount_on_signal(mp.clone())?;
    let header = VolumeHeader::read(&a.cipherdir)?;
    // Held for the whole mount: no upgrade can start under it. An old volume is converted
    // first (a daemonized mount's parent has normally done that already).
    let mut lock = if crate::volume::upgrade::needed(&a.cipherdir, &header) {
        upgrade_before_mount(a, &|_, log| tracing::warn!("{log}"))?
    } else {
        VolumeLock::shared(&a.cipherdir)?
    };
    if lock.is_exclusive() {
        lock.downgrade()?;
    }
    // Again here: the foreground path starts here, and another mount may have won a race.
    refuse_second_mount(&a.cipherdir, &home)?;
    let header = VolumeHeader::read(&a.cipherdir)?;
    let (vault, identity) = volume_vault(&home, &header, a.credential.as_deref())?;
    let vault_push = if a.no_push { None } else { vault.watch() };
    let push_on = vault_push.is_some();
    // Also wake on a rewrite of our own header (a `des update` rewrap by another process),
    // so the mount picks up the new key version at once rather than at its next check.
    let header_watch =
        crate::vault::watch::watch_file(&a.cipherdir.join(crate::volume::header::HEADER_FILE))
            .map_err(|e| tracing::warn!(error = %e, "cannot watch the volume header"))
            .ok();
    let wakeups: Vec<_> = vault_push.into_iter().chain(header_watch).collect();
    let push = (!wakeups.is_empty()).then(|| crate::vault::watch::merge(wakeups));
    let kcfg = KeyringConfig {
        check_interval: a.key_check_interval,
        grace: a.grace_period,
    };
    // Everything in the header is authenticated here, before it is acted on (src/unlock.rs).
    let (keyring, header, handle) =
        crate::unlock::unlock_with_handle(&home, vault, &a.cipherdir, &header, kcfg)?;
    let keyring = Arc::new(keyring);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let vol = Arc::new(Volume::open(
        &a.cipherdir,
        header.clone(),
        keyring.clone(),
        a.cipher_threads,
    )?);
    // Another volume's valid header copied over this one's unwraps fine: the names tell,
    // before anything is written (a re-encryption's recovery included).
    vol.check_root_names()?;
    // An interrupted re-encryption: its names phase and its last batch are finished before
    // anything is served (the rest resumes with `cmkfs volume reencrypt`).
    if header.retiring.is_some() {
        let access = crate::unlock::ReencryptAccess::new(&home, keyring.vault(), handle.clone())?;
        let r = crate::volume::reencrypt::Session::new(&vol, &access, None, Default::default())
            .recover()
            .context("finishing the interrupted step of a re-encryption")?;
        tracing::warn!(
            names = r.names,
            ranges = r.ranges_restored,
            "a re-encryption of this volume is in progress (key generation {}); it resumes with `cmkfs volume reencrypt`",
            header.key_generation
        );
    }
    let cipherdir = vol.root().to_path_buf();
    let fs = CmkFs::with_options(
        vol,
        FsOptions {
            writeback_cache: a.writeback_cache(),
            io_uring: a.io_uring,
            cache_timeout: Some(a.cache_timeout),
        },
    );
    let table = fs.node_table();
    let online = fs.online();
    let cfg = MountConfig {
        fuse_threads: a.threads.unwrap_or(cores.max(2)),
        allow_other: a.allow_other,
        readahead_kb: a.readahead_kb,
    };
    let session = mount::mount(fs, &mp, &cfg)?;
    let record = RunRecord {
        pid: std::process::id(),
        mountpoint: mp.clone(),
        cipherdir: cipherdir.clone(),
        volume_id: header.volume_id.clone(),
        key_id: header.key_id.clone(),
        started: crate::volume::unix_now(),
        identity,
    };
    let ids_lost = RunRecord::ids_lost_path(&home, &mp);
    let _ = std::fs::remove_file(&ids_lost);
    if let Err(e) = record.save(&home) {
        tracing::warn!(error = %e, "could not write the run record");
    }
    let facts = MountFacts {
        mountpoint: mp.clone(),
        cipherdir: cipherdir.clone(),
        volume_id: header.volume_id.clone(),
        pid: std::process::id(),
        push: push_on,
    };
    let sinks = MonitorSinks {
        status_path: RunRecord::status_path(&home, &mp),
        events_path: home.events_path(),
        on_state_change: a.on_state_change.clone(),
    };
    let notifier = session.notifier();
    let ids_vol = online.volume().clone();
    online.set_notifier(session.notifier());
    let cut_vol = online.volume().clone();
    let cut_off = Box::new(move || {
        // A backup's freeze would hold the WRITEs of the dirty pages this invalidates.
        cut_vol.gates().lift_freezes();
        let (inodes, entries) = crate::fs::invalidate_kernel_caches(&table, &notifier);
        tracing::warn!(inodes, entries, "kernel caches invalidated");
    });
    crate::process::raise_open_files();
    // Online re-encryption and backup freezes reach the mount through its control socket.
    let control_path = crate::control::socket_path(&home, &mp);
    if let Err(e) = crate::control::spawn(
        control_path.clone(),
        crate::control::Control {
            home: home.clone(),
            keyring: keyring.clone(),
            handle,
            online,
            freeze_limit: a.freeze_limit,
            mountpoint: mp.clone(),
        },
    ) {
        tracing::warn!(error = %e, "no control socket: online re-encryption and frozen backups are not available");
    }
    let monitor = monitor::spawn(keyring, facts, sinks, ids_vol.id_health(), push, cut_off)?;
    tracing::info!(cipherdir = %cipherdir.display(), mountpoint = %mp.display(), "mounted");
    if ready_pipe {
        announce_ready();
    }
    // Backing entries get exactly the modes the kernel asks for (it applied the caller's
    // umask already): the FUSE threads, started by `run`, work under umask 0. Everything this
    // process wrote so far, and the monitor thread (its own umask), stays private.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    let result = session.run();
    // The unmount flushed the pending directory ids (`CmkFs::destroy`); one last try of any
    // whose fsync failed, and what is still not durable is left for `cmkfs umount` to say.
    let ids = ids_vol.flush_ids().err().map(|e| {
        let why = format!("directory ids not made durable at unmount: {e}");
        tracing::error!("{why}");
        // Not fsynced: it is for the `cmkfs umount` waiting now, and the disk may be failing.
        if let Err(e) = crate::fsutil::replace_private(&ids_lost, why.as_bytes()) {
            tracing::warn!(error = %e, "could not leave the unmount's error for `cmkfs umount`");
        }
        why
    });
    monitor.stop();
    RunRecord::remove(&home, &mp);
    let _ = std::fs::remove_file(&control_path);
    drop(lock);
    tracing::info!(
        mountpoint = %mp.display(),
        io_uring_requests = fuser::uring_requests_served(),
        "unmounted"
    );
    result.with_context(|| format!("FUSE session at {}", mp.display()))?;
    match ids {
        Some(why) => bail!("{} was unmounted, but {why}", mp.display()),
        None => Ok(()),
    }
}

/// The vault connection that unwraps `header`'s DEK, and the identity it acts as (`None`: the
/// vault owner): the identity of `credential` when given, else the volume's DES identity
/// (issue 4 item 7), else the owner. Mounts and `cmkfs fsck` both reach the vault this way.
pub(crate) fn volume_vault(
    home: &Home,
    header: &VolumeHeader,
    credential: Option<&std::path::Path>,
) -> anyhow::Result<(Box<dyn vault::Vault>, Option<String>)> {
    let kid = header.key_id()?;
    Ok(match credential {
        Some(path) => {
            let cred = Credential::load(path)?;
            if cred.vault != kid.vault {
                bail!(
                    "credential {} is for vault {:?}, but the volume's key is in {:?}",
                    path.display(),
                    cred.vault,
                    kid.vault
                );
            }
            (
                vault::open_with_credential(home, &cred)?,
                Some(cred.identity.clone()),
            )
        }
        None => match crate::des::mount_vault(home, header)? {
            Some((v, identity)) => (v, Some(identity)),
            None => (vault::open(&kid.vault, home)?, None),
        },
    })
}

/// Tells `cmkfs mount` we are up, then points stdout at /dev/null so that nothing later can
/// fail on the closed pipe.
fn announce_ready() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both descriptors are valid; dup2 atomically replaces fd 1.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn init_logging() {
    // fuser's own messages name requests' file names in plaintext (its debug lines, and its
    // "[Not Implemented]" warnings): whatever $CMKFS_LOG asks, they stay at error (the mount
    // log must never hold a plaintext name).
    let filter = tracing_subscriber::EnvFilter::try_from_env("CMKFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(
            "fuser=error"
                .parse()
                .expect("a constant, valid filter directive"),
        );
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}
