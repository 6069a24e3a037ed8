"""Compatibility test: the official Azure Key Vault keys SDK (azure-keyvault-keys, current
release) at its default settings against `cmkfs vault serve`, one test per family of the
keys API (docs/KEYVAULT.md lists every operation). Run by scripts/test.sh in a virtualenv it
creates:

    CMKFS_BIN=target/debug/cmkfs target/sdk-venv/bin/python tests/sdk/test_keyvault_sdk.py

The test makes its own vault store in a temporary directory, starts the server on a free
port, and stops it at the end. The only settings it changes from the SDK's defaults:

- `verify_challenge_resource=False`: the SDK checks that the challenge's resource is a
  *.vault.azure.net-style domain of the vault; a localhost server is not.
- `connection_verify=<ca.pem>`: the SDK insists on https; the server's CA is private.

The api-version is the SDK's default (2025-07-01). The credential only needs `get_token`;
the token is the one `cmkfs vault identity create --json` prints. The server runs with
`CMKFS_VAULT_POLICY_LIMITS=test` (rotation policies may use seconds) and a 1-second
rotation timer, so that a policy's rotation can be watched happening.
"""

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.keyvault.keys import (
    JsonWebKey,
    KeyClient,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
)
from azure.keyvault.keys.crypto import (
    CryptographyClient,
    EncryptionAlgorithm,
    KeyWrapAlgorithm,
    SignatureAlgorithm,
)
from cryptography.hazmat.primitives.asymmetric import rsa

CMKFS = os.environ.get("CMKFS_BIN", "target/debug/cmkfs")
START_TIMEOUT = 60
# Generous: the policy fires within a second or two; a loaded CI machine may be slower.
ROTATION_TIMEOUT = 60


class StaticToken:
    """A TokenCredential holding one bearer token (a cmkfs identity's)."""

    def __init__(self, token):
        self._token = token

    def get_token(self, *scopes, **kwargs):
        return AccessToken(self._token, int(time.time()) + 3600)


def cmkfs_env(home):
    """The environment of a cmkfs command: the test's home, and the passphrase its vault is
    sealed with (a test-only file beside the vault; the cheap Argon2id test setting)."""
    passphrase = os.path.join(home, "test-passphrase")
    if not os.path.exists(passphrase):
        with open(os.open(passphrase, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("cmkfs sdk test passphrase\n")
    return {
        **os.environ,
        "CMKFS_HOME": home,
        "CMKFS_PASSPHRASE_FILE": passphrase,
        "CMKFS_VAULT_KDF": "test",
        "CMKFS_VAULT_POLICY_LIMITS": "test",
    }


def cmkfs(home, *args):
    out = subprocess.run(
        [CMKFS, *args],
        env=cmkfs_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cmkfs {' '.join(args)}: {out.stderr}")
    return out.stdout


def digest(alg, data):
    name = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}[alg[-3:]]
    return name(data).digest()


class KeyVaultSdkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="cmkfs-sdk-")
        home = cls.tmp.name
        cls.home = home
        ident = json.loads(cmkfs(home, "vault", "identity", "create", "sdk", "--json"))
        cmkfs(home, "vault", "policy", "set", "sdk", "--all-keys", "--permissions", "all")
        # Without `get`, the SDK cannot fetch the public key and does every operation
        # remotely: encrypt, verify and wrap then run on the server too.
        remote = json.loads(cmkfs(home, "vault", "identity", "create", "remote", "--json"))
        cmkfs(
            home,
            "vault",
            "policy",
            "set",
            "remote",
            "--all-keys",
            "--permissions",
            "encrypt,decrypt,sign,verify,wrapKey,unwrapKey",
        )
        cls.log = open(os.path.join(home, "server.log"), "w")
        cls.server = subprocess.Popen(
            [CMKFS, "vault", "serve", "--listen", "127.0.0.1:0", "--rotation-check", "1s"],
            env=cmkfs_env(home),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=cls.log,
            text=True,
        )
        found = {}

        def read():
            for line in cls.server.stdout:
                if line.startswith("listening on "):
                    found["url"] = line.split(" ", 2)[2].strip()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if "url" not in found:
            cls.server.kill()
            raise RuntimeError("the vault server did not start")
        cls.url = found["url"]
        cls.ca = os.path.join(home, "vault", "tls", "ca.pem")
        cls.token = ident["token"]
        cls.cred = StaticToken(ident["token"])
        cls.remote_cred = StaticToken(remote["token"])
        cls.opts = dict(verify_challenge_resource=False, connection_verify=cls.ca)
        cls.client = KeyClient(vault_url=cls.url, credential=cls.cred, **cls.opts)

    @classmethod
    def tearDownClass(cls):
        cls.server.terminate()
        try:
            cls.server.wait(10)
        except subprocess.TimeoutExpired:
            cls.server.kill()
            cls.server.wait()
        cls.server.stdout.close()
        cls.log.close()
        cls.tmp.cleanup()

    def crypto(self, key_id, remote=False):
        cred = self.remote_cred if remote else self.cred
        return CryptographyClient(key_id, cred, **self.opts)

    def raw(self, method, path, body=None):
        """A request the SDK would not send (bad api-versions): (status, JSON body)."""
        r = requests.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": "Bearer " + self.token},
            verify=self.ca,
            timeout=30,
        )
        return r.status_code, r.json() if r.content else None

    # -- key lifecycle ------------------------------------------------------------------------

    def test_key_lifecycle_tags_and_wrap_unwrap(self):
        c = self.client
        key = c.create_rsa_key("sdk-key", size=2048, tags={"team": "storage", "env": "test"})
        self.assertTrue(key.id.startswith(self.url + "/keys/sdk-key/"), key.id)
        self.assertEqual(key.key_type, "RSA")
        self.assertEqual(key.properties.tags["team"], "storage")
        self.assertEqual(key.properties.tags["env"], "test")
        # Without key_ops, Key Vault's default for RSA: all six operations.
        self.assertEqual(
            sorted(key.key_operations),
            sorted(["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]),
        )
        got = c.get_key("sdk-key")
        self.assertEqual(got.id, key.id)
        self.assertEqual(got.properties.tags["team"], "storage")

        updated = c.update_key_properties("sdk-key", tags={"team": "platform"})
        self.assertEqual(updated.properties.tags["team"], "platform")
        self.assertNotIn("env", updated.properties.tags)
        self.assertEqual(c.get_key("sdk-key").properties.tags["team"], "platform")

        rotated = c.rotate_key("sdk-key")
        self.assertNotEqual(rotated.properties.version, key.properties.version)
        versions = list(c.list_properties_of_key_versions("sdk-key"))
        self.assertEqual(len(versions), 2)
        self.assertIn("sdk-key", [k.name for k in c.list_properties_of_keys()])

        # wrap/unwrap round trip, locally wrapped (the SDK has the public key) and remotely.
        dek = secrets.token_bytes(64)
        for remote in (False, True):
            crypto = self.crypto(rotated.id, remote)
            for alg in (KeyWrapAlgorithm.rsa_oaep_256, KeyWrapAlgorithm.rsa_oaep):
                wrapped = crypto.wrap_key(alg, dek)
                self.assertEqual(crypto.unwrap_key(alg, wrapped.encrypted_key).key, dek)

        # Disabled: unwrap refused with 403.
        wrapped = self.crypto(rotated.id).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
        props = c.update_key_properties("sdk-key", rotated.properties.version, enabled=False)
        self.assertFalse(props.properties.enabled)
        with self.assertRaises(HttpResponseError) as err:
            self.crypto(rotated.id).unwrap_key(
                KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key
            )
        self.assertEqual(err.exception.status_code, 403)
        c.update_key_properties("sdk-key", rotated.properties.version, enabled=True)
        self.assertEqual(
            self.crypto(rotated.id)
            .unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
            .key,
            dek,
        )

        # Soft delete, read the deleted key, list deleted keys, recover.
        deleted = c.begin_delete_key("sdk-key", _polling_interval=0.2).result()
        self.assertEqual(deleted.name, "sdk-key")
        self.assertIsNotNone(deleted.recovery_id)
        self.assertEqual(c.get_deleted_key("sdk-key").name, "sdk-key")
        self.assertIn("sdk-key", [d.name for d in c.list_deleted_keys()])
        with self.assertRaises(ResourceNotFoundError):
            c.get_key("sdk-key")
        c.begin_recover_deleted_key("sdk-key", _polling_interval=0.2).result()
        self.assertEqual(c.get_key("sdk-key").properties.version, rotated.properties.version)

    def test_import_key_with_tags(self):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        nums = private.private_numbers()

        def b(n):
            return n.to_bytes((n.bit_length() + 7) // 8, "big")

        jwk = JsonWebKey(
            kty="RSA",
            n=b(nums.public_numbers.n),
            e=b(nums.public_numbers.e),
            d=b(nums.d),
            p=b(nums.p),
            q=b(nums.q),
            dp=b(nums.dmp1),
            dq=b(nums.dmq1),
            qi=b(nums.iqmp),
            key_ops=["wrapKey", "unwrapKey"],
        )
        k = self.client.import_key("sdk-imported", jwk, tags={"origin": "byok"})
        self.assertEqual(k.properties.tags["origin"], "byok")
        self.assertEqual(sorted(k.key_operations), ["unwrapKey", "wrapKey"])
        self.assertEqual(k.key.n, b(nums.public_numbers.n))

    def test_paging_follows_next_link(self):
        c = self.client
        for i in range(3):
            c.create_rsa_key(f"sdk-page-{i}", size=2048)
        c.rotate_key("sdk-page-0")
        c.rotate_key("sdk-page-0")
        pages = list(c.list_properties_of_keys(max_page_size=1).by_page())
        names = [k.name for p in pages for k in p]
        self.assertGreaterEqual(len(pages), 3, "one key per page")
        self.assertEqual(len(names), len(set(names)), "no key twice")
        for i in range(3):
            self.assertIn(f"sdk-page-{i}", names)
        versions = list(c.list_properties_of_key_versions("sdk-page-0", max_page_size=2).by_page())
        self.assertEqual([len(list(p)) for p in versions], [2, 1])
        status, body = self.raw("GET", "/keys?api-version=2025-07-01&maxresults=26")
        self.assertEqual((status, body["error"]["code"]), (400, "BadParameter"))

    # -- crypto -------------------------------------------------------------------------------

    def test_encrypt_decrypt_sign_verify(self):
        key = self.client.create_rsa_key("sdk-crypto", size=2048)
        msg = secrets.token_bytes(100)
        for remote in (False, True):
            crypto = self.crypto(key.id, remote)
            for alg in (EncryptionAlgorithm.rsa_oaep_256, EncryptionAlgorithm.rsa_oaep):
                ct = crypto.encrypt(alg, msg)
                self.assertEqual(crypto.decrypt(alg, ct.ciphertext).plaintext, msg)
            for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
                d = digest(alg, msg)
                sig = crypto.sign(SignatureAlgorithm(alg), d)
                self.assertTrue(crypto.verify(SignatureAlgorithm(alg), d, sig.signature).is_valid)
                bad = bytes([d[0] ^ 1]) + d[1:]
                self.assertFalse(
                    crypto.verify(SignatureAlgorithm(alg), bad, sig.signature).is_valid, alg
                )

    def test_key_ops_are_enforced(self):
        key = self.client.create_rsa_key(
            "sdk-kek-only", size=2048, key_operations=["wrapKey", "unwrapKey"]
        )
        crypto = self.crypto(key.id, remote=True)
        with self.assertRaises(HttpResponseError) as err:
            crypto.sign(SignatureAlgorithm.rs256, b"\0" * 32)
        self.assertEqual(err.exception.status_code, 403)
        with self.assertRaises(HttpResponseError) as err:
            crypto.encrypt(EncryptionAlgorithm.rsa_oaep_256, b"x")
        self.assertEqual(err.exception.status_code, 403)
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
        with self.assertRaises(HttpResponseError) as err:
            crypto.decrypt(EncryptionAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
        self.assertEqual(err.exception.status_code, 403)

    def test_rsa1_5_is_refused_with_a_clear_error(self):
        key = self.client.create_rsa_key("sdk-no-pkcs1", size=2048)
        crypto = self.crypto(key.id, remote=True)
        for call in (
            lambda: crypto.wrap_key(KeyWrapAlgorithm.rsa1_5, b"k" * 32),
            lambda: crypto.unwrap_key(KeyWrapAlgorithm.rsa1_5, b"\0" * 256),
            lambda: crypto.encrypt(EncryptionAlgorithm.rsa1_5, b"k"),
            lambda: crypto.decrypt(EncryptionAlgorithm.rsa1_5, b"\0" * 256),
        ):
            with self.assertRaises(HttpResponseError) as err:
                call()
            self.assertEqual(err.exception.status_code, 400)
            self.assertIn("RSA1_5", err.exception.message)
            self.assertIn("Bleichenbacher", err.exception.message)
        with self.assertRaises(HttpResponseError) as err:
            self.client.create_rsa_key("sdk-pkcs1-tag", size=2048, tags={"cmkfs-wrap-alg": "RSA1_5"})
        self.assertEqual(err.exception.status_code, 400)

    def test_random_bytes(self):
        a = self.client.get_random_bytes(32)
        b = self.client.get_random_bytes(32)
        self.assertEqual((len(a), len(b)), (32, 32))
        self.assertNotEqual(a, b)
        self.assertEqual(len(self.client.get_random_bytes(128)), 128)
        status, body = self.raw("POST", "/rng?api-version=2025-07-01", {"count": 129})
        self.assertEqual((status, body["error"]["code"]), (400, "BadParameter"))

    def test_release_and_attestation_are_refused_on_purpose(self):
        key = self.client.create_rsa_key("sdk-no-export", size=2048)
        with self.assertRaises(HttpResponseError) as err:
            self.client.release_key("sdk-no-export", "attestation-token")
        self.assertEqual(err.exception.status_code, 400)
        self.assertIn("never exportable", err.exception.message)
        with self.assertRaises(HttpResponseError) as err:
            self.client.get_key_attestation("sdk-no-export", key.properties.version)
        self.assertEqual(err.exception.status_code, 400)

    # -- backup, restore, rotation policy -----------------------------------------------------

    def test_backup_and_restore(self):
        c = self.client
        key = c.create_rsa_key("sdk-backup", size=2048, tags={"keep": "yes"})
        second = c.rotate_key("sdk-backup")
        crypto = self.crypto(key.id)
        dek = secrets.token_bytes(32)
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
        blob = c.backup_key("sdk-backup")
        self.assertNotIn(b"PRIVATE", blob)
        # The name is taken (also while soft-deleted): restore refuses it.
        with self.assertRaises(ResourceExistsError):
            c.restore_key_backup(blob)
        c.begin_delete_key("sdk-backup", _polling_interval=0.2).result()
        with self.assertRaises(ResourceExistsError):
            c.restore_key_backup(blob)
        c.purge_deleted_key("sdk-backup")
        restored = c.restore_key_backup(blob)
        self.assertEqual(restored.id, second.id, "version ids survive")
        self.assertEqual(restored.properties.tags["keep"], "yes")
        self.assertEqual(len(list(c.list_properties_of_key_versions("sdk-backup"))), 2)
        # The old version's wrapped DEK unwraps again.
        self.assertEqual(self.crypto(key.id).unwrap_key(
            KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key, dek)
        # A damaged blob is a 400, never a 500.
        tampered = bytearray(blob)
        tampered[len(tampered) // 2] ^= 1
        with self.assertRaises(HttpResponseError) as err:
            c.restore_key_backup(bytes(tampered))
        self.assertEqual(err.exception.status_code, 400)

    def test_rotation_policy_is_applied(self):
        c = self.client
        key = c.create_rsa_key("sdk-rotating", size=2048)
        default = c.get_key_rotation_policy("sdk-rotating")
        self.assertEqual(
            [(a.action, a.time_before_expiry) for a in default.lifetime_actions],
            [(KeyRotationPolicyAction.notify, "P30D")],
        )
        policy = KeyRotationPolicy(
            expires_in="PT1H",
            lifetime_actions=[
                KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="PT3S")
            ],
        )
        stored = c.update_key_rotation_policy("sdk-rotating", policy)
        self.assertEqual(stored.expires_in, "PT1H")
        got = c.get_key_rotation_policy("sdk-rotating")
        self.assertEqual(got.lifetime_actions[0].time_after_create, "PT3S")
        self.assertEqual(got.lifetime_actions[0].action, KeyRotationPolicyAction.rotate)
        # The server's timer rotates on schedule: a new version appears by itself.
        deadline = time.time() + ROTATION_TIMEOUT
        while time.time() < deadline:
            latest = c.get_key("sdk-rotating")
            if latest.properties.version != key.properties.version:
                break
            time.sleep(0.5)
        self.assertNotEqual(latest.properties.version, key.properties.version, "no rotation")
        # expiryTime is applied to the new version.
        life = latest.properties.expires_on - latest.properties.created_on
        self.assertAlmostEqual(life.total_seconds(), 3600, delta=5)
        # Key Vault's limits hold outside test mode; here a malformed policy is refused.
        bad = KeyRotationPolicy(
            lifetime_actions=[
                KeyRotationLifetimeAction(KeyRotationPolicyAction.notify, time_after_create="P1D")
            ]
        )
        with self.assertRaises(HttpResponseError) as err:
            c.update_key_rotation_policy("sdk-rotating", bad)
        self.assertEqual(err.exception.status_code, 400)

    # -- api-versions, authentication, purge protection ---------------------------------------

    def test_every_api_version_and_the_error_for_unknown_ones(self):
        self.client.create_rsa_key("sdk-versions", size=2048)
        for v in ("7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"):
            old = KeyClient(vault_url=self.url, credential=self.cred, api_version=v, **self.opts)
            self.assertEqual(old.get_key("sdk-versions").name, "sdk-versions", v)
        status, body = self.raw("GET", "/keys/sdk-versions?api-version=7.9")
        self.assertEqual(status, 400)
        self.assertEqual(body["error"]["code"], "BadParameter")
        self.assertEqual(
            body["error"]["message"],
            "The specified version (7.9) is not recognized. Consider using the latest "
            "supported version (2025-07-01).",
        )
        # An operation newer than the api-version asked for.
        status, body = self.raw("POST", "/keys/sdk-versions/rotate?api-version=7.2")
        self.assertEqual(status, 400)

    def test_wrong_token_is_refused(self):
        bad = KeyClient(
            vault_url=self.url, credential=StaticToken("sdk.not-the-secret"), **self.opts
        )
        with self.assertRaises(HttpResponseError) as err:
            bad.get_key("anything")
        self.assertEqual(err.exception.status_code, 401)

    def test_zz_purge_is_refused_under_purge_protection(self):
        # Last (unittest runs tests by name): purge protection cannot be turned off again.
        c = self.client
        c.create_rsa_key("sdk-protected", size=2048)
        c.begin_delete_key("sdk-protected", _polling_interval=0.2).result()
        cmkfs(self.home, "vault", "config", "--purge-protection", "on")
        with self.assertRaises(HttpResponseError) as err:
            c.purge_deleted_key("sdk-protected")
        self.assertIn(err.exception.status_code, (403, 409))


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"sdk: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
