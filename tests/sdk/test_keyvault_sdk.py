"""Compatibility test: the official Azure Key Vault keys SDK (azure-keyvault-keys) against
`cmkfs vault serve`. Run by scripts/test.sh in a virtualenv it creates:

    CMKFS_BIN=target/debug/cmkfs target/sdk-venv/bin/python tests/sdk/test_keyvault_sdk.py

The test makes its own vault store in a temporary directory, starts the server on a free
port, and stops it at the end. SDK quirks it has to accommodate (all documented behaviour of
the SDK, none specific to cmkfs):

- `api_version="7.6"`: azure-keyvault-keys 4.11 defaults to "2025-07-01"; the server speaks
  7.4-7.6.
- `verify_challenge_resource=False`: the SDK checks that the challenge's resource is a
  *.vault.azure.net-style domain of the vault; a localhost server is not.
- `connection_verify=<ca.pem>`: the SDK insists on https; the server's CA is private.
- The credential only needs `get_token`; the token is the one `cmkfs vault identity create
  --json` prints.
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

CMKFS = os.environ.get("CMKFS_BIN", "target/debug/cmkfs")
START_TIMEOUT = 60


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


class KeyVaultSdkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="cmkfs-sdk-")
        home = cls.tmp.name
        cls.home = home
        # Purge protection on, so that purge is refused as Key Vault refuses it.
        cmkfs(home, "vault", "config", "--purge-protection", "on")
        ident = json.loads(cmkfs(home, "vault", "identity", "create", "sdk", "--json"))
        cmkfs(home, "vault", "policy", "set", "sdk", "--all-keys", "--permissions", "all")
        cls.log = open(os.path.join(home, "server.log"), "w")
        cls.server = subprocess.Popen(
            [CMKFS, "vault", "serve", "--listen", "127.0.0.1:0"],
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
        cls.cred = StaticToken(ident["token"])
        cls.opts = dict(
            verify_challenge_resource=False,
            api_version="7.6",
            connection_verify=cls.ca,
        )
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

    def crypto(self, key_id):
        return CryptographyClient(key_id, self.cred, **self.opts)

    def test_key_lifecycle_and_wrap_unwrap(self):
        c = self.client
        key = c.create_rsa_key("sdk-key", size=2048)
        self.assertTrue(key.id.startswith(self.url + "/keys/sdk-key/"), key.id)
        self.assertEqual(key.key_type, "RSA")
        got = c.get_key("sdk-key")
        self.assertEqual(got.id, key.id)
        self.assertEqual(got.properties.version, key.properties.version)

        rotated = c.rotate_key("sdk-key")
        self.assertNotEqual(rotated.properties.version, key.properties.version)
        versions = list(c.list_properties_of_key_versions("sdk-key"))
        self.assertEqual(len(versions), 2)
        self.assertIn("sdk-key", [k.name for k in c.list_properties_of_keys()])

        # wrap/unwrap round trip (the SDK may wrap locally with the public key; unwrap is
        # always the vault's).
        crypto = self.crypto(rotated.id)
        dek = secrets.token_bytes(64)
        for alg in (KeyWrapAlgorithm.rsa_oaep_256, KeyWrapAlgorithm.rsa_oaep):
            wrapped = crypto.wrap_key(alg, dek)
            self.assertEqual(crypto.unwrap_key(alg, wrapped.encrypted_key).key, dek)

        # Disabled: unwrap refused with 403.
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
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

        # Soft delete, read the deleted key, recover.
        deleted = c.begin_delete_key("sdk-key", _polling_interval=0.2).result()
        self.assertEqual(deleted.name, "sdk-key")
        self.assertIsNotNone(deleted.recovery_id)
        self.assertEqual(c.get_deleted_key("sdk-key").name, "sdk-key")
        with self.assertRaises(ResourceNotFoundError):
            c.get_key("sdk-key")
        c.begin_recover_deleted_key("sdk-key", _polling_interval=0.2).result()
        self.assertEqual(c.get_key("sdk-key").properties.version, rotated.properties.version)

        # Purge is refused under purge protection.
        c.begin_delete_key("sdk-key", _polling_interval=0.2).result()
        with self.assertRaises(HttpResponseError) as err:
            c.purge_deleted_key("sdk-key")
        self.assertIn(err.exception.status_code, (403, 409))

    def test_wrong_token_is_refused(self):
        bad = KeyClient(
            vault_url=self.url, credential=StaticToken("sdk.not-the-secret"), **self.opts
        )
        with self.assertRaises(HttpResponseError) as err:
            bad.get_key("anything")
        self.assertEqual(err.exception.status_code, 401)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"sdk: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
