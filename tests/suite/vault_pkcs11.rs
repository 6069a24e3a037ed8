//! Integration tests of the PKCS#11 vault backend (`vault::pkcs11`) on SoftHSM2, with
//! throwaway tokens in temporary directories (SOFTHSM2_CONF). scripts/test.sh installs
//! softhsm2.
//!
//! A PKCS#11 module is initialized once per process with the configuration it finds then, so
//! everything that loads the module in this process happens in one test; the command-line
//! test runs `cmkfs` children with their own configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cmkfs::vault::pkcs11::Pkcs11Vault;
use cmkfs::vault::{
    CreateKeyOptions, DenyReason, ErrorClass, KeyId, KeyUpdate, Vault, VaultError, WrapAlg,
};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const DEK: [u8; 64] = [0x37; 64];

/// A SoftHSM2 configuration with its own token directory.
struct Hsm {
    dir: tempfile::TempDir,
}

impl Hsm {
    fn new(tokens: &[&str]) -> Hsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: install softhsm2 (scripts/test.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("pin"), "1234\n").unwrap();
        let hsm = Hsm { dir };
        for t in tokens {
            let out = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", t])
                .args(["--so-pin", "5678", "--pin", "1234"])
                .env("SOFTHSM2_CONF", hsm.conf())
                .stdin(Stdio::null())
                .output()
                .expect("softhsm2-util (install softhsm2)");
            assert!(
                out.status.success(),
                "softhsm2-util: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        hsm
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    fn url(&self, token: &str) -> String {
        format!(
            "pkcs11:{MODULE}?token={token}&pin-source=file:{}",
            self.dir.path().join("pin").display()
        )
    }
}

fn sha1_opts() -> CreateKeyOptions {
    CreateKeyOptions {
        key_size: 2048,
        wrap_alg: WrapAlg::RsaOaep,
    }
}

#[track_caller]
fn assert_denied<T: std::fmt::Debug>(r: Result<T, VaultError>, reason: DenyReason) {
    let e = r.expect_err("expected a denial");
    match &e {
        VaultError::Denied { reason: got, .. } => assert_eq!(*got, reason, "{e}"),
        other => panic!("expected {reason:?}, got {other}"),
    }
    assert_eq!(e.class(), ErrorClass::Denied);
}

/// Reads attributes of the private key objects on a token with raw cryptoki, as an HSM
/// administrator would (the module is already initialized by the backend in this process).
fn private_key_attributes(url: &str) -> Vec<(bool, bool, bool)> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    let token = url
        .split("token=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let ctx = Pkcs11::new(MODULE).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token)
        .unwrap();
    let s = ctx.open_ro_session(slot).unwrap();
    s.login(UserType::User, Some(&"1234".to_string().into()))
        .unwrap();
    let mut out = Vec::new();
    for h in s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
    {
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                ],
            )
            .unwrap();
        let get = |want: AttributeType| {
            attrs.iter().any(|a| {
                a.attribute_type() == want
                    && matches!(
                        a,
                        Attribute::Sensitive(true)
                            | Attribute::Extractable(true)
                            | Attribute::NeverExtractable(true)
                    )
            })
        };
        out.push((
            get(AttributeType::Sensitive),
            get(AttributeType::Extractable),
            get(AttributeType::NeverExtractable),
        ));
        // The private exponent cannot be read out.
        assert!(s
            .get_attributes(h, &[AttributeType::PrivateExponent])
            .map(|a| a.is_empty())
            .unwrap_or(true));
    }
    let _ = s.logout();
    out
}

#[test]
fn pkcs11_backend_on_softhsm() {
    let hsm = Hsm::new(&["cmkfs-a", "cmkfs-b"]);
    // Before the module is loaded (the only place this process sets it).
    std::env::set_var("SOFTHSM2_CONF", hsm.conf());
    let url = hsm.url("cmkfs-a");
    let v = Pkcs11Vault::open(&url).unwrap();
    assert_eq!(v.url(), url);

    // SoftHSM 2.6 cannot do OAEP with SHA-256: such a key is refused at creation (after a
    // test decryption), not discovered at the first unwrap.
    match v.create_key(
        "sha256",
        &CreateKeyOptions {
            key_size: 2048,
            wrap_alg: WrapAlg::RsaOaep256,
        },
    ) {
        Err(VaultError::Invalid(m)) => {
            assert!(m.contains("RSA-OAEP"), "{m}");
            assert!(
                v.list_keys().unwrap().is_empty(),
                "the refused key pair is destroyed"
            );
        }
        Ok(k) => println!("this SoftHSM supports RSA-OAEP-256 ({})", k.kid),
        Err(e) => panic!("{e}"),
    }

    let k = v.create_key("kek", &sha1_opts()).unwrap();
    assert_eq!(
        (k.kty.as_str(), k.key_size, k.wrap_alg),
        ("RSA-HSM", 2048, WrapAlg::RsaOaep)
    );
    assert_eq!(k.kid, format!("{url}/keys/kek/{}", k.version));
    assert!(matches!(
        v.create_key("kek", &sha1_opts()),
        Err(VaultError::Conflict(_))
    ));
    for (sensitive, extractable, never) in private_key_attributes(&url) {
        assert!(
            sensitive && !extractable && never,
            "private keys stay in the token"
        );
    }

    // Round trip; the unwrap happens in the token.
    let w = v.wrap_key("kek", None, WrapAlg::RsaOaep, &DEK).unwrap();
    assert_eq!(w.kid.to_string(), k.kid);
    let t0 = Instant::now();
    for _ in 0..20 {
        assert_eq!(
            &v.unwrap_key(&w.kid, WrapAlg::RsaOaep, &w.value).unwrap()[..],
            &DEK
        );
    }
    println!(
        "SoftHSM unwrap (RSA-2048, OAEP-SHA1, login per call): {:?} each",
        t0.elapsed() / 20
    );
    assert!(matches!(
        v.wrap_key("kek", None, WrapAlg::RsaOaep256, &DEK),
        Err(VaultError::Invalid(_))
    ));
    let mut bad = w.value.clone();
    bad[3] ^= 1;
    let e = v.unwrap_key(&w.kid, WrapAlg::RsaOaep, &bad).unwrap_err();
    assert!(matches!(e, VaultError::UnwrapFailed { .. }), "{e}");

    // The key id's vault URL reconnects (what a mount does with its volume header).
    let kid: KeyId = k.kid.parse().unwrap();
    let home = cmkfs::home::Home::at(hsm.dir.path().join("home"));
    // Only once this machine configured the token (the module is checked first).
    assert!(matches!(
        cmkfs::vault::open(&kid.vault, &home),
        Err(VaultError::NotConfigured { .. })
    ));
    cmkfs::vault::trust::add(&home, "hsm-a", &kid.vault, &Default::default()).unwrap();
    let again = cmkfs::vault::open(&kid.vault, &home).unwrap();
    assert_eq!(
        &again.unwrap_key(&kid, WrapAlg::RsaOaep, &w.value).unwrap()[..],
        &DEK
    );

    // Versions: rotation adds a labelled object; old wraps still unwrap.
    std::thread::sleep(Duration::from_millis(2));
    let r = v.rotate_key("kek").unwrap();
    assert!(r.version > k.version, "versions sort by age");
    assert_eq!(v.get_key("kek", None).unwrap().version, r.version);
    assert_eq!(v.list_key_versions("kek").unwrap().len(), 2);
    assert_eq!(
        &v.unwrap_key(&w.kid, WrapAlg::RsaOaep, &w.value).unwrap()[..],
        &DEK
    );

    // Revocation 1: the decrypt attribute cleared (disable).
    v.update_key(
        "kek",
        Some(&k.version),
        &KeyUpdate {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_denied(
        v.unwrap_key(&w.kid, WrapAlg::RsaOaep, &w.value),
        DenyReason::KeyDisabled,
    );
    assert_denied(
        again.unwrap_key(&kid, WrapAlg::RsaOaep, &w.value),
        DenyReason::KeyDisabled,
    );
    assert_denied(v.get_key("kek", Some(&k.version)), DenyReason::KeyDisabled);
    assert!(!v.describe_key("kek", Some(&k.version)).unwrap().enabled);
    v.update_key(
        "kek",
        Some(&k.version),
        &KeyUpdate {
            enabled: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        &v.unwrap_key(&w.kid, WrapAlg::RsaOaep, &w.value).unwrap()[..],
        &DEK
    );

    // Revocation 2: the key objects removed.
    let d = v.delete_key("kek").unwrap();
    assert_eq!(d.key.name, "kek");
    assert_denied(
        v.unwrap_key(&w.kid, WrapAlg::RsaOaep, &w.value),
        DenyReason::KeyDeleted,
    );
    assert_denied(
        again.unwrap_key(&kid, WrapAlg::RsaOaep, &w.value),
        DenyReason::KeyDeleted,
    );
    assert!(matches!(
        v.get_key("kek", None),
        Err(VaultError::NotFound(_))
    ));

    // Revocation 3: the PIN changed by the owner. The old holder is refused at its next call.
    let url_b = hsm.url("cmkfs-b");
    let holder = Pkcs11Vault::open(&url_b).unwrap();
    holder.create_key("kek", &sha1_opts()).unwrap();
    let wb = holder
        .wrap_key("kek", None, WrapAlg::RsaOaep, &DEK)
        .unwrap();
    assert_eq!(
        &holder
            .unwrap_key(&wb.kid, WrapAlg::RsaOaep, &wb.value)
            .unwrap()[..],
        &DEK
    );
    let owner = Pkcs11Vault::open(&url_b).unwrap();
    owner.change_pin("98765").unwrap();
    assert_denied(
        holder.unwrap_key(&wb.kid, WrapAlg::RsaOaep, &wb.value),
        DenyReason::PermissionDenied,
    );
    assert_denied(Pkcs11Vault::open(&url_b), DenyReason::PermissionDenied);
    let new_pin = url_b.replace(
        &format!("pin-source=file:{}", hsm.dir.path().join("pin").display()),
        "pin-value=98765",
    );
    let renewed = Pkcs11Vault::open(&new_pin).unwrap();
    assert_eq!(
        &renewed
            .unwrap_key(&wb.kid, WrapAlg::RsaOaep, &wb.value)
            .unwrap()[..],
        &DEK
    );

    // Unknown tokens and modules are unavailable (degrade), not denials.
    let e = Pkcs11Vault::open(&hsm.url("no-such-token")).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    let e = Pkcs11Vault::open("pkcs11:/nonexistent/module.so?token=x&pin-value=1").unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
}

fn cli(hsm: &Hsm, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_cmkfs"))
        .args(args)
        .env("SOFTHSM2_CONF", hsm.conf())
        .env("CMKFS_HOME", hsm.dir.path().join("home"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cmkfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn pkcs11_key_commands_across_processes() {
    let hsm = Hsm::new(&["cli"]);
    let url = hsm.url("cli");
    cli(&hsm, &["vault", "add", "cli-token", &url]);
    let out = cli(
        &hsm,
        &[
            "vault",
            "--vault",
            &url,
            "key",
            "create",
            "k",
            "--key-size",
            "2048",
            "--alg",
            "RSA-OAEP",
            "--json",
        ],
    );
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k["wrap_alg"], "RSA-OAEP");
    assert!(k["kid"].as_str().unwrap().starts_with(&url));
    cli(
        &hsm,
        &["vault", "--vault", &url, "key", "update", "k", "--disable"],
    );
    let out = cli(
        &hsm,
        &["vault", "--vault", &url, "key", "show", "k", "--json"],
    );
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        k["enabled"], false,
        "another process sees the cleared decrypt attribute"
    );
    let out = cli(&hsm, &["vault", "--vault", &url, "key", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1);
}
