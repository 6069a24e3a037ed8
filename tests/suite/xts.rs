//! Correctness of the XTS-AES-256 sector cipher against independent references: the IEEE 1619
//! vectors, the `xts-mode` crate, and the `openssl` command. Every test runs the default
//! implementation and each one this CPU has (VAES, AES-NI, portable); `xts_backends.rs`
//! compares them with each other.

use aes::cipher::KeyInit;
use aes::Aes256;
use cmkfs::crypto::xts::Implementation;
use cmkfs::crypto::{CryptoError, XtsCipher};
use rand::{Rng, RngCore, SeedableRng};
use xts_mode::{get_tweak_default, Xts128};

type Ctor = fn(&[u8], usize) -> Result<XtsCipher, CryptoError>;

fn vaes(key: &[u8], unit: usize) -> Result<XtsCipher, CryptoError> {
    XtsCipher::with_implementation(key, unit, Implementation::Vaes)
}

fn aes_ni(key: &[u8], unit: usize) -> Result<XtsCipher, CryptoError> {
    XtsCipher::with_implementation(key, unit, Implementation::AesNi)
}

/// The default implementation and every one this CPU has, by name (a missing one is noted).
fn ctors() -> Vec<(&'static str, Ctor)> {
    let all: [(&str, Ctor, Implementation); 3] = [
        ("vaes", vaes, Implementation::Vaes),
        ("aes-ni", aes_ni, Implementation::AesNi),
        (
            "portable",
            XtsCipher::new_portable,
            Implementation::Portable,
        ),
    ];
    let mut v: Vec<(&'static str, Ctor)> = vec![("default", XtsCipher::new)];
    for (name, ctor, imp) in all {
        if imp.available() {
            v.push((name, ctor));
        } else {
            eprintln!("NOTE: this CPU cannot run the {name} implementation; not tested");
        }
    }
    v
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn rng() -> rand::rngs::StdRng {
    // Fixed seed: a failure must be reproducible; the seed is printed by the assertions'
    // context (key, tweak, length).
    rand::rngs::StdRng::seed_from_u64(0x1619_2018)
}

/// IEEE 1619-2007 Annex B, vectors 10-14: XTS-AES-256, one 512-byte data unit, plaintext
/// 00..ff twice; data unit sequence numbers 0xff, 0xffff, ... (the standard writes the tweak
/// little-endian).
const IEEE_KEY: &str = "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592";
const IEEE_VECTORS: [(u128, &str); 5] = [
    (
        0xff,
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    ),
    (
        0xffff,
        "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11e1d0225438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b2013fd0eeb8c2b8e3d8d240ccae2d4c98320a7442e1c8d75a42d6e6cfa4c2eca1798d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922aaa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c69aac049921871ebb65301a4619ca80ecb485a31d744223ce8ddc2394828d6a80470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888abf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab018bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474afb75bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a7e20dbdf308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca686e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc09054fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803",
    ),
    (
        0xffffff,
        "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200a8b490e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba0499298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a87815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e19110e84d1b1f199a2692119edc96132658f09da7c623efcec712537a3d94c0bf5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6e7091ea6e232df0f9ad0d6cf502327876d82207abf2115cdacf6d5a48f6c1879a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe097b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71799da3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7af08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2480241b44d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826",
    ),
    (
        0xffff_ffff,
        "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5520f7c4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e919f5e942010a416e2bf48cb46993d3cb6a51c19bacf864785a00bc2ecff15d350875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f569768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed90fdea39fa469494d3866c31e05f295ff21fea8d4e6e13d67e47ce722e9698a1c1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e75d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00f1df73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc0077ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460d183f04404a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a41556cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88cf6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220",
    ),
    (
        0xff_ffff_ffff,
        "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed2350eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b808da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d876c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41bf6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f685b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abce19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd927212054681d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9",
    ),
];

/// XTS-AES-256 ciphertext-stealing vectors (Brian Gladman's `xts` test values, also in
/// aws-lc's test suite): key fffefd..e0 || bfbebd..a0, tweak 0x123456789a, plaintext 00 01 02 ..
const CTS_KEY: &str = "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0efeeedecebeae9e8e7e6e5e4e3e2e1e0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0afaeadacabaaa9a8a7a6a5a4a3a2a1a0";
const CTS_VECTORS: [&str; 5] = [
    "c30ca8f2ed57307edc87e544867ac888",
    "7f117752cc598a8b0d81d88af9f9bec8c3",
    "75e8188bcce59ada939f57de2cb9a489c30ca8f2ed57",
    "581ea1fee5516ad432ddebe75fd27c6fc30ca8f2ed57307edc87e544867ac8",
    "c30ca8f2ed57307edc87e544867ac888348c208928d7406269954551cb627b5bbea47768aa25376e924cce6a102ca2e4e1c241",
];

#[test]
fn ieee1619_xts_aes_256_vectors() {
    let key = unhex(IEEE_KEY);
    let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
    for (name, ctor) in ctors() {
        let c = ctor(&key, 512).unwrap();
        for (tweak, ct) in IEEE_VECTORS {
            let ct = unhex(ct);
            let mut buf = pt.clone();
            c.encrypt_unit(tweak, &mut buf).unwrap();
            assert!(buf == ct, "{name}: encrypt, tweak {tweak:#x}");
            c.decrypt_unit(tweak, &mut buf).unwrap();
            assert!(buf == pt, "{name}: decrypt, tweak {tweak:#x}");
        }
    }
}

#[test]
fn ciphertext_stealing_vectors() {
    let key = unhex(CTS_KEY);
    for (name, ctor) in ctors() {
        let c = ctor(&key, 512).unwrap();
        for ct in CTS_VECTORS {
            let ct = unhex(ct);
            let pt: Vec<u8> = (0..ct.len()).map(|i| i as u8).collect();
            let mut buf = pt.clone();
            c.encrypt_unit(0x12_3456_789a, &mut buf).unwrap();
            assert!(buf == ct, "{name}: encrypt, {} bytes", ct.len());
            c.decrypt_unit(0x12_3456_789a, &mut buf).unwrap();
            assert!(buf == pt, "{name}: decrypt, {} bytes", ct.len());
        }
    }
}

fn random_key(r: &mut impl RngCore) -> [u8; 64] {
    let mut k = [0u8; 64];
    r.fill_bytes(&mut k);
    k
}

fn oracle(key: &[u8]) -> Xts128<Aes256> {
    Xts128::new(
        Aes256::new_from_slice(&key[..32]).unwrap(),
        Aes256::new_from_slice(&key[32..]).unwrap(),
    )
}

#[test]
fn xts_mode_tweak_encoding_is_le() {
    // Our contract says the tweak is u128::to_le_bytes; make sure the oracle agrees.
    assert_eq!(get_tweak_default(0x0102), 0x0102u128.to_le_bytes());
}

#[test]
fn equals_xts_mode_random() {
    let mut r = rng();
    for (name, ctor) in ctors() {
        for unit_size in [512, 4096, 65536] {
            for _ in 0..40 {
                let key = random_key(&mut r);
                let tweak: u128 = r.gen();
                // Full units, whole-block tails and stealing lengths (>= 16: xts-mode's
                // minimum).
                let len = match r.gen_range(0..3) {
                    0 => unit_size,
                    1 => 16 * r.gen_range(1..=unit_size / 16),
                    _ => r.gen_range(16..=unit_size),
                };
                let mut pt = vec![0u8; len];
                r.fill_bytes(&mut pt);
                let c = ctor(&key, unit_size).unwrap();
                let mut ours = pt.clone();
                c.encrypt_unit(tweak, &mut ours).unwrap();
                let mut theirs = pt.clone();
                oracle(&key).encrypt_sector(&mut theirs, get_tweak_default(tweak));
                assert!(
                    ours == theirs,
                    "{name}: unit {unit_size} len {len} tweak {tweak:#x}"
                );
                c.decrypt_unit(tweak, &mut ours).unwrap();
                assert!(ours == pt, "{name}: decrypt unit {unit_size} len {len}");
            }
        }
    }
}

#[test]
fn equals_xts_mode_decrypt_area() {
    // Many 4 KiB units through the oracle's own area walk (sector i = tweak i).
    let mut r = rng();
    let key = random_key(&mut r);
    let mut pt = vec![0u8; 4096 * 9];
    r.fill_bytes(&mut pt);
    for (name, ctor) in ctors() {
        let c = ctor(&key, 4096).unwrap();
        let mut ours = pt.clone();
        for (i, u) in ours.chunks_mut(4096).enumerate() {
            c.encrypt_unit(100 + i as u128, u).unwrap();
        }
        let mut back = ours.clone();
        oracle(&key).decrypt_area(&mut back, 4096, 100, get_tweak_default);
        assert!(back == pt, "{name}");
    }
}

#[test]
fn every_length_round_trips_and_agrees() {
    let mut r = rng();
    let key = random_key(&mut r);
    let fast = XtsCipher::new(&key, 512).unwrap();
    let port = XtsCipher::new_portable(&key, 512).unwrap();
    for len in 1..=512 {
        let mut pt = vec![0u8; len];
        r.fill_bytes(&mut pt);
        let tweak: u128 = r.gen();
        let mut a = pt.clone();
        fast.encrypt_unit(tweak, &mut a).unwrap();
        let mut b = pt.clone();
        port.encrypt_unit(tweak, &mut b).unwrap();
        assert!(a == b, "len {len}");
        if len >= 16 {
            let mut o = pt.clone();
            oracle(&key).encrypt_sector(&mut o, get_tweak_default(tweak));
            assert!(a == o, "len {len}");
        }
        fast.decrypt_unit(tweak, &mut a).unwrap();
        port.decrypt_unit(tweak, &mut b).unwrap();
        assert!(a == pt && b == pt, "len {len}");
    }
}

/// The documented short-tail rule, recomputed from raw AES: keystream
/// `AES-K1(AES-K2(tweak) ⊗ α^(unit_size/16))`.
#[test]
fn short_tail_rule() {
    use aes::cipher::{generic_array::GenericArray, BlockEncrypt};
    let mut r = rng();
    for unit_size in [512, 4096] {
        let key = random_key(&mut r);
        let tweak: u128 = r.gen();
        let k1 = Aes256::new_from_slice(&key[..32]).unwrap();
        let k2 = Aes256::new_from_slice(&key[32..]).unwrap();
        let mut t = GenericArray::from(tweak.to_le_bytes());
        k2.encrypt_block(&mut t);
        let mut t = u128::from_le_bytes(t.into());
        for _ in 0..unit_size / 16 {
            t = (t << 1) ^ ((t >> 127) * 0x87);
        }
        let mut ks = GenericArray::from(t.to_le_bytes());
        k1.encrypt_block(&mut ks);
        for (name, ctor) in ctors() {
            let c = ctor(&key, unit_size).unwrap();
            for len in 1..16 {
                let mut pt = vec![0u8; len];
                r.fill_bytes(&mut pt);
                let mut buf = pt.clone();
                c.encrypt_unit(tweak, &mut buf).unwrap();
                let want: Vec<u8> = pt.iter().zip(ks.iter()).map(|(p, k)| p ^ k).collect();
                assert!(buf == want, "{name}: unit {unit_size} len {len}");
                c.decrypt_unit(tweak, &mut buf).unwrap();
                assert!(buf == pt, "{name}: len {len}");
            }
        }
    }
}

#[test]
fn different_tweak_different_ciphertext() {
    let mut r = rng();
    let key = random_key(&mut r);
    for (name, ctor) in ctors() {
        let c = ctor(&key, 4096).unwrap();
        for len in [4096, 4000, 32, 17, 16, 5, 1] {
            let pt = vec![0x5au8; len];
            let mut a = pt.clone();
            let mut b = pt.clone();
            let mut d = pt.clone();
            c.encrypt_unit(7, &mut a).unwrap();
            c.encrypt_unit(8, &mut b).unwrap();
            c.encrypt_unit(7 + (1 << 64), &mut d).unwrap();
            assert!(a != b && a != d && b != d, "{name}: len {len}");
            // Identical plaintext blocks inside one unit differ too (position in the unit).
            if len >= 32 {
                assert!(a[..16] != a[16..32], "{name}: len {len}");
            }
        }
    }
}

#[test]
fn different_key_different_ciphertext() {
    let mut r = rng();
    let (k1, k2) = (random_key(&mut r), random_key(&mut r));
    let mut a = vec![0u8; 4096];
    let mut b = a.clone();
    XtsCipher::new(&k1, 4096)
        .unwrap()
        .encrypt_unit(0, &mut a)
        .unwrap();
    XtsCipher::new(&k2, 4096)
        .unwrap()
        .encrypt_unit(0, &mut b)
        .unwrap();
    assert!(a != b);
}

#[test]
fn bad_input_is_a_typed_error() {
    let key = random_key(&mut rng());
    for (_, ctor) in ctors() {
        for len in [0, 32, 63, 65, 128] {
            assert_eq!(
                ctor(&vec![1u8; len], 4096).unwrap_err(),
                CryptoError::BadKeyLength { got: len }
            );
        }
        let mut same = [9u8; 64];
        same[..32].copy_from_slice(&key[..32]);
        same[32..].copy_from_slice(&key[..32]);
        assert_eq!(ctor(&same, 4096).unwrap_err(), CryptoError::EqualKeyHalves);
        for u in [0, 1, 16, 256, 511, 513, 3000, 4097, 131072, usize::MAX] {
            assert_eq!(
                ctor(&key, u).unwrap_err(),
                CryptoError::BadUnitSize { got: u }
            );
        }
        for u in [512, 1024, 4096, 65536] {
            let c = ctor(&key, u).unwrap();
            assert_eq!(c.unit_size(), u);
            let mut empty: [u8; 0] = [];
            let err = CryptoError::BadLength { len: 0, unit: u };
            assert_eq!(c.encrypt_unit(0, &mut empty).unwrap_err(), err);
            assert_eq!(c.decrypt_unit(0, &mut empty).unwrap_err(), err);
            let mut long = vec![0u8; u + 1];
            let err = CryptoError::BadLength {
                len: u + 1,
                unit: u,
            };
            assert_eq!(c.encrypt_unit(0, &mut long).unwrap_err(), err);
            assert_eq!(c.decrypt_unit(0, &mut long).unwrap_err(), err);
            // A refused call leaves the buffer untouched.
            assert!(long.iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn extreme_tweaks() {
    let key = random_key(&mut rng());
    for (name, ctor) in ctors() {
        let c = ctor(&key, 4096).unwrap();
        for tweak in [0, 1, u64::MAX as u128, u128::MAX] {
            let pt = vec![0xa5u8; 4096];
            let mut a = pt.clone();
            c.encrypt_unit(tweak, &mut a).unwrap();
            let mut o = pt.clone();
            oracle(&key).encrypt_sector(&mut o, get_tweak_default(tweak));
            assert!(a == o, "{name}: tweak {tweak:#x}");
        }
    }
}

// ---- the openssl command ------------------------------------------------------------------

fn openssl(args: &[&str], input: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(out.stdout)
}

/// IEEE 1619 §5.2 multiplication by α, written on bytes here on purpose (the cipher uses a
/// u128 form), so this test does not share code with what it checks.
fn double_bytes(t: &mut [u8; 16]) {
    let mut carry = 0u8;
    for b in t.iter_mut() {
        let next = *b >> 7;
        *b = (*b << 1) | carry;
        carry = next;
    }
    if carry == 1 {
        t[0] ^= 0x87;
    }
}

/// XTS of whole blocks built from `openssl enc -aes-256-ecb`: T = AES-K2(iv) by openssl, the
/// α-doubling by [`double_bytes`], and all the K1 blocks of the sector in one openssl call.
fn openssl_xts_via_ecb(key: &[u8], iv: [u8; 16], pt: &[u8]) -> Result<Vec<u8>, String> {
    let ecb = |k: &[u8], data: &[u8]| {
        openssl(
            &["enc", "-e", "-aes-256-ecb", "-nopad", "-K", &hex::encode(k)],
            data,
        )
    };
    let mut t: [u8; 16] = ecb(&key[32..], &iv)?.try_into().unwrap();
    let mut masks = Vec::with_capacity(pt.len());
    for _ in 0..pt.len() / 16 {
        masks.extend_from_slice(&t);
        double_bytes(&mut t);
    }
    let xored: Vec<u8> = pt.iter().zip(&masks).map(|(p, m)| p ^ m).collect();
    let ct = ecb(&key[..32], &xored)?;
    Ok(ct.iter().zip(&masks).map(|(c, m)| c ^ m).collect())
}

#[test]
fn equals_openssl_command() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("NOTE: `openssl` not found; skipping the openssl comparison");
        return;
    }
    let mut r = rng();
    let key = random_key(&mut r);
    let first: u128 = r.gen::<u64>() as u128;
    // Eight full sectors plus a short (stealing) tail.
    let mut pt = vec![0u8; 4096 * 8 + 1000];
    r.fill_bytes(&mut pt);
    let khex = hex::encode(key);
    let mut expect = Vec::with_capacity(pt.len());
    let mut via_ecb = false;
    for (i, sector) in pt.chunks(4096).enumerate() {
        let iv = (first + i as u128).to_le_bytes();
        let args = [
            "enc",
            "-e",
            "-aes-256-xts",
            "-nopad",
            "-K",
            &khex,
            "-iv",
            &hex::encode(iv),
        ];
        let direct = if via_ecb {
            None
        } else {
            match openssl(&args, sector) {
                Ok(ct) => Some(ct),
                // OpenSSL 3.0's `enc` refuses XTS: compose it from its AES-ECB instead.
                Err(e) if e.contains("XTS ciphers not supported") => {
                    via_ecb = true;
                    None
                }
                Err(e) => panic!("openssl: {e}"),
            }
        };
        match direct {
            Some(ct) => expect.extend(ct),
            // Whole blocks only, and not the last full block of a stealing tail (stealing
            // rewrites it): that tail is covered by the other oracles.
            None => {
                let whole = match sector.len() % 16 {
                    0 => sector.len(),
                    _ => sector.len() / 16 * 16 - 16,
                };
                expect.extend(openssl_xts_via_ecb(&key, iv, &sector[..whole]).unwrap());
            }
        }
    }
    if via_ecb {
        eprintln!("NOTE: `openssl enc` refuses XTS here; compared against XTS composed from `openssl enc -aes-256-ecb`");
    }
    for (name, ctor) in ctors() {
        let c = ctor(&key, 4096).unwrap();
        let mut ours = pt.clone();
        for (i, u) in ours.chunks_mut(4096).enumerate() {
            c.encrypt_unit(first + i as u128, u).unwrap();
        }
        assert_eq!(ours.len(), pt.len());
        assert!(ours[..expect.len()] == expect[..], "{name}");
    }
}

// ---- aws-lc (the OpenSSL-family library linked through aws-lc-rs) ---------------------------

/// One XTS unit through aws-lc's EVP interface (`EVP_aes_256_xts`, IV = the tweak's 16
/// little-endian bytes), in place. A fresh context per call: this is the oracle, not a fast
/// path.
fn aws_lc_xts(key: &[u8; 64], tweak: u128, data: &mut [u8], encrypt: bool) {
    use aws_lc_sys as sys;
    let iv = tweak.to_le_bytes();
    let mut out = vec![0u8; data.len() + 16];
    let mut n: std::os::raw::c_int = 0;
    // SAFETY: standard EVP usage: the context is created, used with buffers that outlive the
    // calls (the output one block longer than the input, as EVP requires) and freed.
    unsafe {
        let ctx = sys::EVP_CIPHER_CTX_new();
        assert!(!ctx.is_null());
        let init = if encrypt {
            sys::EVP_EncryptInit_ex(
                ctx,
                sys::EVP_aes_256_xts(),
                std::ptr::null_mut(),
                key.as_ptr(),
                iv.as_ptr(),
            )
        } else {
            sys::EVP_DecryptInit_ex(
                ctx,
                sys::EVP_aes_256_xts(),
                std::ptr::null_mut(),
                key.as_ptr(),
                iv.as_ptr(),
            )
        };
        assert_eq!(init, 1);
        let len = data.len() as std::os::raw::c_int;
        let ok = if encrypt {
            sys::EVP_EncryptUpdate(ctx, out.as_mut_ptr(), &mut n, data.as_ptr(), len)
        } else {
            sys::EVP_DecryptUpdate(ctx, out.as_mut_ptr(), &mut n, data.as_ptr(), len)
        };
        assert_eq!(ok, 1);
        sys::EVP_CIPHER_CTX_free(ctx);
    }
    assert_eq!(n as usize, data.len());
    data.copy_from_slice(&out[..data.len()]);
}

#[test]
fn equals_aws_lc_random() {
    let mut r = rng();
    for (name, ctor) in ctors() {
        for _ in 0..200 {
            let key = random_key(&mut r);
            let tweak: u128 = r.gen();
            let unit_size = [512, 4096, 65536][r.gen_range(0..3)];
            let len = match r.gen_range(0..3) {
                0 => unit_size,
                _ => r.gen_range(16..=unit_size),
            };
            let mut pt = vec![0u8; len];
            r.fill_bytes(&mut pt);
            let c = ctor(&key, unit_size).unwrap();
            let mut ours = pt.clone();
            c.encrypt_unit(tweak, &mut ours).unwrap();
            let mut theirs = pt.clone();
            aws_lc_xts(&key, tweak, &mut theirs, true);
            assert!(ours == theirs, "{name}: len {len} tweak {tweak:#x}");
            aws_lc_xts(&key, tweak, &mut theirs, false);
            assert!(theirs == pt, "{name}: aws-lc decrypts ours, len {len}");
        }
    }
}

/// Not a test: single-thread throughput of ours against aws-lc's XTS on 4 KiB units, both
/// per second of user CPU time, interleaved several times. Run with
/// `cargo test --release --test suite xts::speed_vs_aws_lc -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_vs_aws_lc() {
    use aws_lc_sys as sys;
    fn cpu() -> f64 {
        // SAFETY: getrusage writes the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        ru.ru_utime.tv_sec as f64 + ru.ru_utime.tv_usec as f64 * 1e-6
    }
    fn rate(mut f: impl FnMut()) -> f64 {
        let t0 = cpu();
        let mut n = 0u64;
        while cpu() - t0 < 0.5 {
            for _ in 0..256 {
                f();
            }
            n += 256 * 4096;
        }
        n as f64 / (cpu() - t0) / 1e6
    }
    let key: [u8; 64] = std::array::from_fn(|i| i as u8);
    let c = XtsCipher::new(&key, 4096).unwrap();
    let mut buf = vec![0x5au8; 4096];
    let mut out = vec![0u8; 4096 + 16];
    // SAFETY: as in `aws_lc_xts`; one context reused, the IV reset per unit as a disk
    // driver would.
    let ctx = unsafe { sys::EVP_CIPHER_CTX_new() };
    for dec in [false, true] {
        unsafe {
            let init = if dec {
                sys::EVP_DecryptInit_ex
            } else {
                sys::EVP_EncryptInit_ex
            };
            init(
                ctx,
                sys::EVP_aes_256_xts(),
                std::ptr::null_mut(),
                key.as_ptr(),
                std::ptr::null(),
            );
        }
        for _ in 0..3 {
            let ours = rate(|| {
                if dec {
                    c.decrypt_unit(5, &mut buf).unwrap()
                } else {
                    c.encrypt_unit(5, &mut buf).unwrap()
                }
            });
            let theirs = rate(|| unsafe {
                let iv = 5u128.to_le_bytes();
                let mut n = 0;
                if dec {
                    sys::EVP_DecryptInit_ex(
                        ctx,
                        std::ptr::null(),
                        std::ptr::null_mut(),
                        std::ptr::null(),
                        iv.as_ptr(),
                    );
                    sys::EVP_DecryptUpdate(ctx, out.as_mut_ptr(), &mut n, buf.as_ptr(), 4096);
                } else {
                    sys::EVP_EncryptInit_ex(
                        ctx,
                        std::ptr::null(),
                        std::ptr::null_mut(),
                        std::ptr::null(),
                        iv.as_ptr(),
                    );
                    sys::EVP_EncryptUpdate(ctx, out.as_mut_ptr(), &mut n, buf.as_ptr(), 4096);
                }
            });
            let what = if dec { "decrypt" } else { "encrypt" };
            println!(
                "{what}: ours {ours:.0} MB/s, aws-lc {theirs:.0} MB/s, ratio {:.3}",
                ours / theirs
            );
        }
    }
    unsafe { sys::EVP_CIPHER_CTX_free(ctx) };
}
