"""TLS and secrets of the gateway against real processes: only TLS 1.2 and 1.3 with ECDHE + AEAD ciphers (checked
with `openssl s_client`), the certificate and key reloaded on SIGHUP without closing the listener, an open
connection or a request in flight (a bad file is logged and the running certificate stays), key files that group or
others may read refused at start-up with exit status 2 (the TLS key, the data key and every signing keyring), and
the cleartext listener on 127.0.0.1 unless its own setting says otherwise. Run by tests/run.py.

Tests that replace certificate files start a gateway of their own (in a subfolder of the shared cluster's folder,
on the shared PostgreSQL and Redis), so the session's certificate of harness.tls_cert() is never touched."""

import glob
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import harness
from harness import wait_for

CLUSTER = {"threads": 2}
TIMEOUT = 180


# --------------------------------------------------------------------------- helpers

def make_cert(folder, name):
    """A self-signed P-256 certificate for 127.0.0.1 with CN=name: (cert_path, key_path), the key mode 0600."""
    cert, key = os.path.join(folder, f"{name}.crt"), os.path.join(folder, f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    os.chmod(key, 0o600)
    return cert, key


def replace_file(src, dst):
    """Puts src's bytes at dst atomically (rename), keeping src's mode: how certificate tools renew."""
    tmp = dst + ".new"
    shutil.copy2(src, tmp)
    os.rename(tmp, dst)


def own_gateway(cluster, name, env=None, start=True):
    """A second gateway on the shared PostgreSQL and Redis with certificate files of its own (tls.crt, tls.key in
    its folder, CN=<name>-a)."""
    folder = os.path.join(cluster.tmpdir, name)
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o711)
    cert, key = make_cert(folder, f"{name}-a")
    live_cert, live_key = os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key")
    replace_file(cert, live_cert)
    replace_file(key, live_key)
    e = {"CITYHALL_TLS_CERT": live_cert, "CITYHALL_TLS_KEY": live_key}
    e.update(env or {})
    gw = harness.Gateway(folder, cluster.pg, cluster.redis, threads=2, env=e, start=start)
    return gw, folder


def served_cn(port, host="127.0.0.1"):
    """The CN of the certificate a new TLS connection is shown."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    r = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject", "-nameopt", "multiline"],
                       input=der, capture_output=True, timeout=10)
    for line in r.stdout.decode().splitlines():
        if "commonName" in line:
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"no CN in {r.stdout!r}")


def s_client(port, *args):
    """`openssl s_client` against 127.0.0.1:port with args; (handshake succeeded, protocol, cipher)."""
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    out = r.stdout + r.stderr
    proto = cipher = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Protocol") and ":" in line:
            proto = line.split(":", 1)[1].strip()
        if line.startswith("Cipher") and ":" in line:
            cipher = line.split(":", 1)[1].strip()
        if line.startswith("New, ") and ", Cipher is " in line:  # "New, TLSv1.3, Cipher is TLS_AES_..."
            proto, cipher = line.split(", ")[1], line.rsplit(" ", 1)[1]
    ok = r.returncode == 0 and cipher not in (None, "(NONE)", "0000")
    return ok, proto, cipher


def http1_exchange(sock, path="/healthz"):
    """One HTTP/1.1 request on a kept-alive connection; returns (status line, body) after reading the whole
    response (Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([ln.split(b":", 1)[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")][0])
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the connection closed in the body"
        body += chunk
    return head.split(b"\r\n", 1)[0].decode(), body


def log_events(gw, event):
    return [line for line in gw.log_json() if line.get("event") == event]


def can_connect(host, port):
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- protocol versions and ciphers

def test_tls_1_0_and_1_1_are_refused_and_1_2_and_1_3_negotiate(cluster):
    port = cluster.gateway.https_port
    # SECLEVEL=0 lets this client offer the old versions: the refusal must come from the server
    for flag in ("-tls1", "-tls1_1"):
        ok, proto, cipher = s_client(port, flag, "-cipher", "ALL:@SECLEVEL=0")
        assert not ok, f"{flag} negotiated {proto} {cipher}"
    ok, proto, cipher = s_client(port, "-tls1_2")
    assert ok and proto == "TLSv1.2", (proto, cipher)
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    ok, proto, cipher = s_client(port, "-tls1_3")
    assert ok and proto == "TLSv1.3", (proto, cipher)


def test_cbc_and_rsa_key_exchange_ciphers_are_refused_on_tls_1_2(cluster):
    port = cluster.gateway.https_port
    refused = ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256", "AES128-GCM-SHA256",
               "AES256-SHA", "DHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-CCM", "ECDHE-ECDSA-AES128-CCM8"]
    for c in refused:
        ok, proto, cipher = s_client(port, "-tls1_2", "-cipher", c + ":@SECLEVEL=0")
        assert not ok, f"{c} was accepted ({proto} {cipher})"
    for c in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        ok, proto, cipher = s_client(port, "-tls1_2", "-cipher", c)
        assert ok and cipher == c, (c, proto, cipher)


# --------------------------------------------------------------------------- reload on SIGHUP

def test_sighup_reloads_the_certificate_without_dropping_the_listener_a_connection_or_a_request(cluster):
    gw, folder = own_gateway(cluster, "reload", env={"CITYHALL_PG_TIMEOUT_MS": 20000})
    try:
        assert served_cn(gw.https_port) == "reload-a"
        # a connection opened before the reload, kept alive across it (HTTP/1.1 over TLS)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        kept = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.https_port), timeout=10))
        assert http1_exchange(kept)[0].startswith("HTTP/1.1 200")
        # accepted before the reload, its ClientHello sent after: h2o creates the TLS session only then
        idle = socket.create_connection(("127.0.0.1", gw.https_port), timeout=10)
        time.sleep(0.3)
        # a request in flight: PostgreSQL paused, /v1/system/info waits for it
        cluster.pg.pause()
        try:
            inflight = harness.curl_async(gw.url("/v1/system/info", tls=True), http="h2", timeout=30)
            time.sleep(0.5)
            assert inflight.proc.poll() is None, "the request did not wait for PostgreSQL"
            cert_b, key_b = make_cert(folder, "reload-b")
            replace_file(cert_b, os.path.join(folder, "tls.crt"))
            replace_file(key_b, os.path.join(folder, "tls.key"))
            os.kill(gw.pid, signal.SIGHUP)
            wait_for(lambda: served_cn(gw.https_port) == "reload-b", timeout=5, what="the new certificate")
            assert gw.running and inflight.proc.poll() is None
        finally:
            cluster.pg.resume()
        r = inflight.wait()
        assert r.status == 200 and r.json()["db_time"], r
        assert http1_exchange(kept)[0].startswith("HTTP/1.1 200"), "the connection opened before the reload"
        kept.close()
        idle = ctx.wrap_socket(idle)
        assert http1_exchange(idle)[0].startswith("HTTP/1.1 200")
        idle.close()
        assert log_events(gw, "tls_reload"), gw.log_text()[-2000:]
        # every loop moves within its next tick (100 ms, later on a loaded machine): then many new connections all
        # see the new certificate
        wait_for(lambda: {served_cn(gw.https_port) for _ in range(12)} == {"reload-b"}, timeout=5,
                 what="every loop serving the new certificate")
        assert gw.request("/healthz", http="h2").status == 200
    finally:
        cluster.pg.resume()
        gw.stop()


def test_a_bad_certificate_or_a_loose_key_on_sighup_is_logged_and_the_running_one_stays(cluster):
    gw, folder = own_gateway(cluster, "badreload")
    live_cert, live_key = os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key")
    try:
        assert served_cn(gw.https_port) == "badreload-a"
        cert_b, key_b = make_cert(folder, "badreload-b")
        cases = []
        # not a certificate at all
        garbage = os.path.join(folder, "garbage.crt")
        with open(garbage, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        cases.append(("garbage certificate", garbage, None, "certificate"))
        # a new certificate whose key was not replaced with it
        cases.append(("certificate without its key", cert_b, None, "does not match"))
        # the right pair, but the key readable by others
        loose = os.path.join(folder, "loose.key")
        shutil.copy2(key_b, loose)
        os.chmod(loose, 0o644)
        cases.append(("world-readable key", cert_b, loose, "readable by group or others"))
        for what, cert, key, expect in cases:
            before = len(log_events(gw, "tls_reload_failed"))
            replace_file(cert, live_cert)
            if key is not None:
                replace_file(key, live_key)
            os.kill(gw.pid, signal.SIGHUP)
            failed = wait_for(lambda: log_events(gw, "tls_reload_failed")[before:], timeout=5,
                              what=f"the reload failure for the {what}")
            assert expect in failed[0]["msg"], (what, failed)
            assert "BEGIN" not in failed[0]["msg"]
            assert gw.running, f"the gateway exited on a {what}"
            assert served_cn(gw.https_port) == "badreload-a", what
            assert gw.request("/healthz", http="h2").status == 200
            # put the good pair back for the next case
            replace_file(os.path.join(folder, "badreload-a.crt"), live_cert)
            replace_file(os.path.join(folder, "badreload-a.key"), live_key)
        # and a good pair afterwards still loads
        replace_file(cert_b, live_cert)
        replace_file(key_b, live_key)
        os.kill(gw.pid, signal.SIGHUP)
        wait_for(lambda: served_cn(gw.https_port) == "badreload-b", timeout=5, what="the good certificate")
    finally:
        gw.stop()


# --------------------------------------------------------------------------- key file modes at start-up

def serve_once(gw):
    """Runs `cityhall serve` in the foreground for at most 30 s; (exit code, stderr)."""
    try:
        r = subprocess.run([gw.binary, "serve"], env=gw.env, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError("cityhall serve started with a loose key file")
    return r.returncode, r.stdout + r.stderr


def test_key_files_readable_by_group_or_others_refuse_start_up_with_exit_2(cluster):
    gw, folder = own_gateway(cluster, "modes", start=False)
    gw.keys_init()
    gw.migrate()
    var = gw.env["CITYHALL_VAR"]
    files = [("TLS key", gw.env["CITYHALL_TLS_KEY"], 0o640), ("data key", os.path.join(var, "keys", "data.key"), 0o604)]
    for ring in ("access", "healthcode", "licence"):
        pems = glob.glob(os.path.join(var, "keys", ring, "*.pem"))
        assert pems, ring
        files.append((f"{ring} signing key", pems[0], 0o644))
    for what, path, mode in files:
        secret = open(path).read()
        os.chmod(path, mode)
        try:
            rc, out = serve_once(gw)
        finally:
            os.chmod(path, 0o600)
        assert rc == 2, (what, rc, out[-2000:])
        assert "readable by group or others" in out and path in out, (what, out[-2000:])
        longest = max(secret.strip().splitlines(), key=len)
        assert longest[:40] not in out, f"the {what}'s bytes are in the output"
    # with every file back to 0600 it starts
    gw.start()
    assert gw.request("/healthz", http="h2").status == 200
    gw.stop()


# --------------------------------------------------------------------------- listener addresses

def test_the_cleartext_listener_stays_on_loopback_when_the_tls_listener_moves(cluster):
    # 127.0.0.2 stands for a public address: the TLS listener goes there, the cleartext one stays on 127.0.0.1
    gw, _ = own_gateway(cluster, "addr", env={"CITYHALL_LISTEN": "127.0.0.2"})
    try:
        assert can_connect("127.0.0.2", gw.https_port) and not can_connect("127.0.0.1", gw.https_port)
        assert can_connect("127.0.0.1", gw.http_port) and not can_connect("127.0.0.2", gw.http_port)
        assert any("http://127.0.0.1:" in line.get("msg", "") for line in log_events(gw, "listening"))
    finally:
        gw.stop()
    # its own setting moves it
    gw.env["CITYHALL_HTTP_LISTEN"] = "127.0.0.3"
    gw.env["CITYHALL_LISTEN"] = "127.0.0.1"
    http_port, gw.http_port = gw.http_port, 0  # the harness then waits for readiness over TLS
    gw.start()
    try:
        assert can_connect("127.0.0.3", http_port) and not can_connect("127.0.0.1", http_port)
        assert can_connect("127.0.0.1", gw.https_port)
    finally:
        gw.stop()
