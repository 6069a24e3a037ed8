import os, ssl, socket, subprocess, sys, time, json, urllib.request, tempfile
binary, extra = sys.argv[1], sys.argv[2:]
home = tempfile.mkdtemp()
env = dict(os.environ, CMKFS_HOME=home, CMKFS_VAULT_KDF="test")
open(home + "/pp", "w").write("probe passphrase\n")
env["CMKFS_PASSPHRASE_FILE"] = home + "/pp"
subprocess.run([binary, "vault", "key", "create", "k", "--key-size", "2048"], env=env, check=True, capture_output=True)
srv = subprocess.Popen([binary, "vault", "serve", "--listen", "127.0.0.1:0", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
url = None
for line in srv.stdout:
    if line.startswith("listening on "):
        url = line.split()[2]; break
port = int(url.rsplit(":", 1)[1])
ctx = ssl.create_default_context(cafile=home + "/vault/tls/ca.pem"); ctx.check_hostname = False
conns = []
for _ in range(300):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    conns.append(s)
time.sleep(10)
alive = 0
for s in conns:
    s.settimeout(0.05)
    try:
        alive += 0 if s.recv(1) == b"" else 1
    except (socket.timeout, ssl.SSLWantReadError, TimeoutError):
        alive += 1
    except Exception:
        pass
print(f"idle TLS connections still open after 10 s: {alive}/300")
for s in conns: s.close()
audit = home + "/vault/audit.log"
before = os.path.getsize(audit)
codes = {}
t0 = time.time()
for i in range(2000):
    req = urllib.request.Request(url + "/keys?api-version=7.6", headers={"Authorization": f"Bearer x{i}.bad"})
    try:
        urllib.request.urlopen(req, context=ctx); c = 200
    except urllib.error.HTTPError as e:
        c = e.code
    codes[c] = codes.get(c, 0) + 1
print(f"2000 failed sign-ins in {time.time()-t0:.1f}s: {codes}; audit.log grew {os.path.getsize(audit)-before} bytes")
print("server log files:", [f for f in os.listdir(home) if "log" in f])
srv.terminate(); srv.wait()
