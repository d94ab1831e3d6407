"""Access-token verification in the running gateway, checked against an independent ES256
implementation (python3-cryptography): tokens minted here with the key files of CITYHALL_VAR/keys
are accepted exactly when cityhall's contract says so, and every known attack is answered 401;
tokens the gateway issues verify here; revocations published on Redis and recorded in PostgreSQL
take effect; `cityhall keys rotate` is picked up without a restart; key-file permissions and
missing keys stop start-up with a clear message. Run by tests/run.py."""

import base64
import glob
import hashlib
import hmac
import json
import os
import random
import subprocess
import time
import uuid

import harness
from harness import wait_for

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
    from cryptography.exceptions import InvalidSignature
except ImportError:  # pragma: no cover - ops/dev installs python3-cryptography
    ec = None

CLUSTER = {"threads": 2}
TIMEOUT = 180

CITIZEN_ROUTE = "/v1/me/sessions"          # CH_ROLE_CITIZEN
STAFF_ROUTE = "/v1/staff/delegations"      # CH_ROLE_STAFF (POST)


# --------------------------------------------------------------------------- an independent JWS

def need_crypto():
    if ec is None:
        raise harness.Skip("python3-cryptography is not installed (ops/dev installs it)")


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_dec(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def keys_dir(cluster, ring="access"):
    return os.path.join(cluster.gateway.env["CITYHALL_VAR"], "keys", ring)


def ring_keys(cluster, ring="access"):
    """{kid: private key} of a keyring folder, read with python3-cryptography."""
    out = {}
    for path in sorted(glob.glob(os.path.join(keys_dir(cluster, ring), "*.pem"))):
        with open(path, "rb") as f:
            out[os.path.basename(path)[:-4]] = serialization.load_pem_private_key(f.read(), None)
    return out


def current_key(cluster, ring="access"):
    keys = ring_keys(cluster, ring)
    kid = max(keys)
    return kid, keys[kid]


def es256(key, signing_input):
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def compact(header, claims, sign):
    """header and claims as dicts (or raw bytes), sign(signing_input) -> signature bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims, separators=(",", ":")).encode()
    si = (b64u(h) + "." + b64u(c)).encode()
    return si.decode() + "." + b64u(sign(si))


def claims_for(role="citizen", sid=None, **over):
    now = int(time.time())
    c = {"iss": "cityhall", "aud": "cityhall-api", "sub": str(uuid.uuid4()), "sid": sid or str(uuid.uuid4()),
         "role": role, "iat": now, "exp": now + 600, "jti": b64u(os.urandom(16))}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def mint(cluster, role="citizen", typ="at+jwt", ring="access", **over):
    kid, key = current_key(cluster, ring)
    return compact({"alg": "ES256", "typ": typ, "kid": kid}, claims_for(role, **over), lambda si: es256(key, si))


def verify_here(cluster, token, typ="at+jwt"):
    """Verifies a compact ES256 token with python3-cryptography and the ring's public keys."""
    h, c, s = token.split(".")
    header = json.loads(b64u_dec(h))
    assert header["alg"] == "ES256" and header["typ"] == typ, header
    key = ring_keys(cluster)[header["kid"]]
    sig = b64u_dec(s)
    assert len(sig) == 64, len(sig)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.public_key().verify(der, (h + "." + c).encode(), ec.ECDSA(hashes.SHA256()))
    return header, json.loads(b64u_dec(c))


def call(cluster, token, path=CITIZEN_ROUTE, method="GET", http="h2c", scheme="Bearer"):
    headers = {} if token is None else {"Authorization": f"{scheme} {token}"}
    kw = {"json": {}} if method == "POST" else {}
    return cluster.gateway.request(path, method=method, http=http, headers=headers, **kw)


def assert_401(resp, what):
    assert resp.status == 401, f"{what}: expected 401, got {resp!r}"
    body = resp.json()
    assert body["error"]["code"] == "UNAUTHENTICATED", f"{what}: {body}"
    assert body["error"]["request_id"] == resp.headers.get("x-request-id"), body


def assert_accepted(resp, what):
    """The token passed authentication and the role check: the handler answered (whatever it said)."""
    assert resp.status not in (401, 403), f"{what}: the token was refused: {resp!r}"


# --------------------------------------------------------------------------- tests

def test_a_token_minted_independently_with_the_access_key_is_accepted_on_every_protocol(cluster):
    need_crypto()
    token = mint(cluster)
    for http in ("h2c", "h1", "h2"):
        assert_accepted(call(cluster, token, http=http), f"a valid citizen token over {http}")
    # the same token again comes from the verified-token cache: same answer
    for _ in range(3):
        assert_accepted(call(cluster, token), "a cached citizen token")


def test_a_valid_token_of_the_wrong_role_is_403_not_401(cluster):
    need_crypto()
    r = call(cluster, mint(cluster, role="citizen"), path=STAFF_ROUTE, method="POST")
    assert r.status == 403, r
    assert r.json()["error"]["code"] == "PERMISSION_DENIED", r.json()
    r = call(cluster, mint(cluster, role="staff", dept="gd-health", hall="hall-1"), path=CITIZEN_ROUTE)
    assert r.status == 403, r
    assert_accepted(call(cluster, mint(cluster, role="staff", dept="gd-health", hall="hall-1"), path=STAFF_ROUTE,
                         method="POST"), "a staff token on a staff route")


def test_every_token_attack_is_401(cluster):
    need_crypto()
    kid, key = current_key(cluster)
    good = claims_for()
    sign = lambda si: es256(key, si)  # noqa: E731
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    foreign = ec.generate_private_key(ec.SECP256R1())
    hc_kid, hc_key = current_key(cluster, "healthcode")
    valid = compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, good, sign)
    h, c, s = valid.split(".")
    sig = bytearray(b64u_dec(s))
    sig[10] ^= 0x01
    now = int(time.time())

    attacks = {
        "alg none, empty signature": compact({"alg": "none", "typ": "at+jwt", "kid": kid}, good, lambda si: b""),
        "alg none, no signature part": ".".join(valid.split(".")[:2]),
        "HS256 with the public key PEM as the secret": compact(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid}, good,
            lambda si: hmac.new(pub_pem, si, hashlib.sha256).digest()),
        "HS256 without kid": compact({"alg": "HS256", "typ": "JWT"}, good,
                                     lambda si: hmac.new(pub_pem, si, hashlib.sha256).digest()),
        "unknown kid": compact({"alg": "ES256", "typ": "at+jwt", "kid": "k-unknown"}, good,
                               lambda si: es256(foreign, si)),
        "our kid, another key": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, good,
                                        lambda si: es256(foreign, si)),
        "flipped signature bit": h + "." + c + "." + b64u(bytes(sig)),
        "truncated signature": valid[:-2],
        "DER signature": h + "." + c + "." + b64u(key.sign((h + "." + c).encode(), ec.ECDSA(hashes.SHA256()))),
        "changed claims under a valid signature": h + "." + b64u(json.dumps(dict(good, role="admin")).encode()) + "." + s,
        "expired": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, dict(good, exp=now - 120), sign),
        "nbf in the future": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, dict(good, nbf=now + 300), sign),
        "iat in the future": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, dict(good, iat=now + 3600), sign),
        "wrong audience": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, dict(good, aud="other-api"), sign),
        "wrong issuer": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, dict(good, iss="evil"), sign),
        "no exp": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, claims_for(exp=None), sign),
        "no sid": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid},
                          {k: v for k, v in good.items() if k != "sid"}, sign),
        "unknown role": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid}, dict(good, role="root"), sign),
        "typ JWT": compact({"alg": "ES256", "typ": "JWT", "kid": kid}, good, sign),
        "crit header": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid, "crit": ["exp"]}, good, sign),
        "jku header": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid, "jku": "http://127.0.0.1/jwks"}, good,
                              sign),
        "embedded jwk header": compact({"alg": "ES256", "typ": "at+jwt", "kid": kid,
                                        "jwk": {"kty": "EC", "crv": "P-256"}}, good, sign),
        "a health-code token (hc+jwt, healthcode ring)": compact(
            {"alg": "ES256", "typ": "hc+jwt", "kid": hc_kid}, good, lambda si: es256(hc_key, si)),
        "an access-shaped token signed by the healthcode ring": compact(
            {"alg": "ES256", "typ": "at+jwt", "kid": hc_kid}, good, lambda si: es256(hc_key, si)),
        "an opaque refresh token": b64u(os.urandom(32)),
        "garbage": "not-a-token",
        "four parts": valid + ".x",
    }
    for what, token in attacks.items():
        assert_401(call(cluster, token), what)
    assert_401(call(cluster, None), "no Authorization header")
    assert_401(call(cluster, valid, scheme="Basic"), "a Basic Authorization header")
    # the valid token itself passes, so the refusals above are about what was changed
    assert_accepted(call(cluster, valid), "the untampered token")
    # a refused token is not remembered as valid, and a valid one does not make its tampered twin pass
    assert_401(call(cluster, attacks["changed claims under a valid signature"]), "changed claims, again")


def test_public_routes_need_no_token_and_ignore_a_bad_one(cluster):
    r = cluster.gateway.request("/v1/system/ping")
    assert r.status == 200, r
    r = cluster.gateway.request("/v1/system/ping", headers={"Authorization": "Bearer garbage"})
    assert r.status == 200, r
    r = cluster.gateway.request("/healthz")
    assert r.status == 200 and r.text == "ok\n", r


def test_a_session_id_published_on_redis_is_refused_by_every_thread_at_once(cluster):
    need_crypto()
    sid = str(uuid.uuid4())
    token = mint(cluster, sid=sid)
    other = mint(cluster)
    for _ in range(4):  # warm the caches of both threads (each curl is a new connection)
        assert_accepted(call(cluster, token), "before revocation")
    # what another gateway process does in ch_auth_revoke
    receivers = int(cluster.redis.cli("PUBLISH", "ch:revoked", sid))
    assert receivers >= 2, f"every gateway thread subscribes to ch:revoked ({receivers} receivers)"
    wait_for(lambda: call(cluster, token).status == 401, timeout=5, what="the revoked session's token to be refused")
    for _ in range(8):
        assert_401(call(cluster, token), "a token of a revoked session")
    assert_accepted(call(cluster, other), "a token of another session")


def test_a_session_revoked_in_postgresql_is_refused_after_a_restart(cluster):
    need_crypto()
    sid = str(uuid.uuid4())
    cluster.pg.psql(
        "INSERT INTO sessions (session_id, role, subject, expires_at, revoked_at, revoked_reason) "
        f"VALUES ('{sid}', 'citizen', 'someone', now() + interval '1 hour', now(), 'logout')")
    token = mint(cluster, sid=sid)
    # a restart forgets what Redis said; the durable record is read at start-up
    cluster.gateway.stop()
    cluster.gateway.start()
    assert_401(call(cluster, token), "a token of a session revoked in PostgreSQL, right after start")
    assert_accepted(call(cluster, mint(cluster)), "a token of a live session after the restart")


def test_a_revocation_missed_on_redis_is_caught_by_the_postgresql_resync(cluster):
    need_crypto()
    sid = str(uuid.uuid4())
    token = mint(cluster, sid=sid)
    assert_accepted(call(cluster, token), "before the revocation")
    cluster.pg.psql(
        "INSERT INTO sessions (session_id, role, subject, expires_at, revoked_at, revoked_reason) "
        f"VALUES ('{sid}', 'citizen', 'someone', now() + interval '1 hour', now(), 'logout')")
    # no PUBLISH: a Redis reconnect makes the gateway resync at once (instead of within 30 s)
    cluster.redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
    wait_for(lambda: call(cluster, token).status == 401, timeout=40,
             what="the resync from PostgreSQL to refuse the revoked session")


def test_keys_rotate_takes_effect_without_a_restart_and_old_keys_verify_until_removed(cluster):
    need_crypto()
    old_kid, _ = current_key(cluster)
    old_token = mint(cluster)
    assert_accepted(call(cluster, old_token), "a token of the current key")
    r = cluster.gateway.run("keys", "rotate")
    assert r.returncode == 0, r.stderr
    new_kid, new_key = current_key(cluster)
    assert new_kid > old_kid and new_kid in r.stdout, (old_kid, new_kid, r.stdout)
    new_token = mint(cluster)
    wait_for(lambda: call(cluster, new_token).status != 401, timeout=20,
             what="the gateway to load the rotated key")
    assert_accepted(call(cluster, old_token), "a token of the older key after the rotation")
    # the gateway now signs with the new key (checked through a login when it exists)
    # removing the old key file ends its tokens, cached or not
    os.unlink(os.path.join(keys_dir(cluster), old_kid + ".pem"))
    wait_for(lambda: call(cluster, old_token).status == 401, timeout=20,
             what="tokens of a removed key to be refused")
    assert_accepted(call(cluster, new_token), "a token of the new key")


def test_a_token_issued_by_the_gateway_verifies_with_an_independent_es256_implementation(cluster):
    need_crypto()
    var = cluster.gateway.env["CITYHALL_VAR"]
    phone = "1" + random.choice("3456789") + "".join(random.choice("0123456789") for _ in range(9))
    r = cluster.gateway.request("/v1/auth/sms-code", method="POST", json={"phone": phone})
    if r.status != 202:
        raise harness.Skip(f"citizen login is not available yet (sms-code answered {r.status})")
    outbox = os.path.join(var, "sms-outbox.jsonl")
    code = None
    with open(outbox) as f:
        for line in f:
            m = json.loads(line)
            if m.get("phone") == phone:
                code = m["code"]
    assert code, "the development SMS provider wrote the code"
    r = cluster.gateway.request("/v1/auth/login", method="POST", json={"phone": phone, "code": code})
    assert r.status == 200, r
    token = r.json()["access_token"]
    header, claims = verify_here(cluster, token)  # raises InvalidSignature if it does not verify
    assert set(header) == {"alg", "typ", "kid"} and header["kid"] == current_key(cluster)[0], header
    now = time.time()
    assert claims["iss"] == "cityhall" and claims["aud"] == "cityhall-api", claims
    assert claims["role"] == "citizen" and claims["sub"] == r.json()["citizen_id"], claims
    assert isinstance(claims["iat"], int) and isinstance(claims["exp"], int), claims
    assert abs(claims["iat"] - now) < 60 and 300 <= claims["exp"] - claims["iat"] <= 900, claims
    assert len(b64u_dec(claims["jti"])) == 16 and uuid.UUID(claims["sid"]), claims
    assert_accepted(call(cluster, token), "the gateway's own token")
    # and a tampered copy of it is refused
    h, c, s = token.split(".")
    forged = h + "." + b64u(json.dumps(dict(claims, sub=str(uuid.uuid4()))).encode()) + "." + s
    try:
        verify_here(cluster, forged)
        raise AssertionError("python3-cryptography accepted a tampered token")
    except InvalidSignature:
        pass
    assert_401(call(cluster, forged), "the gateway's token with a changed subject")


def test_start_up_refuses_missing_keys_and_readable_key_files(cluster):
    env = dict(cluster.gateway.env)
    empty = os.path.join(cluster.tmpdir, "empty-var")
    os.makedirs(empty, exist_ok=True)
    env["CITYHALL_VAR"] = empty
    env["CITYHALL_HTTP_PORT"] = str(harness.free_port())
    env["CITYHALL_HTTPS_PORT"] = "0"
    r = subprocess.run([cluster.gateway.binary, "serve"], env=env, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "cityhall keys init" in r.stderr, r.stderr

    # keys init creates exactly what is missing, with private modes, and running it again changes nothing
    r = subprocess.run([cluster.gateway.binary, "keys", "init"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("created") == 4, r.stdout  # data key, access, healthcode and licence keyrings
    files = sorted(glob.glob(os.path.join(empty, "keys", "**", "*"), recursive=True))
    modes = {os.path.relpath(p, empty): oct(os.stat(p).st_mode & 0o777) for p in files}
    assert sum(1 for p in modes if p.endswith(".pem")) == 3, modes
    assert all(m == ("0o700" if os.path.isdir(os.path.join(empty, p)) else "0o600") for p, m in modes.items()), modes
    r2 = subprocess.run([cluster.gateway.binary, "keys", "init"], env=env, capture_output=True, text=True, timeout=30)
    assert r2.returncode == 0 and "created" not in r2.stdout and r2.stdout.count("exists") == 4, r2.stdout
    assert sorted(glob.glob(os.path.join(empty, "keys", "**", "*"), recursive=True)) == files

    data_key = os.path.join(empty, "keys", "data.key")
    os.chmod(data_key, 0o640)
    r = subprocess.run([cluster.gateway.binary, "serve"], env=env, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "readable by group or others" in r.stderr, (r.returncode, r.stderr)
    os.chmod(data_key, 0o600)
    pem = glob.glob(os.path.join(empty, "keys", "access", "*.pem"))[0]
    os.chmod(pem, 0o644)
    r = subprocess.run([cluster.gateway.binary, "serve"], env=env, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "readable by group or others" in r.stderr, (r.returncode, r.stderr)
    # the message names the file, never a key's bytes
    key_text = open(pem).read()
    assert key_text.splitlines()[1] not in r.stderr
