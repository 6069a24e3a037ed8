//! Integration tests of the embedded vault (`vault::local`): the library API against real
//! stores in temporary directories, and the `cmkfs vault ...` command line.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA256_MGF1SHA256,
};
use base64::Engine as _;
use cmkfs::home::Home;
use cmkfs::vault::local::{AuditEvent, ConfigUpdate, LocalVault, PolicyScope};
use cmkfs::vault::{
    self, CreateKeyOptions, DenyReason, ErrorClass, ImportKeyOptions, KeyId, KeyUpdate, Permission,
    Vault, VaultError, WrapAlg,
};

const DAY: i64 = 86_400;

fn opts() -> CreateKeyOptions {
    CreateKeyOptions {
        key_size: 2048,
        wrap_alg: WrapAlg::RsaOaep256,
    }
}

/// The passphrase test vaults are sealed with, for this process and the children it starts.
const TEST_PASSPHRASE: &str = "cmkfs test passphrase";

fn use_test_passphrase() {
    use cmkfs::vault::local::{seal::KdfParams, unlock};
    unlock::set_passphrase_source(Some(unlock::PassphraseSource::Value(std::sync::Arc::new(
        zeroize::Zeroizing::new(TEST_PASSPHRASE.to_string()),
    ))));
    unlock::set_kdf_params(Some(KdfParams::TEST));
}

/// Points a cmkfs child at a passphrase file in `dir` (written on first use).
fn passphrase_env<'a>(cmd: &'a mut Command, dir: &std::path::Path) -> &'a mut Command {
    let path = dir.join("test-passphrase");
    if !path.exists() {
        std::fs::write(&path, format!("{TEST_PASSPHRASE}\n")).unwrap();
        // 0600: a passphrase file others may read is refused.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }
    cmd.env("CMKFS_PASSPHRASE_FILE", &path)
        .env("CMKFS_VAULT_KDF", "test")
}

struct Fx {
    dir: tempfile::TempDir,
    v: LocalVault,
}

impl Fx {
    fn new() -> Fx {
        use_test_passphrase();
        let dir = tempfile::tempdir().unwrap();
        let v = LocalVault::open(&dir.path().join("vault")).unwrap();
        Fx { dir, v }
    }
    fn store(&self) -> PathBuf {
        self.dir.path().join("vault")
    }
    /// Another owner connection with a shifted clock.
    fn at(&self, offset: i64) -> LocalVault {
        LocalVault::open(&self.store())
            .unwrap()
            .with_clock_offset(offset)
    }
    fn audit(&self) -> Vec<AuditEvent> {
        self.v.audit_reader().unwrap().read_new().unwrap()
    }
}

fn deny_reason(e: &VaultError) -> Option<DenyReason> {
    match e {
        VaultError::Denied { reason, .. } => Some(*reason),
        _ => None,
    }
}

#[track_caller]
fn assert_denied<T: std::fmt::Debug>(r: Result<T, VaultError>, reason: DenyReason) {
    let e = r.expect_err("expected a denial");
    assert_eq!(deny_reason(&e), Some(reason), "got: {e}");
    assert_eq!(e.class(), ErrorClass::Denied);
}

const DEK: [u8; 64] = [0x5a; 64];

/// Every file and directory under `dir`: files 0600, directories 0700.
fn assert_private_tree(dir: &Path) {
    let meta = fs::metadata(dir).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "{}",
        dir.display()
    );
    for entry in fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let m = fs::metadata(&p).unwrap();
        if m.is_dir() {
            assert_private_tree(&p);
        } else {
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", p.display());
        }
    }
}

/// A fresh RSA key as PKCS#8 DER, made outside the vault (for import tests).
fn outside_key(size: KeySize) -> (PrivateDecryptingKey, Vec<u8>) {
    let k = PrivateDecryptingKey::generate(size).unwrap();
    let der = k.as_der().unwrap().as_ref().to_vec();
    (k, der)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Reads one DER TLV: (tag, contents, rest).
fn der_tlv(b: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = b[0];
    let (len, hdr) = if b[1] < 0x80 {
        (b[1] as usize, 2)
    } else {
        let n = (b[1] & 0x7f) as usize;
        (
            b[2..2 + n]
                .iter()
                .fold(0usize, |a, &x| (a << 8) | x as usize),
            2 + n,
        )
    };
    (tag, &b[hdr..hdr + len], &b[hdr + len..])
}

/// PKCS#8 PrivateKeyInfo → the PKCS#1 RSAPrivateKey inside it.
fn pkcs8_to_pkcs1(p8: &[u8]) -> Vec<u8> {
    let (_, seq, _) = der_tlv(p8);
    let (_, _version, rest) = der_tlv(seq);
    let (_, _alg, rest) = der_tlv(rest);
    let (tag, octets, _) = der_tlv(rest);
    assert_eq!(tag, 0x04);
    octets.to_vec()
}

/// Runs the `openssl` binary (installed by scripts/test.sh) in `dir` and returns the PEM it
/// wrote to `out`. Test keys are made at test time: no key material is ever committed.
fn openssl_pem(dir: &Path, out: &str, args: &[&str]) -> String {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    fs::read_to_string(dir.join(out)).unwrap()
}

/// A fresh RSA-1024 key as PKCS#8 PEM (too small to import), made by openssl in `dir`.
fn rsa1024_pkcs8_pem(dir: &Path) -> String {
    openssl_pem(
        dir,
        "rsa1024.pem",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
            "rsa1024.pem",
        ],
    )
}

/// A fresh RSA-2048 key as password-encrypted PKCS#8 PEM, made by openssl in `dir`.
fn encrypted_pkcs8_pem(dir: &Path) -> String {
    openssl_pem(
        dir,
        "plain.pem",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "plain.pem",
        ],
    );
    openssl_pem(
        dir,
        "enc.pem",
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes256",
            "-passout",
            "pass:x",
            "-in",
            "plain.pem",
            "-out",
            "enc.pem",
        ],
    )
}

// ---------------------------------------------------------------- store and basics

#[test]
fn first_use_creates_a_private_store() {
    use_test_passphrase();
    let home = tempfile::tempdir().unwrap();
    let h = Home::at(home.path().join("cmkfs"));
    // A command that only uses a vault never creates one (attack 10 F4).
    assert!(matches!(
        vault::open("local:", &h),
        Err(VaultError::Invalid(m)) if m.contains("there is no vault")
    ));
    assert!(!h.vault_dir().exists());
    let v = vault::open_or_create("local:", &h).unwrap();
    assert_eq!(v.url(), "local:");
    let k = v.create_key("first", &opts()).unwrap();
    v.wrap_key("first", None, WrapAlg::RsaOaep256, &DEK)
        .unwrap();
    let store = h.vault_dir();
    for f in [
        "vault.json",
        "lock",
        "generation",
        "audit.log",
        "seal.json",
        "keys/first/key.json",
    ] {
        assert!(store.join(f).is_file(), "{f}");
    }
    assert!(store
        .join(format!("keys/first/{}.pk8", k.version))
        .is_file());
    assert_private_tree(&store);
    // Opening again reuses the store.
    let again = vault::open("local:", &h).unwrap();
    assert_eq!(again.list_keys().unwrap().len(), 1);
    // A vault this machine did not configure is refused before anything is contacted.
    assert!(matches!(
        vault::open("https://elsewhere", &h),
        Err(VaultError::NotConfigured { .. })
    ));
}

#[test]
fn create_key_ids_sizes_and_bad_input() {
    let f = Fx::new();
    let k = f.v.create_key("app-Key-1", &opts()).unwrap();
    assert_eq!(k.version.len(), 32);
    assert!(k
        .version
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    assert_eq!(k.kid, format!("local:/keys/app-Key-1/{}", k.version));
    let parsed: KeyId = k.kid.parse().unwrap();
    assert_eq!(
        (parsed.vault.as_str(), parsed.name.as_str()),
        ("local:", "app-Key-1")
    );
    assert_eq!((k.kty.as_str(), k.key_size, k.enabled), ("RSA", 2048, true));
    assert_eq!(k.key_ops, vec!["wrapKey", "unwrapKey"]);
    assert_eq!(k.e, "AQAB");
    assert!(k.n.len() > 300);
    assert_eq!(k.recovery_level, "Recoverable+Purgeable");
    assert_eq!(k.recoverable_days, 90);
    assert_eq!(CreateKeyOptions::default().key_size, 3072);

    let bad_size =
        f.v.create_key(
            "k",
            &CreateKeyOptions {
                key_size: 1024,
                ..opts()
            },
        )
        .unwrap_err();
    assert!(
        matches!(&bad_size, VaultError::Invalid(m) if m.contains("1024")),
        "{bad_size}"
    );
    for bad in ["", "a_b", "a/b", "../x", "ключ", &"a".repeat(128)] {
        let e = f.v.create_key(bad, &opts()).unwrap_err();
        assert!(
            matches!(&e, VaultError::Invalid(m) if m.contains("invalid key name")),
            "{bad:?}: {e}"
        );
    }
    assert!(f.v.create_key(&"a".repeat(127), &opts()).is_ok());
    let dup = f.v.create_key("app-Key-1", &opts()).unwrap_err();
    assert!(
        matches!(&dup, VaultError::Conflict(m) if m.contains("rotate")),
        "{dup}"
    );
    // Nothing half-written by the refusals.
    let names: Vec<String> =
        f.v.list_keys()
            .unwrap()
            .into_iter()
            .map(|k| k.name)
            .collect();
    assert_eq!(names.len(), 2);
    assert_eq!(f.v.list_key_versions("app-Key-1").unwrap().len(), 1);
}

#[test]
fn sizes_3072_and_4096_are_supported() {
    let f = Fx::new();
    for size in [3072, 4096] {
        let k =
            f.v.create_key(
                &format!("k{size}"),
                &CreateKeyOptions {
                    key_size: size,
                    ..opts()
                },
            )
            .unwrap();
        assert_eq!(k.key_size, size);
        let w =
            f.v.wrap_key(&k.name, None, WrapAlg::RsaOaep256, &DEK)
                .unwrap();
        assert_eq!(w.value.len() as u32, size / 8);
        assert_eq!(
            &f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
                .unwrap()[..],
            &DEK
        );
    }
}

#[test]
fn wrap_unwrap_versions_and_algorithms() {
    let f = Fx::new();
    let v1 = f.v.create_key("kek", &opts()).unwrap();
    let w1 =
        f.v.wrap_key("kek", None, WrapAlg::RsaOaep256, &DEK)
            .unwrap();
    assert_eq!(w1.kid.to_string(), v1.kid);
    assert_eq!(w1.alg, WrapAlg::RsaOaep256);
    let v2 = f.v.rotate_key("kek").unwrap();
    assert_ne!(v1.version, v2.version);
    assert_eq!(v2.key_size, 2048);
    // Version None = latest; an explicit version is honoured.
    let w2 = f.v.wrap_key("kek", None, WrapAlg::RsaOaep, &DEK).unwrap();
    assert_eq!(w2.kid.version, v2.version);
    let w1b =
        f.v.wrap_key("kek", Some(&v1.version), WrapAlg::RsaOaep256, &DEK)
            .unwrap();
    assert_eq!(w1b.kid.version, v1.version);
    // Unwrap uses exactly the version in the kid.
    assert_eq!(
        &f.v.unwrap_key(&w1.kid, WrapAlg::RsaOaep256, &w1.value)
            .unwrap()[..],
        &DEK
    );
    assert_eq!(
        &f.v.unwrap_key(&w2.kid, WrapAlg::RsaOaep, &w2.value)
            .unwrap()[..],
        &DEK
    );
    let wrong_version = KeyId {
        version: v2.version.clone(),
        ..w1.kid.clone()
    };
    assert!(matches!(
        f.v.unwrap_key(&wrong_version, WrapAlg::RsaOaep256, &w1.value),
        Err(VaultError::UnwrapFailed { .. })
    ));
    // Wrong algorithm or corrupt bytes: UnwrapFailed, naming the key.
    let e =
        f.v.unwrap_key(&w1.kid, WrapAlg::RsaOaep, &w1.value)
            .unwrap_err();
    assert!(
        matches!(&e, VaultError::UnwrapFailed { kid } if *kid == v1.kid),
        "{e}"
    );
    let mut bad = w1.value.clone();
    bad[100] ^= 0x40;
    assert!(matches!(
        f.v.unwrap_key(&w1.kid, WrapAlg::RsaOaep256, &bad),
        Err(VaultError::UnwrapFailed { .. })
    ));
    assert!(matches!(
        f.v.unwrap_key(&w1.kid, WrapAlg::RsaOaep256, &[1, 2, 3]),
        Err(VaultError::UnwrapFailed { .. })
    ));
    // Another key cannot unwrap it.
    f.v.create_key("other", &opts()).unwrap();
    let other =
        f.v.get_key("other", None)
            .unwrap()
            .kid
            .parse::<KeyId>()
            .unwrap();
    assert!(matches!(
        f.v.unwrap_key(&other, WrapAlg::RsaOaep256, &w1.value),
        Err(VaultError::UnwrapFailed { .. })
    ));
    // Versions are listed oldest first; get of the latest.
    let versions: Vec<String> =
        f.v.list_key_versions("kek")
            .unwrap()
            .into_iter()
            .map(|k| k.version)
            .collect();
    assert_eq!(versions, vec![v1.version.clone(), v2.version.clone()]);
    assert_eq!(f.v.get_key("kek", None).unwrap().version, v2.version);
    assert_eq!(
        f.v.get_key("kek", Some(&v1.version)).unwrap().version,
        v1.version
    );
    // Too much to wrap.
    assert!(matches!(
        f.v.wrap_key("kek", None, WrapAlg::RsaOaep256, &[0u8; 250]),
        Err(VaultError::Invalid(_))
    ));
}

#[test]
fn unknown_keys_versions_and_malformed_ids() {
    let f = Fx::new();
    let k = f.v.create_key("k", &opts()).unwrap();
    let e = f.v.get_key("nope", None).unwrap_err();
    assert!(
        matches!(&e, VaultError::NotFound(m) if m.contains("nope")),
        "{e}"
    );
    assert!(matches!(
        f.v.wrap_key("nope", None, WrapAlg::RsaOaep256, &DEK),
        Err(VaultError::NotFound(_))
    ));
    let e = f.v.get_key("k", Some("ffff")).unwrap_err();
    assert!(
        matches!(&e, VaultError::NotFound(m) if m.contains("ffff")),
        "{e}"
    );
    assert!(matches!(
        f.v.rotate_key("nope"),
        Err(VaultError::NotFound(_))
    ));
    // For unwrap, the kid comes from a volume: a missing key/version means it was purged.
    let gone = KeyId {
        vault: "local:".into(),
        name: "nope".into(),
        version: k.version.clone(),
    };
    assert_denied(
        f.v.unwrap_key(&gone, WrapAlg::RsaOaep256, &[0; 256]),
        DenyReason::KeyPurged,
    );
    let gone_v = KeyId {
        version: "0".repeat(32),
        ..gone.clone()
    };
    let gone_v = KeyId {
        name: "k".into(),
        ..gone_v
    };
    assert_denied(
        f.v.unwrap_key(&gone_v, WrapAlg::RsaOaep256, &[0; 256]),
        DenyReason::KeyPurged,
    );
    let foreign = KeyId {
        vault: "https://kv.example".into(),
        ..gone_v
    };
    assert!(matches!(
        f.v.unwrap_key(&foreign, WrapAlg::RsaOaep256, &[0; 256]),
        Err(VaultError::Invalid(_))
    ));
    for bad in [
        "local:/keys/k",
        "local:/keys//v",
        "keys/k/v",
        "local:/keys/a_b/v",
        "local:/keys/k/v/x",
    ] {
        assert!(
            matches!(bad.parse::<KeyId>(), Err(VaultError::Invalid(_))),
            "{bad}"
        );
    }
    assert!(matches!(
        "nope".parse::<WrapAlg>(),
        Err(VaultError::Invalid(_))
    ));
}

#[test]
fn missing_store_is_unavailable_not_denied() {
    let f = Fx::new();
    let k = f.v.create_key("k", &opts()).unwrap();
    let w = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    fs::rename(f.store(), f.dir.path().join("elsewhere")).unwrap();
    for e in [
        f.v.get_key("k", None).unwrap_err(),
        f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
            .unwrap_err(),
        f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK)
            .unwrap_err(),
        f.v.list_keys().unwrap_err(),
        f.v.rotate_key("k").unwrap_err(),
    ] {
        assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
        assert!(e.to_string().contains("missing or unreachable"), "{e}");
    }
    // The connection does not recreate an empty store behind the volume's back.
    assert!(!f.store().exists());
    assert!(matches!(
        LocalVault::open_as(&f.store(), "app", "secret"),
        Err(VaultError::Unavailable(_))
    ));
    drop(k);
}

#[test]
fn damaged_records_are_store_errors() {
    let f = Fx::new();
    let k = f.v.create_key("k", &opts()).unwrap();
    let w = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    fs::remove_file(f.store().join(format!("keys/k/{}.pk8", k.version))).unwrap();
    let e =
        f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
            .unwrap_err();
    assert!(matches!(e, VaultError::Store(_)), "{e}");
    fs::write(f.store().join("keys/k/key.json"), b"{not json").unwrap();
    let e = f.v.get_key("k", None).unwrap_err();
    assert!(
        matches!(&e, VaultError::Store(m) if m.contains("damaged")),
        "{e}"
    );
}

#[test]
fn interrupted_writes_leave_nothing_visible_and_are_cleaned() {
    let f = Fx::new();
    f.v.create_key("k", &opts()).unwrap();
    // A crashed create (staging dir) and a crashed rotation (orphan .pk8 not in key.json).
    let staging = f.store().join("keys/.staging-0123");
    fs::create_dir(&staging).unwrap();
    fs::write(staging.join("key.json"), b"{}").unwrap();
    let orphan = f.store().join(format!("keys/k/{}.pk8", "9".repeat(32)));
    fs::write(&orphan, b"junk").unwrap();
    assert_eq!(f.v.list_keys().unwrap().len(), 1);
    assert_eq!(f.v.list_key_versions("k").unwrap().len(), 1);
    f.v.create_key("k2", &opts()).unwrap(); // any state change cleans up under the lock
    assert!(!staging.exists());
}

#[test]
fn concurrent_writers_are_serialized() {
    let f = Fx::new();
    f.v.create_key("shared", &opts()).unwrap();
    let store = f.store();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                let v = LocalVault::open(&store).unwrap();
                let rotated = v.rotate_key("shared").unwrap().version;
                let created = v.create_key("same", &opts()).is_ok();
                v.create_key(&format!("own{i}"), &opts()).unwrap();
                (rotated, created)
            })
        })
        .collect();
    let results: Vec<(String, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let versions: Vec<String> =
        f.v.list_key_versions("shared")
            .unwrap()
            .into_iter()
            .map(|k| k.version)
            .collect();
    assert_eq!(versions.len(), 5, "no rotation lost");
    for (v, _) in &results {
        assert!(versions.contains(v));
    }
    assert_eq!(
        results.iter().filter(|(_, c)| *c).count(),
        1,
        "exactly one creator wins a name"
    );
    assert_eq!(f.v.list_keys().unwrap().len(), 6);
}

#[test]
fn generation_counts_every_state_change() {
    let f = Fx::new();
    let g0 = f.v.generation().unwrap();
    f.v.create_key("k", &opts()).unwrap();
    let g1 = f.v.generation().unwrap();
    assert!(g1 > g0);
    f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    f.v.get_key("k", None).unwrap();
    assert_eq!(f.v.generation().unwrap(), g1, "reads do not bump");
    f.v.update_key(
        "k",
        None,
        &KeyUpdate {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    let g2 = f.v.generation().unwrap();
    assert!(g2 > g1);
    f.v.rotate_key("k").unwrap();
    f.v.delete_key("k").unwrap();
    assert!(f.v.generation().unwrap() >= g2 + 2);
    assert!(f.v.generation_path().is_file());
}

// ---------------------------------------------------------------- attributes

#[test]
fn disabled_version_denies_everything_but_other_versions_work() {
    let f = Fx::new();
    let v1 = f.v.create_key("k", &opts()).unwrap();
    let w1 = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let v2 = f.v.rotate_key("k").unwrap();
    let w2 = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let upd =
        f.v.update_key(
            "k",
            Some(&v1.version),
            &KeyUpdate {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(!upd.enabled);
    assert_denied(f.v.get_key("k", Some(&v1.version)), DenyReason::KeyDisabled);
    assert_denied(
        f.v.wrap_key("k", Some(&v1.version), WrapAlg::RsaOaep256, &DEK),
        DenyReason::KeyDisabled,
    );
    let e =
        f.v.unwrap_key(&w1.kid, WrapAlg::RsaOaep256, &w1.value)
            .unwrap_err();
    assert_eq!(deny_reason(&e), Some(DenyReason::KeyDisabled));
    assert!(e.to_string().contains("--enable"), "says what to do: {e}");
    // Disabling the old version does not hurt the new one.
    assert_eq!(
        &f.v.unwrap_key(&w2.kid, WrapAlg::RsaOaep256, &w2.value)
            .unwrap()[..],
        &DEK
    );
    assert_eq!(f.v.get_key("k", None).unwrap().version, v2.version);
    // Administration still sees it, and can re-enable it.
    assert!(!f.v.describe_key("k", Some(&v1.version)).unwrap().enabled);
    f.v.update_key(
        "k",
        Some(&v1.version),
        &KeyUpdate {
            enabled: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        &f.v.unwrap_key(&w1.kid, WrapAlg::RsaOaep256, &w1.value)
            .unwrap()[..],
        &DEK
    );
    // Disabling the latest version: wrap with version None is refused too.
    f.v.update_key(
        "k",
        None,
        &KeyUpdate {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_denied(
        f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK),
        DenyReason::KeyDisabled,
    );
    assert_denied(f.v.get_key("k", None), DenyReason::KeyDisabled);
}

#[test]
fn outside_nbf_exp_unwrap_works_but_wrap_is_refused() {
    let f = Fx::new();
    f.v.create_key("k", &opts()).unwrap();
    let w = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Not yet valid.
    let k =
        f.v.update_key(
            "k",
            None,
            &KeyUpdate {
                nbf: Some(Some(now + 3600)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(k.nbf, Some(now + 3600));
    assert_denied(
        f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK),
        DenyReason::KeyExpired,
    );
    assert_eq!(
        &f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
            .unwrap()[..],
        &DEK
    );
    assert!(
        f.v.get_key("k", None).is_ok(),
        "get is allowed outside nbf/exp"
    );
    // Two hours later it is valid.
    assert!(f
        .at(2 * 3600)
        .wrap_key("k", None, WrapAlg::RsaOaep256, &DEK)
        .is_ok());
    // Expired.
    f.v.update_key(
        "k",
        None,
        &KeyUpdate {
            nbf: Some(None),
            exp: Some(Some(now - 60)),
            ..Default::default()
        },
    )
    .unwrap();
    let e =
        f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK)
            .unwrap_err();
    assert_eq!(deny_reason(&e), Some(DenyReason::KeyExpired));
    assert!(e.to_string().contains("rotate"), "{e}");
    assert_eq!(
        &f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
            .unwrap()[..],
        &DEK
    );
    // Expiring in an hour: fine now, refused after.
    f.v.update_key(
        "k",
        None,
        &KeyUpdate {
            exp: Some(Some(now + 3600)),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).is_ok());
    assert_denied(
        f.at(7200).wrap_key("k", None, WrapAlg::RsaOaep256, &DEK),
        DenyReason::KeyExpired,
    );
    // nbf must precede exp; the refused update changes nothing.
    let e =
        f.v.update_key(
            "k",
            None,
            &KeyUpdate {
                nbf: Some(Some(now + 7200)),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, VaultError::Invalid(_)), "{e}");
    assert_eq!(f.v.get_key("k", None).unwrap().nbf, None);
    // A rotation starts with fresh attributes.
    let r = f.v.rotate_key("k").unwrap();
    assert_eq!((r.nbf, r.exp, r.enabled), (None, None, true));
}

#[test]
fn key_ops_limit_operations() {
    let f = Fx::new();
    f.v.create_key("k", &opts()).unwrap();
    let w = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let k =
        f.v.update_key(
            "k",
            None,
            &KeyUpdate {
                key_ops: Some(vec!["unwrapKey".into()]),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(k.key_ops, vec!["unwrapKey"]);
    assert_denied(
        f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK),
        DenyReason::OperationNotAllowed,
    );
    assert!(f
        .v
        .unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
        .is_ok());
    f.v.update_key(
        "k",
        None,
        &KeyUpdate {
            key_ops: Some(vec!["wrapKey".into()]),
            ..Default::default()
        },
    )
    .unwrap();
    assert_denied(
        f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value),
        DenyReason::OperationNotAllowed,
    );
    // Rotation keeps key_ops.
    assert_eq!(f.v.rotate_key("k").unwrap().key_ops, vec!["wrapKey"]);
    for bad in [
        vec!["fly".to_string()],
        vec!["wrapKey".to_string(), "wrapKey".to_string()],
    ] {
        let e =
            f.v.update_key(
                "k",
                None,
                &KeyUpdate {
                    key_ops: Some(bad),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(e, VaultError::Invalid(_)), "{e}");
    }
}

// ---------------------------------------------------------------- import

#[test]
fn import_pkcs8_der_and_pem_and_pkcs1() {
    let f = Fx::new();
    let (key, der) = outside_key(KeySize::Rsa2048);
    let info =
        f.v.import_key("imp", &der, &ImportKeyOptions::default())
            .unwrap();
    assert!(info.imported);
    assert_eq!(info.key_size, 2048);
    // The vault wraps with the imported key: the original holder can decrypt.
    let w =
        f.v.wrap_key("imp", None, WrapAlg::RsaOaep256, &DEK)
            .unwrap();
    let dec = OaepPrivateDecryptingKey::new(key).unwrap();
    let mut out = vec![0u8; dec.min_output_size()];
    assert_eq!(
        dec.decrypt(&OAEP_SHA256_MGF1SHA256, &w.value, &mut out, None)
            .unwrap(),
        &DEK
    );
    // PEM PKCS#8 adds a version to the existing key.
    let (_, der2) = outside_key(KeySize::Rsa3072);
    let pem8 = pem("PRIVATE KEY", &der2);
    let p8 = vault::local::read_private_key(pem8.as_bytes()).unwrap();
    let sha1 = ImportKeyOptions {
        wrap_alg: Some(WrapAlg::RsaOaep),
    };
    let e = f.v.import_key("imp", &p8, &sha1).unwrap_err();
    assert!(
        matches!(&e, VaultError::Invalid(m) if m.contains("per key")),
        "{e}"
    );
    assert_eq!(
        f.v.list_key_versions("imp").unwrap().len(),
        1,
        "nothing written"
    );
    let v2 =
        f.v.import_key("imp", &p8, &ImportKeyOptions::default())
            .unwrap();
    assert_eq!((v2.key_size, v2.wrap_alg), (3072, WrapAlg::RsaOaep256));
    assert_eq!(f.v.list_key_versions("imp").unwrap().len(), 2);
    let v3 = f.v.import_key("imp-sha1", &p8, &sha1).unwrap();
    assert_eq!(v3.wrap_alg, WrapAlg::RsaOaep);
    // PKCS#1 PEM is converted.
    let (_, der3) = outside_key(KeySize::Rsa2048);
    let pem1 = pem("RSA PRIVATE KEY", &pkcs8_to_pkcs1(&der3));
    let p8 = vault::local::read_private_key(pem1.as_bytes()).unwrap();
    let v3 =
        f.v.import_key("imp2", &p8, &ImportKeyOptions::default())
            .unwrap();
    let w =
        f.v.wrap_key("imp2", None, WrapAlg::RsaOaep256, &DEK)
            .unwrap();
    assert_eq!(w.kid.version, v3.version);
    assert_eq!(
        &f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
            .unwrap()[..],
        &DEK
    );
    // Raw PKCS#1 DER too.
    assert!(vault::local::read_private_key(&pkcs8_to_pkcs1(&der3)).is_ok());
}

#[test]
fn import_refuses_bad_keys_and_writes_nothing() {
    let f = Fx::new();
    f.v.create_key("k", &opts()).unwrap();
    let before = fs::read(f.store().join("keys/k/key.json")).unwrap();
    let err_of = |bytes: &[u8]| -> String {
        match vault::local::read_private_key(bytes) {
            Err(e) => e.to_string(),
            Ok(der) => {
                f.v.import_key("k", &der, &ImportKeyOptions::default())
                    .unwrap_err()
                    .to_string()
            }
        }
    };
    let small = err_of(rsa1024_pkcs8_pem(f.dir.path()).as_bytes());
    assert!(small.contains("smaller than 2048"), "{small}");
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let ec = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .unwrap();
    let m = err_of(pem("PRIVATE KEY", ec.as_ref()).as_bytes());
    assert!(m.contains("not an RSA key"), "{m}");
    let m = err_of(ec.as_ref());
    assert!(m.contains("not an RSA key"), "{m}");
    let m = err_of(encrypted_pkcs8_pem(f.dir.path()).as_bytes());
    assert!(m.contains("encrypted"), "{m}");
    let m = err_of(b"hello world");
    assert!(m.contains("not a private key"), "{m}");
    let m = err_of(pem("PUBLIC KEY", b"xyz").as_bytes());
    assert!(m.contains("public key"), "{m}");
    let m = err_of(b"-----BEGIN PRIVATE KEY-----\n@@@@\n-----END PRIVATE KEY-----\n");
    assert!(m.contains("PEM"), "{m}");
    let (_, der) = outside_key(KeySize::Rsa2048);
    let m =
        f.v.import_key("bad_name", &der, &ImportKeyOptions::default())
            .unwrap_err()
            .to_string();
    assert!(m.contains("invalid key name"), "{m}");
    // Nothing changed.
    assert_eq!(fs::read(f.store().join("keys/k/key.json")).unwrap(), before);
    assert_eq!(fs::read_dir(f.store().join("keys/k")).unwrap().count(), 2);
    assert_eq!(f.v.list_keys().unwrap().len(), 1);
}

// ---------------------------------------------------------------- soft delete

#[test]
fn soft_delete_recover_purge_and_name_conflict() {
    let f = Fx::new();
    let k = f.v.create_key("k", &opts()).unwrap();
    let w = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let d = f.v.delete_key("k").unwrap();
    assert_eq!(d.recovery_id, "local:/deletedkeys/k");
    assert_eq!(d.scheduled_purge_date, d.deleted_date + 90 * 86_400);
    assert_eq!(d.key.kid, k.kid);
    // A deleted key refuses everything.
    assert_denied(f.v.get_key("k", None), DenyReason::KeyDeleted);
    assert_denied(
        f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK),
        DenyReason::KeyDeleted,
    );
    assert_denied(
        f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value),
        DenyReason::KeyDeleted,
    );
    assert_denied(f.v.rotate_key("k"), DenyReason::KeyDeleted);
    assert!(f.v.list_keys().unwrap().is_empty());
    // Listed and shown as deleted.
    let listed = f.v.list_deleted_keys().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], d);
    assert_eq!(f.v.get_deleted_key("k").unwrap(), d);
    // The name cannot be reused: Conflict, and nothing changes.
    for e in [
        f.v.create_key("k", &opts()).unwrap_err(),
        f.v.import_key(
            "k",
            &outside_key(KeySize::Rsa2048).1,
            &ImportKeyOptions::default(),
        )
        .unwrap_err(),
        f.v.delete_key("k").unwrap_err(),
    ] {
        assert!(matches!(e, VaultError::Conflict(_)), "{e}");
    }
    assert_eq!(f.v.get_deleted_key("k").unwrap(), d);
    // Recover: everything works again.
    let r = f.v.recover_deleted_key("k").unwrap();
    assert_eq!(r.kid, k.kid);
    assert_eq!(
        &f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
            .unwrap()[..],
        &DEK
    );
    assert!(matches!(
        f.v.recover_deleted_key("k"),
        Err(VaultError::NotFound(_))
    ));
    assert!(matches!(
        f.v.get_deleted_key("k"),
        Err(VaultError::NotFound(_))
    ));
    assert!(
        matches!(f.v.purge_deleted_key("k"), Err(VaultError::Conflict(_))),
        "purge needs delete first"
    );
    // Delete + purge: gone for good; unwrap of an old kid is a denial (purged).
    f.v.delete_key("k").unwrap();
    f.v.purge_deleted_key("k").unwrap();
    assert!(!f.store().join("keys/k").exists());
    assert_denied(
        f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value),
        DenyReason::KeyPurged,
    );
    assert!(matches!(
        f.v.get_deleted_key("k"),
        Err(VaultError::NotFound(_))
    ));
    assert!(matches!(
        f.v.purge_deleted_key("k"),
        Err(VaultError::NotFound(_))
    ));
    // Now the name is free.
    assert_ne!(f.v.create_key("k", &opts()).unwrap().version, k.version);
    assert!(matches!(
        f.v.delete_key("nope"),
        Err(VaultError::NotFound(_))
    ));
}

#[test]
fn retention_is_configurable_within_7_to_90_days() {
    let f = Fx::new();
    let p = f.v.config().unwrap();
    assert_eq!(
        (p.retention_days, p.purge_protection, p.soft_delete),
        (90, false, true)
    );
    for bad in [0, 6, 91, 365] {
        let e =
            f.v.configure(&ConfigUpdate {
                retention_days: Some(bad),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            matches!(&e, VaultError::Invalid(m) if m.contains("7 to 90")),
            "{e}"
        );
    }
    assert_eq!(
        f.v.config().unwrap().retention_days,
        90,
        "refusals change nothing"
    );
    let p =
        f.v.configure(&ConfigUpdate {
            retention_days: Some(7),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(p.retention_days, 7);
    let k = f.v.create_key("k", &opts()).unwrap();
    assert_eq!(
        f.v.get_key("k", None).unwrap().recovery_level,
        "CustomizedRecoverable+Purgeable"
    );
    let d = f.v.delete_key("k").unwrap();
    assert_eq!(d.scheduled_purge_date - d.deleted_date, 7 * 86_400);
    drop(k);
}

#[test]
fn purge_protection_is_one_way_and_delays_purge() {
    let f = Fx::new();
    f.v.configure(&ConfigUpdate {
        retention_days: Some(30),
        ..Default::default()
    })
    .unwrap();
    let p =
        f.v.configure(&ConfigUpdate {
            purge_protection: Some(true),
            ..Default::default()
        })
        .unwrap();
    assert!(p.purge_protection);
    assert_eq!(f.v.properties().unwrap(), p);
    let e =
        f.v.configure(&ConfigUpdate {
            purge_protection: Some(false),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(&e, VaultError::Conflict(m) if m.contains("never")),
        "{e}"
    );
    let e =
        f.v.configure(&ConfigUpdate {
            retention_days: Some(10),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(e, VaultError::Conflict(_)),
        "retention cannot shrink under protection: {e}"
    );
    assert!(f.v.config().unwrap().purge_protection);
    assert_eq!(f.v.config().unwrap().retention_days, 30);
    f.v.create_key("k", &opts()).unwrap();
    assert_eq!(
        f.v.get_key("k", None).unwrap().recovery_level,
        "CustomizedRecoverable"
    );
    f.v.delete_key("k").unwrap();
    let e = f.v.purge_deleted_key("k").unwrap_err();
    assert!(
        matches!(&e, VaultError::Conflict(m) if m.contains("purge protection")),
        "{e}"
    );
    assert!(f.at(29 * DAY).purge_deleted_key("k").is_err());
    assert!(f.v.get_deleted_key("k").is_ok());
    // After the retention: allowed.
    f.at(30 * DAY + 1).purge_deleted_key("k").unwrap();
    assert!(matches!(
        f.v.get_deleted_key("k"),
        Err(VaultError::NotFound(_))
    ));
}

#[test]
fn deleted_keys_are_purged_automatically_after_retention() {
    let f = Fx::new();
    f.v.configure(&ConfigUpdate {
        retention_days: Some(7),
        ..Default::default()
    })
    .unwrap();
    f.v.create_key("old", &opts()).unwrap();
    f.v.delete_key("old").unwrap();
    f.v.create_key("young", &opts()).unwrap();
    let later = f.at(8 * DAY);
    later.delete_key("young").unwrap(); // any state change runs housekeeping
    assert!(matches!(
        f.v.get_deleted_key("old"),
        Err(VaultError::NotFound(_))
    ));
    assert!(f.v.get_deleted_key("young").is_ok());
    let purges: Vec<AuditEvent> = f
        .audit()
        .into_iter()
        .filter(|e| e.operation_name == "KeyPurge")
        .collect();
    assert_eq!(purges.len(), 1);
    assert!(purges[0].result_description.contains("automatically"));
}

// ---------------------------------------------------------------- identities and policies

fn app(f: &Fx, name: &str) -> (LocalVault, vault::Credential) {
    let (info, cred) = f.v.create_identity(name).unwrap();
    assert_eq!(info.name, name);
    let conn = LocalVault::open_with_credential(&f.store(), &cred).unwrap();
    (conn, cred)
}

#[test]
fn identities_authenticate_with_their_credential() {
    let f = Fx::new();
    let (_conn, cred) = app(&f, "app1");
    assert_eq!(cred.identity, "app1");
    assert_eq!(cred.vault, "local:");
    assert!(
        !format!("{cred:?}").contains(cred.secret.as_str()),
        "Debug hides the secret"
    );
    // The vault keeps only a hash of the secret.
    let rec = fs::read_to_string(f.store().join("identities/app1.json")).unwrap();
    assert!(!rec.contains(cred.secret.as_str()));
    assert_denied(
        LocalVault::open_as(&f.store(), "app1", "wrong"),
        DenyReason::PermissionDenied,
    );
    assert_denied(
        LocalVault::open_as(&f.store(), "ghost", &cred.secret),
        DenyReason::PermissionDenied,
    );
    assert!(matches!(
        f.v.create_identity("app1"),
        Err(VaultError::Conflict(_))
    ));
    for bad in ["owner", "OWNER", "a b", ""] {
        assert!(
            matches!(f.v.create_identity(bad), Err(VaultError::Invalid(_))),
            "{bad:?}"
        );
    }
    let failed: Vec<AuditEvent> = f
        .audit()
        .into_iter()
        .filter(|e| e.operation_name == "Authentication")
        .collect();
    assert_eq!(failed.len(), 2, "failed sign-ins are audited");
    assert_eq!(failed[0].identity, "app1");
    assert_eq!(failed[0].properties.http_status_code, 403);
    let ids: Vec<String> =
        f.v.list_identities()
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
    assert_eq!(ids, vec!["app1"]);
    // Credential files round-trip and are 0600.
    let path = f.dir.path().join("cred.json");
    cred.save_new(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(cred.save_new(&path).is_err(), "never overwritten");
    let loaded = vault::Credential::load(&path).unwrap();
    assert!(LocalVault::open_with_credential(&f.store(), &loaded).is_ok());
    let home = Home::at(f.dir.path());
    assert!(vault::open_with_credential(&home, &loaded).is_ok());
}

#[test]
fn access_policies_are_checked_on_every_call() {
    let f = Fx::new();
    f.v.create_key("k", &opts()).unwrap();
    f.v.create_key("other", &opts()).unwrap();
    let w = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let (app, _) = app(&f, "app");
    // No policy: nothing.
    assert_denied(app.get_key("k", None), DenyReason::PermissionDenied);
    assert_denied(
        app.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK),
        DenyReason::PermissionDenied,
    );
    assert_denied(
        app.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value),
        DenyReason::PermissionDenied,
    );
    assert_denied(app.list_keys(), DenyReason::PermissionDenied);
    assert_denied(app.create_key("new", &opts()), DenyReason::PermissionDenied);
    assert!(app.permissions("k").unwrap().is_empty());
    // Denials name the identity and the permission; nothing leaks about the key's existence.
    let e = app.get_key("no-such-key", None).unwrap_err();
    assert_eq!(deny_reason(&e), Some(DenyReason::PermissionDenied));
    assert!(e.to_string().contains("lacks the get permission"), "{e}");
    // The DES trio on one key.
    let pol =
        f.v.set_policy(
            "app",
            &PolicyScope::Key("k".into()),
            &[Permission::Get, Permission::WrapKey, Permission::UnwrapKey],
        )
        .unwrap();
    assert_eq!(
        pol.permissions,
        vec![Permission::Get, Permission::WrapKey, Permission::UnwrapKey]
    );
    assert!(app.get_key("k", None).is_ok());
    let w2 = app.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    assert_eq!(
        &app.unwrap_key(&w2.kid, WrapAlg::RsaOaep256, &w2.value)
            .unwrap()[..],
        &DEK
    );
    assert_denied(app.rotate_key("k"), DenyReason::PermissionDenied);
    assert_denied(app.delete_key("k"), DenyReason::PermissionDenied);
    assert_denied(
        app.update_key(
            "k",
            None,
            &KeyUpdate {
                enabled: Some(false),
                ..Default::default()
            },
        ),
        DenyReason::PermissionDenied,
    );
    assert_denied(app.get_key("other", None), DenyReason::PermissionDenied);
    // list on all keys; rotate on one.
    f.v.set_policy("app", &PolicyScope::AllKeys, &[Permission::List])
        .unwrap();
    assert_eq!(app.list_keys().unwrap().len(), 2);
    f.v.set_policy(
        "app",
        &PolicyScope::Key("other".into()),
        &[Permission::Rotate],
    )
    .unwrap();
    assert!(app.rotate_key("other").is_ok());
    let mut perms = app.permissions("k").unwrap();
    perms.sort();
    assert_eq!(
        perms,
        vec![
            Permission::Get,
            Permission::List,
            Permission::WrapKey,
            Permission::UnwrapKey
        ]
    );
    // Revocation takes effect on the open connection at once.
    f.v.remove_policy("app", &PolicyScope::Key("k".into()))
        .unwrap();
    assert_denied(
        app.unwrap_key(&w2.kid, WrapAlg::RsaOaep256, &w2.value),
        DenyReason::PermissionDenied,
    );
    // An empty permission list removes the policy.
    f.v.set_policy("app", &PolicyScope::AllKeys, &[]).unwrap();
    assert_eq!(f.v.list_policies(Some("app")).unwrap().len(), 1);
    // Listing is filtered by the list permission per key.
    f.v.set_policy("app", &PolicyScope::Key("k".into()), &[Permission::List])
        .unwrap();
    let names: Vec<String> = app
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, vec!["k"]);
    // Deleting the identity kills its credential.
    f.v.set_policy("app", &PolicyScope::AllKeys, &Permission::ALL)
        .unwrap();
    assert!(app.get_key("k", None).is_ok());
    f.v.delete_identity("app").unwrap();
    assert_denied(app.get_key("k", None), DenyReason::PermissionDenied);
    assert!(f.v.list_policies(None).unwrap().is_empty());
}

#[test]
fn identity_lifecycle_permissions() {
    let f = Fx::new();
    let (app, _) = app(&f, "ops");
    f.v.set_policy(
        "ops",
        &PolicyScope::AllKeys,
        &[
            Permission::Create,
            Permission::Delete,
            Permission::Get,
            Permission::List,
        ],
    )
    .unwrap();
    app.create_key("k", &opts()).unwrap();
    app.delete_key("k").unwrap();
    assert_eq!(app.list_deleted_keys().unwrap().len(), 1);
    assert_denied(app.recover_deleted_key("k"), DenyReason::PermissionDenied);
    assert_denied(app.purge_deleted_key("k"), DenyReason::PermissionDenied);
    f.v.set_policy(
        "ops",
        &PolicyScope::Key("k".into()),
        &[Permission::Recover, Permission::Purge],
    )
    .unwrap();
    app.recover_deleted_key("k").unwrap();
    app.delete_key("k").unwrap();
    app.purge_deleted_key("k").unwrap();
    assert_denied(
        app.import_key(
            "imp",
            &outside_key(KeySize::Rsa2048).1,
            &ImportKeyOptions::default(),
        ),
        DenyReason::PermissionDenied,
    );
    // Identities never administer the vault.
    assert_denied(app.create_identity("x"), DenyReason::PermissionDenied);
    assert_denied(app.list_identities(), DenyReason::PermissionDenied);
    assert_denied(
        app.set_policy("ops", &PolicyScope::AllKeys, &Permission::ALL),
        DenyReason::PermissionDenied,
    );
    assert_denied(app.list_policies(None), DenyReason::PermissionDenied);
    assert_denied(
        app.configure(&ConfigUpdate {
            purge_protection: Some(true),
            ..Default::default()
        }),
        DenyReason::PermissionDenied,
    );
    assert!(app.audit_reader().is_err());
    assert!(
        app.properties().is_ok(),
        "any identity may read the vault settings"
    );
    assert!(!f.v.config().unwrap().purge_protection);
}

#[test]
fn policy_bad_input() {
    let f = Fx::new();
    f.v.create_key("k", &opts()).unwrap();
    let e =
        f.v.set_policy("ghost", &PolicyScope::Key("k".into()), &[Permission::Get])
            .unwrap_err();
    assert!(
        matches!(&e, VaultError::NotFound(m) if m.contains("identity ghost")),
        "{e}"
    );
    f.v.create_identity("app").unwrap();
    let e =
        f.v.set_policy("app", &PolicyScope::Key("nope".into()), &[Permission::Get])
            .unwrap_err();
    assert!(
        matches!(&e, VaultError::NotFound(m) if m.contains("key nope")),
        "{e}"
    );
    assert!(matches!(
        f.v.set_policy("app", &PolicyScope::Key("a/b".into()), &[Permission::Get]),
        Err(VaultError::Invalid(_))
    ));
    assert!(matches!(
        f.v.remove_policy("app", &PolicyScope::AllKeys),
        Err(VaultError::NotFound(_))
    ));
    assert!(matches!(
        f.v.delete_identity("ghost"),
        Err(VaultError::NotFound(_))
    ));
    assert!(matches!(
        f.v.list_policies(Some("ghost")),
        Err(VaultError::NotFound(_))
    ));
    assert!(f.v.list_policies(None).unwrap().is_empty());
    assert!(matches!(
        "fly".parse::<Permission>(),
        Err(VaultError::Invalid(_))
    ));
    assert_eq!(
        "WRAPKEY".parse::<Permission>().unwrap(),
        Permission::WrapKey
    );
}

// ---------------------------------------------------------------- audit

#[test]
fn audit_log_records_every_operation() {
    let f = Fx::new();
    let k = f.v.create_key("k", &opts()).unwrap();
    let w = f.v.wrap_key("k", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    f.v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
        .unwrap();
    let _ = f.v.get_key("nope", None);
    f.v.delete_key("k").unwrap();
    let _ = f.v.create_key("k", &opts());
    let (app, _) = app(&f, "app");
    let _ = app.list_keys();
    let ev = f.audit();
    let ops: Vec<&str> = ev.iter().map(|e| e.operation_name.as_str()).collect();
    assert_eq!(
        ops,
        vec![
            "KeyCreate",
            "KeyWrap",
            "KeyUnwrap",
            "KeyGet",
            "KeyDelete",
            "KeyCreate",
            "IdentityCreate",
            "KeyList"
        ]
    );
    let wrap = &ev[1];
    assert_eq!(wrap.category, "AuditEvent");
    assert_eq!(wrap.resource_id, "local:");
    assert_eq!(wrap.identity, "owner");
    assert_eq!(wrap.properties.id, k.kid, "the versioned kid");
    assert_eq!(
        (
            wrap.result_type.as_str(),
            wrap.result_signature.as_str(),
            wrap.properties.http_status_code
        ),
        ("Success", "OK", 200)
    );
    assert!(humantime::parse_rfc3339(&wrap.time).is_ok());
    assert_eq!(ev[3].properties.http_status_code, 404);
    assert_eq!(ev[3].result_type, "Failure");
    assert!(ev[3].result_description.contains("nope"));
    assert_eq!(ev[5].properties.http_status_code, 409);
    assert_eq!(ev[7].identity, "app");
    assert_eq!(ev[7].properties.http_status_code, 403);
    assert_eq!(ev[7].result_signature, "Forbidden");
    // Raw lines are JSON with Key Vault's field names; no secrets in them.
    let raw = fs::read_to_string(f.store().join("audit.log")).unwrap();
    assert_eq!(raw.lines().count(), 8);
    for line in raw.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for field in [
            "time",
            "operationName",
            "resultType",
            "resultSignature",
            "durationMs",
            "identity",
        ] {
            assert!(v.get(field).is_some(), "{field} in {line}");
        }
        assert!(v["properties"]["httpStatusCode"].is_u64());
    }
    // The reader is incremental.
    let mut r = f.v.audit_reader().unwrap();
    assert_eq!(r.read_new().unwrap().len(), 8);
    assert!(r.read_new().unwrap().is_empty());
    f.v.list_deleted_keys().unwrap();
    let new = r.read_new().unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].operation_name, "KeyListDeleted");
}

#[test]
fn key_info_json_holds_only_public_facts() {
    let f = Fx::new();
    let k = f.v.create_key("k", &opts()).unwrap();
    let json = serde_json::to_value(&k).unwrap();
    let fields: Vec<&String> = json.as_object().unwrap().keys().collect();
    for f in &fields {
        assert!(
            !["d", "p", "q", "dp", "dq", "qi", "pkcs8", "private"].contains(&f.as_str()),
            "{f}"
        );
    }
    let pk8 = fs::read(f.store().join(format!("keys/k/{}.pk8", k.version))).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&pk8[pk8.len() - 64..]);
    assert!(!json.to_string().contains(&b64[..40]));
}

// ---------------------------------------------------------------- command line

struct Cli {
    home: tempfile::TempDir,
}

impl Cli {
    fn new() -> Cli {
        Cli {
            home: tempfile::tempdir().unwrap(),
        }
    }
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cmkfs"));
        cmd.args(args)
            .env("CMKFS_HOME", self.home.path())
            .env_remove("RUST_LOG");
        passphrase_env(&mut cmd, self.home.path()).output().unwrap()
    }
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    #[track_caller]
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let s = self.ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: {e}: {s}"))
    }
    /// Runs a command that must fail; returns its single stderr line.
    #[track_caller]
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line on stderr: {err}"
        );
        err
    }
}

#[test]
fn cli_key_create_list_show_rotate() {
    let c = Cli::new();
    let out = c.ok(&["vault", "key", "create", "k1", "--key-size", "2048"]);
    assert!(out.contains("created local:/keys/k1/"), "{out}");
    let k = c.json(&["vault", "key", "show", "k1", "--json"]);
    let kid = k["kid"].as_str().unwrap();
    assert!(kid.parse::<KeyId>().is_ok(), "full versioned kid: {kid}");
    assert_eq!(k["key_size"], 2048);
    let r = c.json(&["vault", "key", "rotate", "k1", "--json"]);
    assert_ne!(r["version"], k["version"]);
    let shown = c.json(&[
        "vault",
        "key",
        "show",
        "k1",
        "--version",
        k["version"].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(shown["kid"], k["kid"]);
    let list = c.json(&["vault", "key", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["version"], r["version"]);
    let versions = c.json(&["vault", "key", "versions", "k1", "--json"]);
    assert_eq!(versions.as_array().unwrap().len(), 2);
    let human = c.ok(&["vault", "key", "list"]);
    assert!(human.contains("k1") && human.contains("NAME"), "{human}");
    let human = c.ok(&["vault", "key", "show", "k1"]);
    assert!(human.contains(r["kid"].as_str().unwrap()), "{human}");
    assert_private_tree(&c.home.path().join("vault"));
}

#[test]
fn cli_default_key_size_is_3072() {
    let c = Cli::new();
    let k = c.json(&["vault", "key", "create", "big", "--json"]);
    assert_eq!(k["key_size"], 3072);
    assert_eq!(k["wrap_alg"], "RSA-OAEP-256");
}

#[test]
fn cli_errors_are_one_line_and_non_zero() {
    let c = Cli::new();
    assert!(c
        .fails(&["vault", "key", "create", "bad_name"])
        .contains("invalid key name"));
    assert!(c
        .fails(&["vault", "key", "create", "k", "--key-size", "1024"])
        .contains("1024"));
    assert!(c.fails(&["vault", "key", "show", "nope"]).contains("nope"));
    assert!(c
        .fails(&["vault", "key", "rotate", "nope"])
        .contains("nope"));
    c.ok(&["vault", "key", "create", "k", "--key-size", "2048"]);
    assert!(c
        .fails(&["vault", "key", "create", "k", "--key-size", "2048"])
        .contains("rotate"));
    assert!(c
        .fails(&["vault", "key", "show", "k", "--version", "abc"])
        .contains("abc"));
    assert!(c
        .fails(&["vault", "key", "update", "k", "--exp", "soon"])
        .contains("invalid time"));
    assert!(c
        .fails(&["vault", "config", "--retention-days", "3"])
        .contains("7 to 90"));
    assert!(c
        .fails(&[
            "vault",
            "key",
            "import",
            "k",
            "--file",
            "/nonexistent/key.pem"
        ])
        .contains("cannot read"));
    assert!(c
        .fails(&[
            "vault",
            "policy",
            "set",
            "ghost",
            "--all-keys",
            "--permissions",
            "get"
        ])
        .contains("ghost"));
    assert!(c
        .fails(&[
            "vault",
            "policy",
            "set",
            "ghost",
            "--all-keys",
            "--permissions",
            "fly"
        ])
        .contains("fly"));
    assert!(c
        .fails(&["vault", "--credential", "/nonexistent", "key", "list"])
        .contains("credential"));
}

#[test]
fn cli_update_delete_recover_purge() {
    let c = Cli::new();
    c.ok(&["vault", "key", "create", "k", "--key-size", "2048"]);
    let k = c.json(&["vault", "key", "update", "k", "--disable", "--json"]);
    assert_eq!(k["enabled"], false);
    assert_eq!(
        c.json(&["vault", "key", "show", "k", "--json"])["enabled"],
        false
    );
    let k = c.json(&[
        "vault", "key", "update", "k", "--enable", "--nbf", "now", "--exp", "+30d", "--json",
    ]);
    assert_eq!(k["enabled"], true);
    let (nbf, exp) = (k["nbf"].as_u64().unwrap(), k["exp"].as_u64().unwrap());
    assert_eq!(exp - nbf, 30 * 86_400);
    let k = c.json(&[
        "vault",
        "key",
        "update",
        "k",
        "--exp",
        "none",
        "--key-ops",
        "wrapKey,unwrapKey",
        "--json",
    ]);
    assert!(k["exp"].is_null());
    let d = c.json(&["vault", "key", "delete", "k", "--json"]);
    assert_eq!(d["recovery_id"], "local:/deletedkeys/k");
    assert!(c.fails(&["vault", "key", "show", "k"]).contains("recover"));
    assert!(c
        .fails(&["vault", "key", "create", "k", "--key-size", "2048"])
        .contains("soft-deleted"));
    let listed = c.json(&["vault", "key", "list-deleted", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(
        c.json(&["vault", "key", "show-deleted", "k", "--json"])["key"]["name"],
        "k"
    );
    c.ok(&["vault", "key", "recover", "k"]);
    c.ok(&["vault", "key", "show", "k"]);
    c.ok(&["vault", "key", "delete", "k"]);
    c.ok(&["vault", "key", "purge", "k"]);
    assert!(c
        .json(&["vault", "key", "list-deleted", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn cli_config_and_purge_protection() {
    let c = Cli::new();
    // Showing the settings of a home without a vault creates none.
    assert!(c
        .fails(&["vault", "config", "--json"])
        .contains("there is no vault in"));
    c.ok(&["vault", "key", "create", "first", "--key-size", "2048"]);
    let p = c.json(&["vault", "config", "--json"]);
    assert_eq!(
        (
            p["retention_days"].as_u64(),
            p["purge_protection"].as_bool()
        ),
        (Some(90), Some(false))
    );
    let p = c.json(&[
        "vault",
        "config",
        "--retention-days",
        "14",
        "--purge-protection",
        "on",
        "--json",
    ]);
    assert_eq!(
        (
            p["retention_days"].as_u64(),
            p["purge_protection"].as_bool()
        ),
        (Some(14), Some(true))
    );
    assert!(c
        .fails(&["vault", "config", "--purge-protection", "off"])
        .contains("never"));
    c.ok(&["vault", "key", "create", "k", "--key-size", "2048"]);
    c.ok(&["vault", "key", "delete", "k"]);
    assert!(c
        .fails(&["vault", "key", "purge", "k"])
        .contains("purge protection"));
    assert!(c
        .ok(&["vault", "config"])
        .contains("on (cannot be turned off)"));
}

#[test]
fn cli_import() {
    let c = Cli::new();
    let (_, der) = outside_key(KeySize::Rsa2048);
    let pem_path = c.home.path().join("key.pem");
    fs::write(&pem_path, pem("PRIVATE KEY", &der)).unwrap();
    let k = c.json(&[
        "vault",
        "key",
        "import",
        "imp",
        "--file",
        pem_path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(k["imported"], true);
    let small = c.home.path().join("small.pem");
    fs::write(&small, rsa1024_pkcs8_pem(c.home.path())).unwrap();
    assert!(c
        .fails(&[
            "vault",
            "key",
            "import",
            "imp",
            "--file",
            small.to_str().unwrap()
        ])
        .contains("2048"));
    assert_eq!(
        c.json(&["vault", "key", "versions", "imp", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn cli_identities_policies_and_credentials() {
    let c = Cli::new();
    c.ok(&["vault", "key", "create", "k", "--key-size", "2048"]);
    let id = c.json(&["vault", "identity", "create", "app", "--json"]);
    let cred = id["credential_file"].as_str().unwrap().to_string();
    assert_eq!(
        cred,
        c.home.path().join("credentials/app.json").to_str().unwrap()
    );
    assert_eq!(
        fs::metadata(&cred).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(c
        .fails(&["vault", "identity", "create", "app"])
        .contains("already exists"));
    let other = c.home.path().join("other.json");
    c.ok(&[
        "vault",
        "identity",
        "create",
        "app2",
        "--credential-file",
        other.to_str().unwrap(),
    ]);
    assert!(other.is_file());
    let ids = c.json(&["vault", "identity", "list", "--json"]);
    assert_eq!(ids.as_array().unwrap().len(), 2);
    // No policy yet: the identity is refused.
    let e = c.fails(&["vault", "--credential", &cred, "key", "show", "k"]);
    assert!(e.contains("lacks the get permission"), "{e}");
    let p = c.json(&[
        "vault",
        "policy",
        "set",
        "app",
        "--key",
        "k",
        "--permissions",
        "get,wrapKey,unwrapKey",
        "--json",
    ]);
    assert_eq!(
        p["permissions"],
        serde_json::json!(["get", "wrapKey", "unwrapKey"])
    );
    c.ok(&["vault", "--credential", &cred, "key", "show", "k"]);
    assert!(c
        .fails(&["vault", "--credential", &cred, "key", "rotate", "k"])
        .contains("rotate"));
    assert!(c
        .fails(&["vault", "--credential", &cred, "identity", "list"])
        .contains("owner"));
    c.ok(&[
        "vault",
        "policy",
        "set",
        "app2",
        "--all-keys",
        "--permissions",
        "all",
    ]);
    let pols = c.json(&["vault", "policy", "list", "--json"]);
    assert_eq!(pols.as_array().unwrap().len(), 2);
    assert_eq!(pols[1]["key"], "*");
    assert_eq!(
        pols[1]["permissions"].as_array().unwrap().len(),
        Permission::ALL.len()
    );
    c.ok(&["vault", "policy", "remove", "app", "--key", "k"]);
    assert!(c
        .fails(&["vault", "--credential", &cred, "key", "show", "k"])
        .contains("lacks"));
    c.ok(&["vault", "identity", "delete", "app"]);
    assert!(c
        .fails(&["vault", "--credential", &cred, "key", "list"])
        .contains("unknown"));
    assert!(c.ok(&["vault", "policy", "list"]).contains("app2"));
}

#[test]
fn cli_audit() {
    let c = Cli::new();
    c.ok(&["vault", "key", "create", "k", "--key-size", "2048"]);
    let _ = c.run(&["vault", "key", "show", "nope"]);
    let out = c.ok(&["vault", "audit", "--json"]);
    let events: Vec<AuditEvent> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events
        .iter()
        .any(|e| e.operation_name == "KeyCreate" && e.succeeded()));
    assert!(events
        .iter()
        .any(|e| e.operation_name == "KeyGet" && e.properties.http_status_code == 404));
    let failures = c.ok(&["vault", "audit", "--failures"]);
    assert_eq!(failures.lines().count(), 1, "{failures}");
    assert!(failures.contains("KeyGet") && failures.contains("404"));
    let only_k = c.ok(&["vault", "audit", "--key", "k", "--json"]);
    assert!(only_k.lines().all(|l| l.contains("local:/keys/k")));
    assert_eq!(
        c.ok(&["vault", "audit", "--tail", "1", "--json"])
            .lines()
            .count(),
        1
    );
    // --follow prints events written after it started.
    let mut child = passphrase_env(
        &mut Command::new(env!("CARGO_BIN_EXE_cmkfs")),
        c.home.path(),
    )
    .args(["vault", "audit", "--follow", "--json", "--key", "k"])
    .env("CMKFS_HOME", c.home.path())
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.ok(&["vault", "key", "rotate", "k"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(&mut stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut saw_rotate = false;
    while std::time::Instant::now() < deadline && !saw_rotate {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            saw_rotate = line.contains("KeyRotate");
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(saw_rotate, "--follow showed the rotation");
}
