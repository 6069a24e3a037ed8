//! The keys API operations of issue 14 on the embedded vault, in process (the HTTP shapes are
//! proven by tests/sdk with the official SDK): key backup and restore between vaults that do
//! and do not share a master key, rotation policies applied on schedule (the clock stepped
//! forward, Key Vault's limits in force), near-expiry notices, concurrent appliers, and the
//! rules of encrypt/decrypt/sign/verify (permissions, key_ops, nbf/exp).

use std::path::Path;
use std::process::Command;

use cmkfs::vault::local::policy::{LifetimeAction, PolicyAction, RotationPolicy};
use cmkfs::vault::local::{LocalVault, PolicyScope};
use cmkfs::vault::{
    CreateKeyOptions, DenyReason, KeyId, KeyUpdate, Permission, SignAlg, Vault, VaultError, WrapAlg,
};

use crate::vault_support;

const DAY: i64 = 86_400;

fn opts() -> CreateKeyOptions {
    CreateKeyOptions {
        key_size: 2048,
        wrap_alg: WrapAlg::RsaOaep256,
    }
}

fn store(dir: &Path, name: &str) -> LocalVault {
    vault_support::use_test_passphrase();
    LocalVault::open(&dir.join(name)).unwrap()
}

#[track_caller]
fn denied<T: std::fmt::Debug>(r: Result<T, VaultError>, want: DenyReason) {
    match r {
        Err(VaultError::Denied { reason, .. }) if reason == want => {}
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

#[test]
fn a_backup_restores_only_into_a_vault_that_shares_the_master_key() {
    let tmp = tempfile::tempdir().unwrap();
    let a = store(tmp.path(), "a");
    let k1 = a.create_key("k", &opts()).unwrap();
    let k2 = a.rotate_key("k").unwrap();
    let w = a
        .wrap_key("k", Some(&k1.version), WrapAlg::RsaOaep256, &[7; 64])
        .unwrap();
    let blob = a.backup_key("k").unwrap();
    assert!(!String::from_utf8_lossy(&blob).contains("PRIVATE"));

    // Another vault (its own master key) refuses it, with the reason.
    let b = store(tmp.path(), "b");
    match b.restore_key(&blob) {
        Err(VaultError::Invalid(m)) => assert!(m.contains("made by another vault"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A copy of vault a's store (same seal.json, same passphrase) shares its master key.
    let status = Command::new("cp")
        .arg("-a")
        .arg(tmp.path().join("a"))
        .arg(tmp.path().join("c"))
        .status()
        .unwrap();
    assert!(status.success());
    let c = LocalVault::open(&tmp.path().join("c")).unwrap();
    match c.restore_key(&blob) {
        Err(VaultError::Conflict(_)) => {}
        other => panic!("a taken name is a conflict: {other:?}"),
    }
    c.delete_key("k").unwrap();
    c.purge_deleted_key("k").unwrap();
    let r = c.restore_key(&blob).unwrap();
    assert_eq!(r.version, k2.version, "version ids survive");
    let back = c
        .unwrap_key(
            &KeyId {
                vault: "local:".into(),
                name: "k".into(),
                version: k1.version.clone(),
            },
            WrapAlg::RsaOaep256,
            &w.value,
        )
        .unwrap();
    assert_eq!(&back[..], &[7; 64]);

    // A blob altered anywhere is refused as unusable, never half-restored.
    c.delete_key("k").unwrap();
    c.purge_deleted_key("k").unwrap();
    let mut bad = blob.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    assert!(matches!(c.restore_key(&bad), Err(VaultError::Invalid(_))));
    assert!(matches!(c.get_key("k", None), Err(VaultError::NotFound(_))));

    // Backup and restore are permissions of their own.
    let (_, cred) = a.create_identity("app").unwrap();
    a.set_policy(
        "app",
        &PolicyScope::AllKeys,
        &[Permission::Get, Permission::WrapKey],
    )
    .unwrap();
    let app = LocalVault::open_as(&tmp.path().join("a"), "app", &cred.secret).unwrap();
    denied(app.backup_key("k"), DenyReason::PermissionDenied);
}

fn rotate_after(after: &str, expiry: Option<&str>) -> RotationPolicy {
    RotationPolicy {
        actions: vec![LifetimeAction {
            action: PolicyAction::Rotate,
            time_after_create: Some(after.into()),
            time_before_expiry: None,
        }],
        expiry_time: expiry.map(str::to_string),
        ..Default::default()
    }
}

#[test]
fn rotation_policies_rotate_on_schedule_with_the_service_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let v = store(tmp.path(), "v");
    let k = v.create_key("k", &opts()).unwrap();
    // Key Vault's limits (no test setting in this process): seconds are refused.
    assert!(matches!(
        v.set_rotation_policy("k", &rotate_after("PT3S", None)),
        Err(VaultError::Invalid(_))
    ));
    assert!(matches!(
        v.set_rotation_policy("k", &rotate_after("P30D", Some("P20D"))),
        Err(VaultError::Invalid(_))
    ));
    v.set_rotation_policy("k", &rotate_after("P30D", Some("P90D")))
        .unwrap();
    assert!(
        v.apply_rotation_policies().unwrap().is_empty(),
        "not due yet"
    );
    let later = LocalVault::open(&tmp.path().join("v"))
        .unwrap()
        .with_clock_offset(29 * DAY);
    assert!(
        later.apply_rotation_policies().unwrap().is_empty(),
        "29 days: not due"
    );
    let due = LocalVault::open(&tmp.path().join("v"))
        .unwrap()
        .with_clock_offset(31 * DAY);
    let made = due.apply_rotation_policies().unwrap();
    assert_eq!(made.len(), 1);
    assert_ne!(made[0].version, k.version);
    assert_eq!(made[0].exp, Some(made[0].created + 90 * 86_400));
    // Applying again at the same time does nothing: the new version is the one that counts.
    assert!(due.apply_rotation_policies().unwrap().is_empty());
    assert_eq!(v.list_key_versions("k").unwrap().len(), 2);
    // A manual rotation gets the policy's expiry too.
    let manual = v.rotate_key("k").unwrap();
    assert_eq!(manual.exp, Some(manual.created + 90 * 86_400));
}

#[test]
fn concurrent_appliers_make_one_version_and_notices_come_once() {
    let tmp = tempfile::tempdir().unwrap();
    let v = store(tmp.path(), "v");
    v.create_key("k", &opts()).unwrap();
    v.set_rotation_policy("k", &rotate_after("P7D", None))
        .unwrap();
    let dir = tmp.path().join("v");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                LocalVault::open(&dir)
                    .unwrap()
                    .with_clock_offset(8 * DAY)
                    .apply_rotation_policies()
                    .unwrap()
                    .len()
            })
        })
        .collect();
    let made: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(made, 1, "one due rotation, one new version");
    assert_eq!(v.list_key_versions("k").unwrap().len(), 2);

    // Notify 7 days before the latest version's expiry: once per version.
    let n = v.create_key("n", &opts()).unwrap();
    v.update_key(
        "n",
        None,
        &KeyUpdate {
            exp: Some(Some(n.created + 30 * 86_400)),
            ..Default::default()
        },
    )
    .unwrap();
    v.set_rotation_policy(
        "n",
        &RotationPolicy {
            actions: vec![LifetimeAction {
                action: PolicyAction::Notify,
                time_after_create: None,
                time_before_expiry: Some("P7D".into()),
            }],
            ..Default::default()
        },
    )
    .unwrap();
    let notices = || {
        std::fs::read_to_string(dir.join("audit.log"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"KeyNearExpiry\""))
            .count()
    };
    for offset in [20, 24, 25] {
        LocalVault::open(&dir)
            .unwrap()
            .with_clock_offset(offset * DAY)
            .apply_rotation_policies()
            .unwrap();
    }
    assert_eq!(notices(), 1, "one notice, from day 23 on");
    assert_eq!(
        v.list_key_versions("n").unwrap().len(),
        1,
        "notify never rotates"
    );
}

#[test]
fn crypto_operations_follow_permissions_key_ops_and_validity() {
    let tmp = tempfile::tempdir().unwrap();
    let v = store(tmp.path(), "v");
    let k = v.create_key("k", &opts()).unwrap();
    // The CLI's default key_ops are a KEK's: wrap and unwrap only.
    denied(
        v.encrypt("k", None, WrapAlg::RsaOaep256, b"x"),
        DenyReason::OperationNotAllowed,
    );
    denied(
        v.sign("k", None, SignAlg::Ps256, &[0; 32]),
        DenyReason::OperationNotAllowed,
    );
    let all: Vec<String> = cmkfs::vault::all_key_ops();
    v.update_key(
        "k",
        None,
        &KeyUpdate {
            key_ops: Some(all),
            ..Default::default()
        },
    )
    .unwrap();
    let (_, ct) = v.encrypt("k", None, WrapAlg::RsaOaep, b"secret").unwrap();
    assert_eq!(
        &v.decrypt("k", None, WrapAlg::RsaOaep, &ct).unwrap().1[..],
        b"secret"
    );
    assert!(matches!(
        v.decrypt("k", None, WrapAlg::RsaOaep256, &ct),
        Err(VaultError::UnwrapFailed { .. })
    ));
    let d = [9u8; 48];
    let (_, sig) = v.sign("k", None, SignAlg::Rs384, &d).unwrap();
    assert!(v.verify("k", None, SignAlg::Rs384, &d, &sig).unwrap().1);
    assert!(!v.verify("k", None, SignAlg::Ps384, &d, &sig).unwrap().1);
    assert!(matches!(
        v.sign("k", None, SignAlg::Rs256, &d),
        Err(VaultError::Invalid(_))
    ));
    // Expired: encrypt and sign refused; decrypt and verify still work (as unwrap does).
    v.update_key(
        "k",
        None,
        &KeyUpdate {
            exp: Some(Some(k.created + 10)),
            ..Default::default()
        },
    )
    .unwrap();
    let late = LocalVault::open(&tmp.path().join("v"))
        .unwrap()
        .with_clock_offset(3600);
    denied(
        late.encrypt("k", None, WrapAlg::RsaOaep, b"x"),
        DenyReason::KeyExpired,
    );
    denied(
        late.sign("k", None, SignAlg::Rs384, &d),
        DenyReason::KeyExpired,
    );
    assert_eq!(
        &late.decrypt("k", None, WrapAlg::RsaOaep, &ct).unwrap().1[..],
        b"secret"
    );
    assert!(late.verify("k", None, SignAlg::Rs384, &d, &sig).unwrap().1);
    // Permissions: an identity with wrap/unwrap only.
    let (_, cred) = v.create_identity("kek-user").unwrap();
    v.set_policy(
        "kek-user",
        &PolicyScope::AllKeys,
        &[Permission::WrapKey, Permission::UnwrapKey],
    )
    .unwrap();
    let u = LocalVault::open_as(&tmp.path().join("v"), "kek-user", &cred.secret).unwrap();
    denied(
        u.decrypt("k", None, WrapAlg::RsaOaep, &ct),
        DenyReason::PermissionDenied,
    );
    denied(
        u.verify("k", None, SignAlg::Rs384, &d, &sig),
        DenyReason::PermissionDenied,
    );
    assert_eq!(u.random_bytes(16).unwrap().len(), 16);
    assert!(matches!(u.random_bytes(129), Err(VaultError::Invalid(_))));
    // RSA1_5 is refused by name, with the reason.
    match "RSA1_5".parse::<WrapAlg>() {
        Err(VaultError::Invalid(m)) => assert!(m.contains("Bleichenbacher"), "{m}"),
        other => panic!("{other:?}"),
    }
}
