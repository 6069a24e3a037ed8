use super::*;
use crate::crypto::{Dek, VolumeKeys};
use crate::vault::local::{ConfigUpdate, LocalVault};
use crate::vault::{WrapAlg, Wrapped};

#[test]
fn key_specs_parse_names_urls_and_ids() {
    let v = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        KeySpec::parse("k1", None, "local:").unwrap(),
        KeySpec {
            vault: "local:".into(),
            name: "k1".into(),
            version: None
        }
    );
    assert_eq!(
        KeySpec::parse("local:/keys/k1", Some(v), "x").unwrap(),
        KeySpec {
            vault: "local:".into(),
            name: "k1".into(),
            version: Some(v.into())
        }
    );
    let full = format!("local:/keys/k1/{v}");
    assert_eq!(
        KeySpec::parse(&full, None, "x").unwrap().version.as_deref(),
        Some(v)
    );
    assert_eq!(
        KeySpec::parse(&full, Some(v), "x")
            .unwrap()
            .version
            .as_deref(),
        Some(v)
    );
    for bad in [
        "",
        "bad name",
        "k/1",
        "local:/keys/",
        "/keys/k1",
        "local:/keys/k1/a/b",
        "local:/keys/b@d/1",
    ] {
        let e = KeySpec::parse(bad, None, "local:").unwrap_err().to_string();
        assert!(
            !e.contains('\n') && (e.contains("key") || e.contains("malformed")),
            "{bad:?}: {e}"
        );
    }
    let e = KeySpec::parse(&full, Some("other"), "local:")
        .unwrap_err()
        .to_string();
    assert!(e.contains("contradicts"), "{e}");
    assert!(KeySpec::parse("k1", Some("a/b"), "local:").is_err());
    assert!(KeySpec::parse(PLATFORM_KEY, None, "local:")
        .unwrap()
        .is_platform_key());
}

#[test]
fn names_and_encryption_types() {
    assert!(valid_des_name("des-1_A"));
    assert!(!valid_des_name(""));
    assert!(!valid_des_name("a b"));
    assert!(!valid_des_name("../x"));
    assert!(!valid_des_name(&"a".repeat(81)));
    assert_eq!(
        "encryptionatrestwithplatformandcustomerkeys"
            .parse::<EncryptionType>()
            .unwrap(),
        EncryptionType::EncryptionAtRestWithPlatformAndCustomerKeys
    );
    assert!("Platform".parse::<EncryptionType>().is_err());
    let json = serde_json::to_string(&EncryptionType::EncryptionAtRestWithCustomerKey).unwrap();
    assert_eq!(json, "\"EncryptionAtRestWithCustomerKey\"");
}

fn wrapped(kid: &str) -> Wrapped {
    Wrapped {
        kid: kid.parse().unwrap(),
        alg: WrapAlg::RsaOaep256,
        value: vec![1, 2, 3],
    }
}

#[test]
fn platform_envelope_is_covered_by_the_mac_and_single_headers_are_unchanged() {
    let (outer, inner) = (Dek::generate().unwrap(), Dek::generate().unwrap());
    let w = wrapped("local:/keys/k/00000000000000000000000000000001");
    let pw = wrapped("local:/keys/cmkfs-platform/00000000000000000000000000000002");
    let id = "ab".repeat(16);
    let single = VolumeHeader::new(
        &outer,
        id.clone(),
        4096,
        &w,
        1,
        crate::volume::layout::Layout::V3,
    );
    let env = crate::volume::header::PlatformEnvelope::new(&inner, &pw);
    let double = VolumeHeader::new_double(
        &outer,
        id,
        4096,
        &w,
        1,
        env,
        crate::volume::layout::Layout::V3,
    );
    double.verify(&outer).unwrap();
    double.platform.as_ref().unwrap().verify(&inner).unwrap();
    assert!(double.platform.as_ref().unwrap().verify(&outer).is_err());
    // Stripping the platform layer, or swapping its DEK, breaks the MAC.
    let stripped = VolumeHeader {
        platform: None,
        ..double.clone()
    };
    assert!(stripped.verify(&outer).is_err());
    let mut swapped = double.clone();
    swapped.platform.as_mut().unwrap().dek_fingerprint = Dek::generate().unwrap().fingerprint();
    assert!(swapped.verify(&outer).is_err());
    // A single-encryption header has the MAC it had before double encryption existed.
    assert_eq!(
        VolumeHeader {
            platform: None,
            ..single.clone()
        }
        .header_mac,
        single.header_mac
    );
    assert_ne!(single.header_mac, double.header_mac);
    assert!(!String::from_utf8(single.to_bytes().unwrap())
        .unwrap()
        .contains("platform"));
    // A rewrap keeps the platform envelope.
    let moved = double.rewrapped(
        &wrapped("local:/keys/k2/00000000000000000000000000000003"),
        &outer,
    );
    assert_eq!(moved.platform, double.platform);
    moved.verify(&outer).unwrap();
}

#[test]
fn double_keys_need_both_deks() {
    let (outer, inner) = (Dek::generate().unwrap(), Dek::generate().unwrap());
    let single = VolumeKeys::from_dek(&outer, 4096).unwrap();
    let double = VolumeKeys::from_deks(&outer, Some(&inner), 4096).unwrap();
    assert!(single.inner.is_none() && double.inner.is_some());
    let id = [7u8; 16];
    let n1 = crate::volume::names::encrypt(&single.names, &id, std::ffi::OsStr::new("x")).unwrap();
    let n2 = crate::volume::names::encrypt(&double.names, &id, std::ffi::OsStr::new("x")).unwrap();
    assert_ne!(
        n1.entry(),
        n2.entry(),
        "the name key depends on the inner DEK too"
    );
}

/// A home with a purge-protected local vault and a 2048-bit key `k`.
fn home_with_key() -> (tempfile::TempDir, Home, LocalVault) {
    crate::vault::local::unlock::use_test_passphrase();
    let t = tempfile::tempdir().unwrap();
    let home = Home::at(t.path());
    let v = LocalVault::open(&home.vault_dir()).unwrap();
    v.configure(&ConfigUpdate {
        purge_protection: Some(true),
        ..Default::default()
    })
    .unwrap();
    v.create_key(
        "k",
        &CreateKeyOptions {
            key_size: 2048,
            ..Default::default()
        },
    )
    .unwrap();
    (t, home, v)
}

fn request(name: &str) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        key: "k".into(),
        version: None,
        vault: "local:".into(),
        identity: None,
        encryption_type: EncryptionType::default(),
        auto_rotate: false,
    }
}

#[test]
fn records_are_private_and_round_trip() {
    use std::os::unix::fs::PermissionsExt;
    let (_t, home, _v) = home_with_key();
    let d = create(&home, &request("d1")).unwrap();
    let store = DesStore::new(&home);
    assert_eq!(store.load("d1").unwrap(), d);
    assert_eq!(
        fs::metadata(store.path("d1")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(matches!(
        create(&home, &request("d1")),
        Err(DesError::Exists(_))
    ));
    assert_eq!(list(&home).unwrap().len(), 1);
    // The lock excludes a second holder; try_lock reports busy instead of waiting.
    let held = store.lock().unwrap();
    assert!(store.try_lock().unwrap().is_none());
    drop(held);
    assert!(store.try_lock().unwrap().is_some());
    delete(&home, "d1").unwrap();
    assert!(matches!(show(&home, "d1"), Err(DesError::NotFound(_))));
}

#[test]
fn platform_key_is_refused_as_a_customer_key() {
    let (_t, home, _v) = home_with_key();
    ensure_platform_key(&home).unwrap();
    let e = create(
        &home,
        &CreateRequest {
            key: PLATFORM_KEY.into(),
            ..request("d")
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, DesError::Refused(_)) && e.to_string().contains("irreversible"),
        "{e}"
    );
    create(&home, &request("d")).unwrap();
    let req = UpdateRequest {
        key: Some(PLATFORM_KEY.into()),
        ..Default::default()
    };
    let e = update(&home, "d", &req, &mut Hooks::default()).unwrap_err();
    assert!(e.to_string().contains("irreversible"), "{e}");
    let req = UpdateRequest {
        encryption_type: Some(EncryptionType::EncryptionAtRestWithPlatformAndCustomerKeys),
        ..Default::default()
    };
    let e = update(&home, "d", &req, &mut Hooks::default()).unwrap_err();
    assert!(e.to_string().contains("cannot change"), "{e}");
}
