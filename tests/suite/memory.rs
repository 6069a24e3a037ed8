//! The mount daemon's memory (issue 11, finding 4), for each vault backend: while mounted the
//! keys are in locked pages (VmLck > 0), the daemon (and the vault server) cannot dump core
//! (RLIMIT_CORE 0, read from `/proc/PID/limits`) and the daemon is not dumpable (its status
//! says so: as root, `/proc` cannot tell); after revocation a scan of every readable page of
//! the daemon (`/proc/PID/mem`, as root: CAP_SYS_PTRACE passes the non-dumpable protection)
//! finds neither half of the DEK, nor the name key, nor the base64url DEK an HTTPS vault
//! answered with.
//!
//! The test learns the DEK the way the key owner could: by unwrapping the header through the
//! vault itself. Before revoking, the same scan must find the live key (a positive control:
//! the scanner sees locked, undumpable pages of a non-dumpable process).

use crate::common;
use crate::vault_support;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cmkfs::crypto::Dek;
use cmkfs::vault::local::{LocalVault, PolicyScope};
use cmkfs::vault::{CreateKeyOptions, KeyId, KeyUpdate, Permission, Vault, WrapAlg};
use cmkfs::volume::header::VolumeHeader;
use common::*;

const GUARD: Duration = Duration::from_secs(60);

/// Byte strings that must not outlive revocation, by name.
fn secrets_of(dek: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // 16-byte pieces: the review found 16 bytes of K1 on a thread stack.
    for (name, key) in [("K1", &dek[..32]), ("K2", &dek[32..])] {
        for (i, piece) in key.chunks(16).enumerate() {
            out.push((format!("{name}[{}..]", i * 16), piece.to_vec()));
        }
    }
    let names = Dek::from_slice(dek).unwrap().derive::<64>("names");
    for (i, piece) in names.chunks(16).enumerate() {
        out.push((format!("name key[{}..]", i * 16), piece.to_vec()));
    }
    let b64 = URL_SAFE_NO_PAD.encode(dek);
    out.push(("base64url DEK".into(), b64.as_bytes().to_vec()));
    for (i, half) in b64.as_bytes().chunks(43).enumerate() {
        out.push((format!("base64url DEK half {i}"), half.to_vec()));
    }
    out
}

/// Every needle found in the readable memory of `pid`, with the mapping it is in. Reads
/// `/proc/PID/mem` (root: CAP_SYS_PTRACE passes the non-dumpable process's protection).
/// Read-only file mappings (code, constants from disk) cannot hold runtime secrets: skipped.
pub(crate) fn scan(pid: u32, needles: &[(String, Vec<u8>)]) -> Vec<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let finders: Vec<_> = needles
        .iter()
        .map(|(n, b)| (n.clone(), memchr::memmem::Finder::new(b).into_owned()))
        .collect();
    let overlap = needles.iter().map(|(_, b)| b.len()).max().unwrap_or(1) - 1;
    let mut found = BTreeSet::new();
    let mut scanned = 0u64;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (f[0], f[1]);
        let what = f.get(5).copied().unwrap_or("[anon]");
        if !perms.starts_with('r') || what.starts_with("[v") {
            continue;
        }
        if !perms.contains('w') && what.starts_with('/') {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut pos = start;
        let mut buf = vec![0u8; 4 << 20];
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            if mem.seek(SeekFrom::Start(pos)).is_err() {
                break;
            }
            let n = match mem.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            scanned += n as u64;
            for (name, finder) in &finders {
                if let Some(at) = finder.find(&buf[..n]) {
                    let addr = pos + at as u64;
                    found.insert(format!(
                        "{name} at {addr:#x} in {what} ({perms}, {start:#x}-{end:#x}){}",
                        thread_near(pid, start, end, addr)
                    ));
                }
            }
            if pos + n as u64 >= end {
                break;
            }
            pos += (n - overlap.min(n - 1)) as u64;
        }
    }
    println!("scanned {} MiB of pid {pid}", scanned >> 20);
    found.into_iter().collect()
}

/// Which thread's stack a mapping is, if any (its stack pointer lies in it), and how far
/// below that pointer `addr` is (dead frames lie below it).
fn thread_near(pid: u32, start: u64, end: u64, addr: u64) -> String {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let sp = fs::read_to_string(dir.join("syscall"))
            .ok()
            .and_then(|s| {
                let f: Vec<&str> = s.split_whitespace().collect();
                f.len()
                    .checked_sub(2)
                    .and_then(|i| f.get(i).copied())
                    .map(str::to_string)
            })
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
        if let Some(sp) = sp {
            if (start..end).contains(&sp) {
                let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
                return format!(
                    ", stack of thread {:?}, {} bytes below its stack pointer",
                    comm.trim(),
                    sp as i64 - addr as i64
                );
            }
        }
    }
    String::new()
}

fn status_line(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn vm_lck_kb(pid: u32) -> u64 {
    status_line(pid, "VmLck:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// Soft and hard core size limits of `pid`.
fn core_limits(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why `pid` could leave its memory in a core file: RLIMIT_CORE above 0 (read from outside).
fn core_problems(what: &str, pid: u32) -> Vec<String> {
    let limits = core_limits(pid);
    if limits == "0 0" {
        Vec::new()
    } else {
        vec![format!("{what}: core dumps allowed (RLIMIT_CORE {limits})")]
    }
}

/// What the daemon reports of its own memory protections in its status (`dumpable` can only
/// be read from inside: as root, `/proc` looks the same either way).
fn status_problems(env: &Env) -> Vec<String> {
    let out = env.cmkfs(&[
        std::ffi::OsStr::new("status"),
        env.mnt.as_os_str(),
        std::ffi::OsStr::new("--json"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    let m = &v["memory"];
    let mut out = Vec::new();
    if m["dumpable"] != false {
        out.push(format!("mount daemon: dumpable (status memory: {m})"));
    }
    if m["core_dumps"] != false {
        out.push(format!("mount daemon: core dumps on (status memory: {m})"));
    }
    if m["locked_bytes"].as_u64().unwrap_or(0) == 0 {
        out.push(format!("mount daemon: no keys locked (status memory: {m})"));
    }
    out
}

fn state(env: &Env) -> String {
    let out = env.cmkfs(&[
        std::ffi::OsStr::new("status"),
        env.mnt.as_os_str(),
        std::ffi::OsStr::new("--json"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["state"].as_str().unwrap_or("").to_string()
}

/// Exercises every key: data through the inline and the parallel sector paths, names (short
/// and long), symlink targets, directory listings.
fn workload(m: &Mount) {
    let d = m.path("a-directory");
    fs::create_dir(&d).unwrap();
    for i in 0..20 {
        write(
            &d.join(format!("file-{i}.txt")),
            format!("secret {i}\n").as_bytes(),
        );
    }
    let big: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i * 31 % 251) as u8).collect();
    write(&m.path("big"), &big);
    write(&m.path(format!("{}.long", "n".repeat(200))), b"long name");
    std::os::unix::fs::symlink("somewhere/secret", m.path("link")).unwrap();
    assert_eq!(read(&m.path("big")), big);
    assert_eq!(fs::read_dir(&d).unwrap().count(), 20);
    let _ = fs::read_link(m.path("link")).unwrap();
}

/// The checks every backend gets: hardened and locked while mounted, key visible before the
/// revocation (positive control), gone after it. Every problem is collected, then reported
/// at once.
fn check_daemon(env: &Env, m: &Mount, dek: &[u8], extra: Vec<String>, revoke: &dyn Fn()) {
    let pid = daemon_pids_of(&env.home, &env.mnt)[0] as u32;
    let mut problems = extra;
    workload(m);
    let lck = vm_lck_kb(pid);
    println!("daemon {pid}: VmLck {lck} kB");
    if lck == 0 {
        problems.push("the mount daemon holds no locked memory (VmLck 0 kB)".into());
    }
    problems.extend(core_problems("mount daemon", pid));
    problems.extend(status_problems(env));
    let needles = secrets_of(dek);
    let before = scan(pid, &needles);
    assert!(
        before.iter().any(|f| f.starts_with("K1")),
        "positive control: the live key was not found in the daemon's memory: {before:#?}"
    );

    revoke();
    assert!(
        wait_until(GUARD, || state(env) == "Inaccessible"),
        "the mount was not cut off"
    );
    assert!(fs::read(m.path("big")).is_err());
    let _ = fs::read_dir(m.path("a-directory")).map(|r| r.count());
    // Requests in flight at the revocation finish and drop their keys; give them a moment.
    std::thread::sleep(Duration::from_millis(500));
    let after = scan(pid, &needles);
    problems.extend(after.into_iter().map(|f| format!("after revocation: {f}")));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn dek_of(header: &VolumeHeader, vault: &dyn Vault, as_local: bool) -> Vec<u8> {
    let mut kid = header.key_id().unwrap();
    if as_local {
        kid = KeyId {
            vault: "local:".into(),
            ..kid
        };
    }
    vault
        .unwrap_key(&kid, header.wrap_alg, &header.wrapped().unwrap())
        .unwrap()
        .to_vec()
}

#[test]
fn local_vault_keys_leave_the_daemon_on_revocation() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "2s"]);
    let owner = LocalVault::open(&env.home.join("vault")).unwrap();
    let dek = dek_of(&VolumeHeader::read(&env.cipher).unwrap(), &owner, false);
    check_daemon(&env, &m, &dek, Vec::new(), &|| {
        env.cmkfs(&["vault", "key", "update", "default", "--disable"])
            .assert_ok();
    });
    drop(m);
}

#[test]
fn https_vault_keys_leave_the_daemon_on_revocation() {
    let env = Env::new();
    let host = env.dir("vault-host");
    let owner = LocalVault::open(&host.join("vault")).unwrap();
    owner
        .create_key(
            "kek",
            &CreateKeyOptions {
                key_size: 2048,
                wrap_alg: WrapAlg::RsaOaep256,
            },
        )
        .unwrap();
    let server = vault_support::ServerProc::start(&host, 0);
    let cred = env.home.join("credentials/mnt.json");
    fs::create_dir_all(cred.parent().unwrap()).unwrap();
    let mut cmd = Command::new(vault_support::bin());
    vault_support::passphrase_env(&mut cmd, &host);
    let out = cmd
        .args([
            "vault",
            "identity",
            "create",
            "mnt",
            "--server-url",
            &server.url,
        ])
        .arg("--credential-file")
        .arg(&cred)
        .env("CMKFS_HOME", &host)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    owner
        .set_policy(
            "mnt",
            &PolicyScope::Key("kek".into()),
            &[Permission::Get, Permission::WrapKey, Permission::UnwrapKey],
        )
        .unwrap();
    let added = env.cmkfs(&["vault", "add", "keyserver", &server.url]);
    // (A release without `vault add` trusts any URL: nothing to configure there.)
    assert!(
        added.ok() || added.stderr.contains("unrecognized subcommand"),
        "{added}"
    );
    env.init_with(&env.cipher, &["--vault", &server.url, "--key", "kek"]);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "2s"]);
    let dek = dek_of(&VolumeHeader::read(&env.cipher).unwrap(), &owner, true);
    let server_problems = core_problems("vault server", server.pid());
    check_daemon(&env, &m, &dek, server_problems, &|| {
        owner
            .update_key(
                "kek",
                None,
                &KeyUpdate {
                    enabled: Some(false),
                    ..Default::default()
                },
            )
            .unwrap();
    });
    drop(m);
    drop(server);
}

#[test]
fn pkcs11_vault_keys_leave_the_daemon_on_revocation() {
    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    assert!(
        Path::new(MODULE).exists(),
        "{MODULE} is missing: install softhsm2 (scripts/test.sh does)"
    );
    let env = Env::new();
    let hsm = env.dir("hsm");
    fs::create_dir(hsm.join("tokens")).unwrap();
    let conf = hsm.join("softhsm2.conf");
    fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            hsm.join("tokens").display()
        ),
    )
    .unwrap();
    fs::write(hsm.join("pin"), "1234\n").unwrap();
    // The daemon (a child) and this process's own PKCS#11 session read it. nextest runs each
    // test in its own process.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "mem-test"])
        .args(["--so-pin", "5678", "--pin", "1234"])
        .stdin(Stdio::null())
        .output()
        .expect("softhsm2-util");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!(
        "pkcs11:{MODULE}?token=mem-test&pin-source=file:{}",
        hsm.join("pin").display()
    );
    let added = env.cmkfs(&["vault", "add", "hsm", &url]);
    assert!(
        added.ok() || added.stderr.contains("unrecognized subcommand"),
        "{added}"
    );
    env.init_with(
        &env.cipher,
        &["--vault", &url, "--key", "hsm-kek", "--alg", "RSA-OAEP"],
    );
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    let token = cmkfs::vault::pkcs11::Pkcs11Vault::open(&url).unwrap();
    let dek = dek_of(&VolumeHeader::read(&env.cipher).unwrap(), &token, false);
    check_daemon(&env, &m, &dek, Vec::new(), &|| {
        env.cmkfs(&[
            "vault",
            "--vault",
            &url,
            "key",
            "update",
            "hsm-kek",
            "--disable",
        ])
        .assert_ok();
    });
    drop(m);
}

/// Second review, M2: the plaintext of the last WRITE stayed in the daemon's memory after
/// revocation (fuser's per-worker request buffer kept the payload until a later request of
/// the same size overwrote it). Writes a 1 MiB payload that appears nowhere else (random,
/// so every 32-byte window is unique) and scans the daemon for windows of it at once (the
/// WRITEs are encrypted in place in the request buffers: session 10), reads it back (a
/// direct read of the backing file in the daemon), revokes, and scans again.
#[test]
fn the_last_write_leaves_no_plaintext_in_the_daemon_after_revocation() {
    use rand::RngCore as _;
    use std::io::Write as _;
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    let pid = daemon_pids_of(&env.home, &env.mnt)[0] as u32;
    let mut payload = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut payload);
    // Windows across the payload: each FUSE request carries a slice of it (up to max_write),
    // and a later small request overwrites only the start of a worker's buffer.
    let needles: Vec<(String, Vec<u8>)> = (0..64)
        .map(|i| {
            let at = i * (payload.len() / 64) + 4000;
            (format!("payload[{at}..]"), payload[at..at + 32].to_vec())
        })
        .collect();
    {
        let mut f = File::create(m.path("written")).unwrap();
        f.write_all(&payload).unwrap();
        f.write_all(&payload[..7]).unwrap(); // a short tail write too
    }
    assert_eq!(
        fs::metadata(m.path("written")).unwrap().len(),
        payload.len() as u64 + 7
    );
    // Right after the write, still mounted: the WRITEs' whole units were encrypted in place
    // in fuser's request buffers and the partial ones' plaintext wiped (src/fs/payload.rs),
    // so no window of the payload is anywhere in the daemon, revoked or not.
    let found = scan(pid, &needles);
    assert!(
        found.is_empty(),
        "plaintext of the last write in the daemon right after the write:\n{}",
        found.join("\n")
    );
    // And the last large READ: with the backing file out of the page cache, the daemon reads
    // it with O_DIRECT into an aligned pooled buffer and decrypts it there (issue 15); the
    // pool's wipe at the cut-off must cover that buffer too.
    {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
        File::open(m.path("written")).unwrap().sync_all().unwrap();
        for b in data_files(&env.cipher) {
            let bf = File::open(&b).unwrap();
            // SAFETY: plain syscall on a valid descriptor.
            unsafe { libc::posix_fadvise(bf.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        let r = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(m.path("written"))
            .unwrap();
        let mut back = vec![0u8; payload.len()];
        r.read_exact_at(&mut back, 0).unwrap();
        assert!(back == payload, "read back through the mount");
    }
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    assert!(
        wait_until(GUARD, || state(&env) == "Inaccessible"),
        "the mount was not cut off"
    );
    std::thread::sleep(Duration::from_millis(500));
    let found = scan(pid, &needles);
    drop(payload);
    assert!(
        found.is_empty(),
        "plaintext of the last write in the daemon after revocation:\n{}",
        found.join("\n")
    );
    drop(m);
}
