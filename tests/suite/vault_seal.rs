//! The embedded vault sealed at rest (issue 11, finding 3): a stolen disk with the backing
//! directory and `$CMKFS_HOME` yields no key without the passphrase; stores written before
//! sealing open (with a warning) and seal in place, resumably; the kernel keyring caches the
//! unsealed key; the mount daemon gets the key from the command that started it.
//!
//! `CMKFS_TEST_BIN=/path/to/old/cmkfs` runs these against another build (the c00a716 release
//! fails `stolen_disk_and_home_reveal_no_key` on its clear PKCS#8 files).

use crate::common;
use crate::vault_support;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/legacy-c00a716");
const HELLO_SHA256: &str = "5d66b28fa173bf808be6155eb7dfc2eab0c2fdb86fae5b637dceca820dfdf5eb";
const RANDOM_SHA256: &str = "2a0dec023fac062170f85bb569fc7d17db90562eabff6ae98286f521df5b3d76";

fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(fs::read(p).unwrap()))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A `cmkfs` command with no passphrase source at all (as a thief would run it).
fn without_passphrase(mut cmd: Command) -> Command {
    cmd.env_remove("CMKFS_PASSPHRASE_FILE")
        .env_remove("CREDENTIALS_DIRECTORY");
    cmd
}

fn run(cmd: Command) -> Output {
    run_with_timeout(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes a passphrase file as a user should: 0600 (a looser one is refused).
fn write_private(p: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(p, text).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn stolen_disk_and_home_reveal_no_key() {
    let env = Env::new();
    env.init(&env.cipher);
    // A credential kept in the home, and the vault server's TLS keys.
    let out = env.cmkfs(&["vault", "identity", "create", "app", "--json"]);
    out.assert_ok();
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let token = j["token"].as_str().unwrap().to_string();
    let secret = token.split_once('.').unwrap().1.to_string();
    drop(vault_support::ServerProc::start(&env.home, 0));
    assert!(env.home.join("vault/tls/key.pem").exists());
    {
        let m = env.mount(&env.cipher, &env.mnt);
        fs::write(m.path("secret.txt"), b"the plaintext of a stolen disk").unwrap();
    }

    // The thief's copy: backing directory and home, not the passphrase file (the server
    // harness keeps one in the home; a real home has none).
    let _ = fs::remove_file(env.home.join("test-passphrase"));
    let stolen = env.dir("stolen");
    copy_tree(&env.cipher, &stolen.join("cipher"));
    copy_tree(&env.home, &stolen.join("home"));
    let secret_bytes = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        secret.as_bytes(),
    )
    .unwrap();
    // PKCS#8 of RSA (version 0, rsaEncryption) and of EC keys, in DER and in base64; PEM.
    let needles: Vec<(&str, Vec<u8>)> = vec![
        (
            "PKCS#8 RSA DER",
            b"\x02\x01\x00\x30\x0d\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01".to_vec(),
        ),
        (
            "PKCS#8 EC DER",
            b"\x02\x01\x00\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01".to_vec(),
        ),
        ("PKCS#8 RSA base64", b"BgkqhkiG9w0BAQEFAASC".to_vec()),
        ("PEM private key", b"PRIVATE KEY-----".to_vec()),
        ("identity secret (text)", secret.as_bytes().to_vec()),
        ("identity secret (bytes)", secret_bytes),
        ("passphrase", TEST_PASSPHRASE.as_bytes().to_vec()),
    ];
    let files = files_under(&stolen);
    assert!(files.len() > 8, "{files:?}");
    for f in &files {
        let bytes = fs::read(f).unwrap();
        for (what, n) in &needles {
            assert!(
                !contains(&bytes, n),
                "{} holds a {what} in clear",
                f.strip_prefix(&stolen).unwrap().display()
            );
        }
    }

    // Without the passphrase the copy does not open: no unwrap, no mount, no credential.
    let home = stolen.join("home");
    let mnt = env.dir("mnt2");
    let mut cmd = without_passphrase(env.command(&[
        OsStr::new("mount"),
        stolen.join("cipher").as_os_str(),
        mnt.as_os_str(),
    ]));
    cmd.env("CMKFS_HOME", &home);
    let out = run(cmd);
    out.assert_clear_error();
    assert!(out.stderr.contains("passphrase"), "{out}");
    let mut cmd = without_passphrase(env.command(&[
        OsStr::new("vault"),
        OsStr::new("key"),
        OsStr::new("list"),
        OsStr::new("--credential"),
        home.join("credentials/app.json").as_os_str(),
    ]));
    cmd.env("CMKFS_HOME", &home);
    run(cmd).assert_clear_error();
}

/// Copies the c00a716 fixture into `env` (home and backing dir).
fn legacy(env: &Env) -> PathBuf {
    fs::remove_dir(&env.home).unwrap();
    copy_tree(&Path::new(FIXTURE).join("home"), &env.home);
    // The fixture's TLS files are committed as `*.pem.fixture` (no key file in the repository
    // looks like a real one); the release that made the home named them `*.pem`.
    let tls = env.home.join("vault/tls");
    for f in ["ca", "cert", "key"] {
        fs::rename(
            tls.join(format!("{f}.pem.fixture")),
            tls.join(format!("{f}.pem")),
        )
        .unwrap();
    }
    let cipher = env.dir("legacy-cipher");
    fs::remove_dir(&cipher).unwrap();
    copy_tree(&Path::new(FIXTURE).join("cipher"), &cipher);
    cipher
}

fn check_legacy_data(env: &Env, cipher: &Path) {
    let m = env.mount(cipher, &env.mnt);
    assert_eq!(sha256_file(&m.path("hello.txt")), HELLO_SHA256);
    assert_eq!(sha256_file(&m.path("dir/random.bin")), RANDOM_SHA256);
}

#[test]
fn legacy_store_opens_with_a_warning_and_seals_in_place() {
    let env = Env::new();
    let cipher = legacy(&env);
    // Opens as it is (no passphrase needed), with a one-line warning.
    let out = without_passphrase(env.command(&["vault", "key", "list"]));
    let out = run(out);
    out.assert_ok();
    assert!(out.stdout.contains("legacy"), "{out}");
    let warn: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(warn.len(), 1, "{out}");
    assert!(warn[0].contains("not sealed") && warn[0].contains("cmkfs vault seal"));
    check_legacy_data(&env, &cipher);

    let pk8 = env
        .home
        .join("vault/keys/legacy/1140e5d33282940caab0154e283066b8.pk8");
    assert_eq!(
        fs::read(&pk8).unwrap()[0],
        0x30,
        "the fixture's key is clear DER"
    );
    let out = env.cmkfs(&["vault", "seal", "--cache-for", "0"]);
    out.assert_ok();
    assert!(out.stdout.contains("3 file(s) rewritten sealed"), "{out}");
    for f in [
        pk8.clone(),
        env.home.join("vault/tls/key.pem"),
        env.home.join("credentials/app.json"),
    ] {
        let b = fs::read(&f).unwrap();
        assert!(
            b.starts_with(b"{\"cmkfsSealed\":1"),
            "{} not sealed",
            f.display()
        );
    }
    // Sealed: no warning, works with the passphrase, refuses without it.
    let out = env.cmkfs(&["vault", "key", "list"]);
    out.assert_ok();
    assert!(out.stderr.is_empty(), "{out}");
    check_legacy_data(&env, &cipher);
    let out = run(without_passphrase(
        env.command(&[OsStr::new("status"), cipher.as_os_str()]),
    ));
    assert!(
        out.stdout.contains("passphrase") || out.stderr.contains("passphrase"),
        "{out}"
    );
    // The sealed credential still opens (through the home's vault).
    env.cmkfs(&[
        OsStr::new("vault"),
        OsStr::new("key"),
        OsStr::new("show"),
        OsStr::new("legacy"),
        OsStr::new("--credential"),
        env.home.join("credentials/app.json").as_os_str(),
    ])
    .assert_ok();
    // A second seal changes nothing.
    let out = env.cmkfs(&["vault", "seal", "--cache-for", "0"]);
    out.assert_ok();
    assert!(out.stdout.contains("nothing left in clear"), "{out}");
}

/// Every state an interrupted `vault seal` can leave (seal.json written, any subset of the
/// files rewritten) opens, and a second run finishes the seal; a wrong passphrase changes
/// nothing.
#[test]
fn an_interrupted_seal_resumes_from_any_point() {
    let env = Env::new();
    let cipher = legacy(&env);
    // A complete seal elsewhere gives the sealed form of each file under one master key.
    let done = env.dir("done");
    fs::remove_dir(&done).unwrap();
    copy_tree(&env.home, &done);
    let mut cmd = env.command(&["vault", "seal", "--cache-for", "0"]);
    cmd.env("CMKFS_HOME", &done);
    run(cmd).assert_ok();
    let mut seal: serde_json::Value =
        serde_json::from_slice(&fs::read(done.join("vault/seal.json")).unwrap()).unwrap();
    seal["complete"] = false.into();
    let files = [
        "vault/keys/legacy/1140e5d33282940caab0154e283066b8.pk8",
        "vault/tls/key.pem",
        "credentials/app.json",
    ];
    let pristine = env.dir("pristine");
    fs::remove_dir(&pristine).unwrap();
    copy_tree(&env.home, &pristine);
    for subset in 0..(1u32 << files.len()) {
        fs::remove_dir_all(&env.home).unwrap();
        copy_tree(&pristine, &env.home);
        fs::write(
            env.home.join("vault/seal.json"),
            serde_json::to_vec(&seal).unwrap(),
        )
        .unwrap();
        for (i, f) in files.iter().enumerate() {
            if subset & (1 << i) != 0 {
                fs::copy(done.join(f), env.home.join(f)).unwrap();
            }
        }
        // Mid-seal, the volume's key unwraps whichever form its file has.
        let out = env.cmkfs(&[
            OsStr::new("status"),
            cipher.as_os_str(),
            OsStr::new("--json"),
        ]);
        assert!(
            out.stdout.contains("ccessible") && !out.stdout.contains("naccessible"),
            "subset {subset}: {out}"
        );
        // A wrong passphrase is refused and leaves everything as it was.
        let wrong = env.root.join("wrong-passphrase");
        write_private(&wrong, "not the passphrase\n");
        let before: Vec<Vec<u8>> = files
            .iter()
            .map(|f| fs::read(env.home.join(f)).unwrap())
            .collect();
        let mut cmd = env.command(&["vault", "seal", "--cache-for", "0"]);
        cmd.env("CMKFS_PASSPHRASE_FILE", &wrong);
        run(cmd).assert_clear_error();
        let after: Vec<Vec<u8>> = files
            .iter()
            .map(|f| fs::read(env.home.join(f)).unwrap())
            .collect();
        assert_eq!(before, after, "subset {subset}");
        // The right one finishes it.
        env.cmkfs(&["vault", "seal", "--cache-for", "0"])
            .assert_ok();
        for f in files {
            let b = fs::read(env.home.join(f)).unwrap();
            assert!(b.starts_with(b"{\"cmkfsSealed\":1"), "subset {subset}: {f}");
        }
        let rec: serde_json::Value =
            serde_json::from_slice(&fs::read(env.home.join("vault/seal.json")).unwrap()).unwrap();
        assert_eq!(rec["complete"], true, "subset {subset}");
    }
    check_legacy_data(&env, &cipher);
}

/// Whether this machine lets us use the user keyring (some container profiles forbid it).
fn keyring_usable(env: &Env) -> bool {
    let out = env.cmkfs(&["vault", "unseal", "--timeout", "30s"]);
    if !out.ok() && out.stderr.contains("kernel keyring is not usable") {
        eprintln!(
            "SKIP: the kernel keyring is not usable here: {}",
            out.stderr
        );
        return false;
    }
    out.assert_ok();
    true
}

#[test]
fn unseal_caches_the_key_in_the_kernel_keyring_and_lock_drops_it() {
    let env = Env::new();
    env.init(&env.cipher);
    let status = || {
        run(without_passphrase(env.command(&[
            OsStr::new("vault"),
            OsStr::new("key"),
            OsStr::new("rotate"),
            OsStr::new("default"),
        ])))
    };
    status().assert_clear_error();
    if !keyring_usable(&env) {
        return;
    }
    let id = serde_json::from_slice::<serde_json::Value>(
        &fs::read(env.home.join("vault/seal.json")).unwrap(),
    )
    .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let keys = fs::read_to_string("/proc/keys").unwrap();
    assert!(keys.contains(&format!("cmkfs:vault:{id}")), "{keys}");
    // Needs no passphrase now: rotating writes a sealed private key.
    status().assert_ok();
    // The daemon started without a passphrase source takes it from the keyring too.
    {
        let mut cmd = without_passphrase(env.command(&[
            OsStr::new("mount"),
            env.cipher.as_os_str(),
            env.mnt.as_os_str(),
        ]));
        cmd.env_remove("CMKFS_VAULT_KDF");
        let out = run(cmd);
        out.assert_ok();
        let _m = Mount::adopt(&env, &env.cipher, &env.mnt);
    }
    let out = env.cmkfs(&["vault", "lock"]);
    out.assert_ok();
    assert!(out.stdout.contains("locked"), "{out}");
    status().assert_clear_error();
    let out = env.cmkfs(&["vault", "lock"]);
    out.assert_ok();
    assert!(out.stdout.contains("was not unsealed"), "{out}");
}

#[test]
fn the_mount_daemon_gets_the_key_from_the_command_that_started_it() {
    let env = Env::new();
    env.init(&env.cipher);
    // The passphrase reaches only `cmkfs mount` (--passphrase-file), not the daemon's
    // environment: the daemon has it through the inherited pipe.
    let pass = env.root.join("test-passphrase");
    let mut cmd = without_passphrase(env.command(&[
        OsStr::new("--passphrase-file"),
        pass.as_os_str(),
        OsStr::new("mount"),
        env.cipher.as_os_str(),
        env.mnt.as_os_str(),
    ]));
    cmd.env_remove("CMKFS_VAULT_KDF");
    run(cmd).assert_ok();
    let m = Mount::adopt(&env, &env.cipher, &env.mnt);
    fs::write(m.path("f"), b"x").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"x");
}

#[test]
fn change_passphrase_and_clear_errors() {
    let env = Env::new();
    env.init(&env.cipher);
    let new = env.root.join("new-passphrase");
    write_private(&new, "a new passphrase\n");
    let out = env.cmkfs(&[
        OsStr::new("vault"),
        OsStr::new("change-passphrase"),
        OsStr::new("--new-passphrase-file"),
        new.as_os_str(),
    ]);
    out.assert_ok();
    // The old passphrase no longer opens it; the new one does.
    let rotate = |pass: Option<&Path>| {
        let mut cmd = without_passphrase(env.command(&["vault", "key", "rotate", "default"]));
        if let Some(p) = pass {
            cmd.env("CMKFS_PASSPHRASE_FILE", p);
        }
        run(cmd)
    };
    let out = rotate(Some(&env.root.join("test-passphrase")));
    out.assert_clear_error();
    assert!(out.stderr.contains("does not open the vault"), "{out}");
    rotate(Some(&new)).assert_ok();
    // An empty or missing passphrase file: one line saying so.
    let empty = env.root.join("empty");
    write_private(&empty, "\n");
    let out = rotate(Some(&empty));
    out.assert_clear_error();
    assert!(out.stderr.contains("empty"), "{out}");
    let out = rotate(Some(&env.root.join("missing")));
    out.assert_clear_error();
    assert!(
        out.stderr.contains("cannot read the vault passphrase"),
        "{out}"
    );
    // A systemd credential is a passphrase source too.
    let creds = env.dir("creds");
    fs::copy(&new, creds.join("cmkfs-vault-passphrase")).unwrap();
    let mut cmd = without_passphrase(env.command(&["vault", "key", "rotate", "default"]));
    cmd.env("CREDENTIALS_DIRECTORY", &creds);
    run(cmd).assert_ok();
}

/// The prompt on a terminal (through `script`, which gives the command a pseudo-terminal).
#[test]
fn a_terminal_is_asked_for_the_passphrase() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIP: script(1) is not installed");
        return;
    }
    let env = Env::new();
    env.init(&env.cipher);
    let line = format!("{} vault key rotate default", bin());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "printf '%s\\n' '{TEST_PASSPHRASE}' | script -qec '{line}' /dev/null"
        ))
        .env("CMKFS_HOME", &env.home)
        .env_remove("CMKFS_PASSPHRASE_FILE");
    let out = run(cmd);
    out.assert_ok();
    assert!(out.stdout.contains("Passphrase of the vault"), "{out}");
    assert!(out.stdout.contains("local:/keys/default/"), "{out}");
}

/// Second review, H1: `vault identity create NAME --server-url URL` wrote the bearer secret
/// in clear into the sealed home's credentials directory. Whatever vault it is for, a
/// credential kept in the home is sealed; an export for another host goes only to a file the
/// user names, 0600, with a line saying it is in clear and how to seal it there.
#[test]
fn credentials_in_a_sealed_home_are_sealed_and_exports_say_they_are_clear() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    env.init(&env.cipher);
    let out = env.cmkfs(&[
        "vault",
        "identity",
        "create",
        "remote",
        "--server-url",
        "https://vault.example:8443",
        "--json",
    ]);
    out.assert_ok();
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let secret = j["token"]
        .as_str()
        .unwrap()
        .split_once('.')
        .unwrap()
        .1
        .to_string();
    let kept = env.home.join("credentials/remote.json");
    let bytes = fs::read(&kept).unwrap();
    assert!(
        bytes.starts_with(b"{\"cmkfsSealed\":1") && !contains(&bytes, secret.as_bytes()),
        "{} is not sealed",
        kept.display()
    );
    // An export: where the user says, 0600, in clear, and said so.
    let export = env.root.join("for-the-client.json");
    let out = env.cmkfs(&[
        OsStr::new("vault"),
        OsStr::new("identity"),
        OsStr::new("create"),
        OsStr::new("client"),
        OsStr::new("--server-url"),
        OsStr::new("https://vault.example:8443"),
        OsStr::new("--credential-file"),
        export.as_os_str(),
    ]);
    out.assert_ok();
    assert!(
        out.stderr.contains("in clear") && out.stderr.contains("cmkfs vault seal"),
        "{out}"
    );
    assert_eq!(
        fs::metadata(&export).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let cred: serde_json::Value = serde_json::from_slice(&fs::read(&export).unwrap()).unwrap();
    assert_eq!(cred["vault"], "https://vault.example:8443");
    // Named inside the home's credentials directory, it is kept (sealed), not exported.
    let inside = env.home.join("credentials/named.json");
    env.cmkfs(&[
        OsStr::new("vault"),
        OsStr::new("identity"),
        OsStr::new("create"),
        OsStr::new("named"),
        OsStr::new("--credential-file"),
        inside.as_os_str(),
    ])
    .assert_ok();
    assert!(fs::read(&inside)
        .unwrap()
        .starts_with(b"{\"cmkfsSealed\":1"));
}

/// Second review, L2-L5: a hostile or damaged seal.json, a vault that lost it, caches asked
/// for too long, and passphrase files others can read.
#[test]
fn seal_records_caches_and_passphrase_files_are_checked() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    env.init(&env.cipher);
    let seal_json = env.home.join("vault/seal.json");
    let original = fs::read(&seal_json).unwrap();
    // L2: unbounded Argon2id parameters in seal.json (a panic and a hang before): one line.
    for (field, value) in [("memoryKib", 4294967295u64), ("iterations", 4000000000)] {
        let mut rec: serde_json::Value = serde_json::from_slice(&original).unwrap();
        rec["kdf"][field] = value.into();
        fs::write(&seal_json, serde_json::to_vec_pretty(&rec).unwrap()).unwrap();
        let out = env.cmkfs(&["vault", "key", "rotate", "default"]);
        out.assert_clear_error();
        assert!(out.stderr.contains("out of bounds"), "{field}: {out}");
    }
    fs::write(&seal_json, &original).unwrap();
    // L2: --kdf on a sealed vault is refused (it was ignored), and nothing is cached in the
    // kernel keyring unless asked.
    let out = env.cmkfs(&["vault", "seal", "--kdf", "m=131072,t=4,p=4"]);
    out.assert_clear_error();
    assert!(out.stderr.contains("change-passphrase --kdf"), "{out}");
    env.cmkfs(&["vault", "seal"]).assert_ok();
    let id = serde_json::from_slice::<serde_json::Value>(&original).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let keys = fs::read_to_string("/proc/keys").unwrap_or_default();
    assert!(
        !keys.contains(&format!("cmkfs:vault:{id}")),
        "cached unasked: {keys}"
    );
    // L4: caches are capped (a day).
    for args in [
        vec!["vault", "unseal", "--timeout", "99999999999d"],
        vec!["vault", "unseal", "--timeout", "25h"],
        vec!["vault", "seal", "--cache-for", "2d"],
    ] {
        let out = env.cmkfs(&args);
        out.assert_clear_error();
        assert!(
            out.stderr.contains("24h") || out.stderr.contains("1day"),
            "{out}"
        );
    }
    // L5: a passphrase file others can read is refused, like ssh's private keys; a systemd
    // credential (0440) is fine.
    let loose = env.root.join("loose-passphrase");
    fs::write(&loose, format!("{TEST_PASSPHRASE}\n")).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = without_passphrase(env.command(&["vault", "key", "rotate", "default"]));
    cmd.env("CMKFS_PASSPHRASE_FILE", &loose);
    let out = run(cmd);
    out.assert_clear_error();
    assert!(out.stderr.contains("chmod 600"), "{out}");
    let creds = env.dir("creds");
    let cred = creds.join("cmkfs-vault-passphrase");
    fs::write(&cred, format!("{TEST_PASSPHRASE}\n")).unwrap();
    fs::set_permissions(&cred, fs::Permissions::from_mode(0o440)).unwrap();
    let mut cmd = without_passphrase(env.command(&["vault", "key", "rotate", "default"]));
    cmd.env("CREDENTIALS_DIRECTORY", &creds);
    run(cmd).assert_ok();
    // L3: a sealed vault whose seal.json is gone is not a "legacy" store: refused, and no key
    // is written in clear.
    fs::remove_file(&seal_json).unwrap();
    let before = files_under(&env.home.join("vault/keys")).len();
    for args in [
        vec!["vault", "key", "create", "k2", "--key-size", KEY_SIZE],
        vec!["vault", "key", "list"],
    ] {
        let out = env.cmkfs(&args);
        out.assert_clear_error();
        assert!(out.stderr.contains("seal.json"), "{out}");
    }
    assert_eq!(files_under(&env.home.join("vault/keys")).len(), before);
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(!is_mounted(&env.mnt));
}

/// L3: a store that was never sealed (before issue 11) keeps working with the keys it has,
/// but gets no new key in clear: it must be sealed first.
#[test]
fn a_legacy_store_gets_no_new_key_in_clear() {
    let env = Env::new();
    legacy(&env);
    let before = files_under(&env.home.join("vault/keys"));
    let out = run(without_passphrase(env.command(&[
        "vault",
        "key",
        "create",
        "fresh",
        "--key-size",
        KEY_SIZE,
    ])));
    // (The store's "not sealed" warning comes first.)
    assert!(!out.ok() && out.status.code().is_some(), "{out}");
    assert!(out.stderr.contains("writes no new key in clear"), "{out}");
    assert_eq!(files_under(&env.home.join("vault/keys")), before);
    // Sealed, it does.
    env.cmkfs(&["vault", "seal"]).assert_ok();
    env.cmkfs(&["vault", "key", "create", "fresh", "--key-size", KEY_SIZE])
        .assert_ok();
}

/// Attack 10 F4: a command that only uses the embedded vault (backup, fsck, offline
/// re-encryption, restore, mount), run with a home that has none and no passphrase, says in
/// one line that there is no vault there (the home, `CMKFS_HOME`, `cmkfs init`) and creates
/// nothing; `cmkfs init` without a passphrase makes nothing of a vault either.
#[test]
fn commands_that_use_a_vault_never_create_one() {
    let env = Env::new();
    env.init(&env.cipher);
    let archive = env.root.join("a.tar");
    env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
    ])
    .assert_ok();
    let home = env.root.join("other-home");
    let mnt = env.dir("m");
    let (b, r) = (env.root.join("b.tar"), env.root.join("restored"));
    fn v(a: &[&'static str]) -> Vec<&'static OsStr> {
        a.iter().map(|s| OsStr::new(*s)).collect()
    }
    let cases: [Vec<&OsStr>; 15] = [
        vec!["backup".as_ref(), env.cipher.as_os_str(), b.as_os_str()],
        // Vault commands that read, or act on a key or identity that must already exist
        // (only `vault key create`/`import`, `identity create` and a settings change add).
        v(&["vault", "key", "list"]),
        v(&["vault", "key", "show", "k"]),
        v(&["vault", "key", "versions", "k"]),
        v(&["vault", "key", "rotate", "k"]),
        v(&["vault", "key", "delete", "k"]),
        v(&["vault", "key", "list-deleted"]),
        v(&["vault", "identity", "list"]),
        v(&["vault", "policy", "list"]),
        v(&["vault", "config"]),
        v(&["vault", "audit"]),
        vec!["fsck".as_ref(), env.cipher.as_os_str()],
        vec![
            "volume".as_ref(),
            "reencrypt".as_ref(),
            env.cipher.as_os_str(),
        ],
        vec![
            "restore".as_ref(),
            archive.as_os_str(),
            r.as_os_str(),
            "--des".as_ref(),
            "d".as_ref(),
        ],
        vec!["mount".as_ref(), env.cipher.as_os_str(), mnt.as_os_str()],
    ];
    for args in cases {
        // The vault commands keep the passphrase: with one, a vault could be created.
        let mut cmd = match args[0].to_str() {
            Some("vault") => env.command(&args),
            _ => without_passphrase(env.command(&args)),
        };
        cmd.env("CMKFS_HOME", &home);
        let out = run(cmd);
        if is_mounted(&mnt) {
            while is_mounted(&mnt) && detach(&mnt) {}
        }
        out.assert_clear_error();
        if args[0] != "restore" {
            assert!(
                out.stderr.contains("there is no vault in")
                    && out.stderr.contains(&*home.to_string_lossy())
                    && out.stderr.contains("cmkfs init"),
                "{args:?}: {out}"
            );
        }
        if args[0] == "vault" {
            assert!(
                out.stderr.contains("cmkfs vault key create"),
                "{args:?}: {out}"
            );
        }
        assert!(!home.join("vault").exists(), "{args:?} made a vault: {out}");
        assert!(
            !b.exists() && !r.exists(),
            "{args:?} wrote something: {out}"
        );
    }
    let mut cmd =
        without_passphrase(env.command(&["init".as_ref(), env.root.join("c2").as_os_str()]));
    cmd.env("CMKFS_HOME", &home);
    let out = run(cmd);
    out.assert_clear_error();
    assert!(out.stderr.contains("passphrase"), "{out}");
    assert!(
        !home.join("vault").exists(),
        "init without a passphrase left a vault: {out}"
    );
}
