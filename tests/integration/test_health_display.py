"""The health code as shown and signed, against real PostgreSQL, Redis and the gateway: GET /v1/health/code
(JSON and protobuf) for a real-name-bound citizen, its token verified against GET /v1/health/keys by an
independent implementation (python3-cryptography, not cityhall's code), the PNG decoded by zbarimg to exactly
the token, the SVG, the cache (the same token on repeated calls, a new one after an invalidation), POST
/v1/health/verify (valid, edited, expired, malformed), paper codes (issue, verify, revoke, the access log),
dependents and what a citizen may not read (404 byte for byte as an unknown id), 422 without a real name, key
rotation without a restart, and degraded mode: Redis killed, then PostgreSQL stopped too. Run by tests/run.py.

Registry residents come from CSV files loaded with `cityhall import registry`; citizens log in by SMS code
through the development outbox and bind their real name through the API; staff accounts come from
`cityhall staff add` and log in with a TOTP code computed here."""

import base64
import datetime
import json
import os
import re
import shutil
import subprocess
import time
import uuid

import harness
from harness import wait_for

CLUSTER = {"threads": 2}
TIMEOUT = 240

PB = "application/x-protobuf"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
REGION = "110101"
TOKEN_TTL = 300
PAPER_TTL = 7 * 86400

IDS = set()      # every raw ID number used: none may appear in a token, a body, Redis or the log
NAMES = set()
PHONES = set()


# --------------------------------------------------------------------------- crypto (independent of cityhall)

def crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, utils
    except ImportError:
        raise harness.Skip("python3-cryptography is not installed (apt-get install python3-cryptography)")
    return hashes, serialization, ec, utils


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64e(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jws_parts(token):
    h, p, s = token.split(".")
    return json.loads(b64d(h)), json.loads(b64d(p)), b64d(s)


def jwks_verify(token, jwks):
    """ES256 verification with python3-cryptography: the key from the JWK's x and y, the raw r||s signature
    over header.payload. Returns the (header, claims) or raises."""
    hashes, _, ec, utils = crypto()
    header, claims, sig = jws_parts(token)
    assert header == {"alg": "ES256", "typ": "hc+jwt", "kid": header["kid"]}, header
    keys = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    assert len(keys) == 1, (header, jwks)
    k = keys[0]
    assert (k["kty"], k["crv"], k["use"], k["alg"]) == ("EC", "P-256", "sig", "ES256"), k
    pub = ec.EllipticCurvePublicNumbers(int.from_bytes(b64d(k["x"]), "big"), int.from_bytes(b64d(k["y"]), "big"),
                                        ec.SECP256R1()).public_key()
    assert len(sig) == 64, len(sig)
    der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    signing_input = token.rsplit(".", 1)[0].encode()
    pub.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature
    return header, claims


def ring_dir(cluster):
    return os.path.join(var_dir(cluster), "keys", "healthcode")


def sign_with_ring(cluster, claims, kid=None):
    """A token signed here with the healthcode ring's private key (the newest kid unless told)."""
    hashes, serialization, ec, utils = crypto()
    kids = sorted(f[:-4] for f in os.listdir(ring_dir(cluster)) if f.endswith(".pem"))
    kid = kid or kids[-1]
    with open(os.path.join(ring_dir(cluster), kid + ".pem"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    head = b64e(json.dumps({"alg": "ES256", "typ": "hc+jwt", "kid": kid}, separators=(",", ":")).encode())
    body = b64e(json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode())
    der = key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der)
    return f"{head}.{body}.{b64e(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# --------------------------------------------------------------------------- registry, citizens, staff

def person(birth=None):
    name = harness.new_name()
    NAMES.add(name)
    n = harness.new_id_number(REGION, birth, "M", used=IDS)
    return {"id": n, "name": name, "birth": harness.id_birth_date(n)}


def residents(cluster, *people):
    harness.import_registry(cluster.gateway, [
        (p["id"], p["name"], "M", p["birth"], REGION, "北京市东城区东华门街道1号", "", "") for p in people])
    for p in people:
        p["resident_id"] = harness.resident_id(cluster.gateway, p["id"])
    return people


def var_dir(cluster):
    return cluster.gateway.env["CITYHALL_VAR"]


def login(cluster):
    """A new citizen account by SMS login: the TokenResponse with "phone" and "token"."""
    return harness.sms_login(cluster.gateway, harness.new_phone(PHONES))


def get(cluster, who, path, headers=None, **kw):
    h = {"Authorization": f"Bearer {who['token'] if isinstance(who, dict) else who}"}
    h.update(headers or {})
    return cluster.gateway.request(path, headers=h, **kw)


def post(cluster, who, path, body, headers=None, **kw):
    h = {"Authorization": f"Bearer {who['token'] if isinstance(who, dict) else who}"} if who else {}
    h.update(headers or {})
    return cluster.gateway.request(path, method="POST", json=body, headers=h, **kw)


def citizen(cluster, birth=None):
    """A logged-in citizen bound to a fresh registry resident: the account merged with the person."""
    p = residents(cluster, person(birth))[0]
    who = login(cluster)
    harness.bind_real_name(cluster.gateway, who["token"], p["id"], p["name"])
    who.update(p)
    return who


def staff(cluster):
    """A counter staff member of the health department, logged in: {"token", "staff_id", ...}."""
    return harness.staff_token(cluster.gateway, dept="health")


assert_error = harness.assert_error


def code_of(cluster, who, **kw):
    r = get(cluster, who, "/v1/health/code", **kw)
    assert r.status == 200, r
    return r.json()


def jwks(cluster):
    r = cluster.gateway.request("/v1/health/keys")
    assert r.status == 200, r
    return r.json()


def verify(cluster, token):
    r = cluster.gateway.request("/v1/health/verify", method="POST", json={"token": token})
    assert r.status == 200, r
    return r.json()


def set_code(cluster, who, color, reasons, version):
    """Writes a resident's code the way R's recompute does (row, then Redis DEL and PUBLISH on ch:hc)."""
    reasons_sql = json.dumps(reasons, ensure_ascii=False).replace("'", "''")
    cluster.pg.psql(
        "INSERT INTO health_codes (resident_id, code_id, color, reasons, rule_version, as_of, version) "
        f"VALUES ({who['resident_id']}, '{uuid.uuid4()}', '{color}', '{reasons_sql}'::jsonb, 1, now(), {version}) "
        f"ON CONFLICT (resident_id) DO UPDATE SET color = excluded.color, reasons = excluded.reasons, "
        "as_of = excluded.as_of, version = excluded.version, updated_at = now()")
    cluster.redis.cli("DEL", f"hc:code:{who['resident_id']}")
    cluster.redis.cli("PUBLISH", "ch:hc", str(who["resident_id"]))


def no_personal_data(text, who):
    assert who["id"] not in text, "an ID number leaked"
    assert who["name"] not in text, "a full name leaked"


# --------------------------------------------------------------------------- the code

def test_code_of_a_bound_citizen_has_color_reasons_and_a_signed_token(cluster):
    who = citizen(cluster)
    before = int(time.time())
    body = code_of(cluster, who)
    assert set(body) == {"color", "reasons", "as_of", "token", "expires_at", "masked_name", "code_id",
                         "rule_version"}, body
    assert body["color"] == "green" and body["reasons"] == [], body
    assert RFC3339.match(body["as_of"]) and RFC3339.match(body["expires_at"]), body
    exp = datetime.datetime.strptime(body["expires_at"][:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    assert before + TOKEN_TTL - 5 <= exp <= time.time() + TOKEN_TTL + 1, (before, body)
    assert body["masked_name"] == who["name"][0] + "*" * (len(who["name"]) - 1), body
    assert UUID.match(body["code_id"]), body
    assert isinstance(body["rule_version"], int) and body["rule_version"] >= 1, body
    no_personal_data(json.dumps(body, ensure_ascii=False), who)


def test_the_code_id_stays_the_same_when_the_first_code_is_stored(cluster):
    """Before any input the code id is derived (nothing is written on the display path); the first stored code takes
    the same id, so the token's pseudonymous sub does not change. A resident with a code stored keeps its id."""
    who = citizen(cluster)
    assert count_codes(cluster, who) == 0
    before = code_of(cluster, who)
    r = post(cluster, who, "/v1/health/declarations", {"symptoms": ["cough"]})
    assert r.status == 201 and r.json()["color"] == "yellow", r
    assert count_codes(cluster, who) == 1
    assert r.json()["code_id"] == before["code_id"], (before["code_id"], r.json()["code_id"])
    after = wait_for(lambda: (lambda b: b if b["color"] == "yellow" else None)(code_of(cluster, who)),
                     timeout=5, what="the yellow code")
    assert after["code_id"] == before["code_id"]
    assert jws_parts(after["token"])[1]["sub"] == jws_parts(before["token"])[1]["sub"] == before["code_id"]
    r = post(cluster, who, "/v1/health/declarations", {"symptoms": []})
    assert r.status == 201 and r.json()["code_id"] == before["code_id"], r


def count_codes(cluster, who):
    return int(cluster.pg.psql(f"SELECT count(*) FROM health_codes WHERE resident_id = {who['resident_id']}"))


def test_token_verifies_against_the_jwks_with_an_independent_implementation(cluster):
    who = citizen(cluster)
    body = code_of(cluster, who)
    keys = jwks(cluster)
    header, claims = jwks_verify(body["token"], keys)
    assert set(claims) == {"iss", "sub", "col", "nm", "iat", "exp"}, claims
    assert claims["iss"] == "cityhall" and claims["col"] == "green", claims
    assert claims["sub"] == body["code_id"] and claims["nm"] == body["masked_name"], (claims, body)
    assert claims["exp"] - claims["iat"] == TOKEN_TTL, claims
    assert abs(claims["iat"] - time.time()) < 30, claims
    for n in IDS:
        assert n not in body["token"] and n not in json.dumps(claims), "an ID number in a token"
    assert claims["sub"] != who["id"] and who["name"] not in json.dumps(claims, ensure_ascii=False)
    # an edited token fails the same independent check
    h, p, s = body["token"].split(".")
    forged = b64e(json.dumps(dict(claims, col="red"), separators=(",", ":")).encode())
    try:
        jwks_verify(f"{h}.{forged}.{s}", keys)
    except Exception as e:
        assert type(e).__name__ == "InvalidSignature", e
    else:
        raise AssertionError("an edited token verified")


def test_the_code_in_protobuf_carries_the_same_token(cluster):
    who = citizen(cluster)
    body = code_of(cluster, who)
    r = get(cluster, who, "/v1/health/code", headers={"Accept": PB})
    assert r.status == 200 and r.headers["content-type"] == PB, r
    assert r.headers["cache-control"] == "no-store", r.headers  # personal data: never in a shared cache
    fields = harness.pb_decode(r.body)
    assert fields[1] == [b"green"], fields
    assert fields[4] == [body["token"].encode()], fields
    assert fields[7] == [body["code_id"].encode()], fields


def test_the_png_decodes_with_zbarimg_to_exactly_the_token(cluster):
    if shutil.which("zbarimg") is None:
        raise harness.Skip("zbarimg is not installed (apt-get install zbar-tools)")
    who = citizen(cluster)
    token = code_of(cluster, who)["token"]
    r = get(cluster, who, "/v1/health/code.png")
    assert r.status == 200 and r.headers["content-type"] == "image/png", r
    assert r.body[:8] == b"\x89PNG\r\n\x1a\n", r.body[:16]
    path = os.path.join(cluster.tmpdir, f"code-{uuid.uuid4().hex}.png")
    with open(path, "wb") as f:
        f.write(r.body)
    out = subprocess.run(["zbarimg", "--quiet", "--raw", "-Sbinary", path], capture_output=True, timeout=30)
    os.unlink(path)
    assert out.returncode == 0, out
    assert out.stdout.rstrip(b"\n") == token.encode(), (out.stdout, token)
    # the image is cached with the token: the same bytes again
    assert get(cluster, who, "/v1/health/code.png").body == r.body


def test_the_svg_is_one_path_of_modules(cluster):
    who = citizen(cluster)
    code_of(cluster, who)
    r = get(cluster, who, "/v1/health/code.svg")
    assert r.status == 200 and r.headers["content-type"] == "image/svg+xml", r
    text = r.body.decode()
    assert text.startswith("<?xml") and "<svg xmlns=\"http://www.w3.org/2000/svg\"" in text, text[:200]
    assert text.count("<path") == 1 and re.search(r'<path fill="#000" d="(M\d+ \d+h\d+v1h-\d+z)+"/>', text), text[:300]
    assert text.rstrip().endswith("</svg>"), text[-50:]
    import xml.etree.ElementTree as ET
    root = ET.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag


def test_the_same_token_is_served_again_until_an_invalidation_brings_a_new_one(cluster):
    who = citizen(cluster)
    tokens = {code_of(cluster, who)["token"] for _ in range(12)}  # new connections: both threads
    assert len(tokens) == 1, tokens
    reasons = [{"code": "POSITIVE_TEST", "data_source": "lab:test-lab", "as_of": "2026-11-28T08:00:00Z",
                "rule_version": 1, "detail": "a positive test"}]
    set_code(cluster, who, "red", reasons, 7)

    def changed():
        bodies = [code_of(cluster, who) for _ in range(6)]
        return bodies if all(b["color"] == "red" for b in bodies) else None

    bodies = wait_for(changed, timeout=5, what="the red code on every thread")
    body = bodies[-1]
    # every thread converged on one new token (the first fill's, through Redis SET NX)
    assert len({b["token"] for b in bodies + [code_of(cluster, who) for _ in range(6)]}) == 1, bodies
    assert body["token"] not in tokens, body
    assert body["reasons"] == [{"code": "POSITIVE_TEST", "data_source": "lab:test-lab",
                                "as_of": "2026-11-28T08:00:00Z", "rule_version": 1,
                                "detail": "a positive test"}], body
    assert jws_parts(body["token"])[1]["col"] == "red"
    # Redis holds a copy with no personal data (the masked name only)
    value = cluster.redis.cli("GET", f"hc:code:{who['resident_id']}")
    assert body["token"] in value, value
    no_personal_data(value, who)
    ttl = int(cluster.redis.cli("TTL", f"hc:code:{who['resident_id']}"))
    assert 0 < ttl <= TOKEN_TTL - 60, ttl


def test_a_cache_hit_waits_for_neither_postgresql_nor_redis(cluster):
    who = citizen(cluster)
    token = code_of(cluster, who)["token"]
    for _ in range(16):  # new connections land on both threads: both hold it
        assert code_of(cluster, who)["token"] == token
    cluster.pg.pause()
    cluster.redis.pause()
    try:
        for _ in range(8):
            t0 = time.monotonic()
            r = get(cluster, who, "/v1/health/code", timeout=5)
            assert r.status == 200 and r.json()["token"] == token, r
            assert time.monotonic() - t0 < 1.0, "a cache hit waited for a paused server"
    finally:
        cluster.redis.resume()
        cluster.pg.resume()


def test_a_citizen_without_real_name_gets_422(cluster):
    who = login(cluster)
    for path in ("/v1/health/code", "/v1/health/code.png", "/v1/health/code.svg"):
        assert_error(get(cluster, who, path), 422, "FAILED_PRECONDITION", "bind your real name first")


def test_other_roles_cannot_read_a_citizens_code(cluster):
    s = staff(cluster)
    assert_error(get(cluster, s, "/v1/health/code"), 403, "PERMISSION_DENIED")
    assert_error(cluster.gateway.request("/v1/health/code"), 401, "UNAUTHENTICATED")


def test_a_staff_member_acting_for_the_citizen_is_written_to_the_access_log(cluster):
    who = citizen(cluster)
    s = staff(cluster)
    r = post(cluster, s, "/v1/staff/delegations", {"id_number": who["id"], "name": who["name"],
                                                   "purpose": "print the health code at the counter"})
    assert r.status == 200, r
    acting = r.json()["access_token"]
    own = code_of(cluster, who)
    body = code_of(cluster, acting)
    assert body["code_id"] == own["code_id"] and body["color"] == own["color"], (body, own)
    log = get(cluster, who, "/v1/me/access-log").json()
    reads = [e for e in log.get("entries", []) if e.get("action") == "healthcode.read"]
    assert len(reads) == 1, log
    # the citizen's own reads are not logged
    code_of(cluster, who)
    log = get(cluster, who, "/v1/me/access-log").json()
    assert len([e for e in log.get("entries", []) if e.get("action") == "healthcode.read"]) == 1, log


# --------------------------------------------------------------------------- dependents and other citizens

def test_a_citizen_cannot_read_another_citizens_code_only_a_dependents(cluster):
    a, b = citizen(cluster, datetime.date(1990, 5, 1)), citizen(cluster)
    parent = residents(cluster, person(datetime.date(1955, 3, 1)))[0]
    harness.same_household(cluster.gateway, a["citizen_id"], parent["id"])
    r = post(cluster, a, "/v1/me/dependents", {"id_number": parent["id"], "name": parent["name"], "relation": "parent"})
    assert r.status == 201, r
    r = get(cluster, a, f"/v1/me/dependents/{parent['resident_id']}/health-code")
    assert r.status == 200, r
    body = r.json()
    assert body["masked_name"] == parent["name"][0] + "**" and body["color"] == "green", body
    jwks_verify(body["token"], jwks(cluster))
    # B's resident id through A's dependent route: exactly what an unknown id gets
    other = get(cluster, a, f"/v1/me/dependents/{b['resident_id']}/health-code", headers={"x-request-id": "probe-1"})
    unknown = get(cluster, a, "/v1/me/dependents/999999999/health-code", headers={"x-request-id": "probe-1"})
    garbage = get(cluster, a, "/v1/me/dependents/abc/health-code", headers={"x-request-id": "probe-1"})
    assert_error(other, 404, "NOT_FOUND")
    assert other.body == unknown.body == garbage.body, (other.body, unknown.body, garbage.body)
    assert {k: v for k, v in other.headers.items() if k not in ("date",)} == \
        {k: v for k, v in unknown.headers.items() if k not in ("date",)}
    # B's own code is still B's
    assert code_of(cluster, b)["masked_name"] == b["name"][0] + "**"


# --------------------------------------------------------------------------- verification

def test_verify_says_valid_for_a_fresh_token_and_invalid_for_an_edited_one(cluster):
    who = citizen(cluster)
    body = code_of(cluster, who)
    v = verify(cluster, body["token"])
    assert v["valid"] is True and v["color"] == "green" and v["masked_name"] == body["masked_name"], v
    assert v["expires_at"] == body["expires_at"] and v["reason"] == "", v
    h, p, s = body["token"].split(".")
    payload = bytearray(p.encode())
    i = len(payload) // 2
    payload[i] = ord("A") if payload[i] != ord("A") else ord("B")
    v = verify(cluster, f"{h}.{payload.decode()}.{s}")
    assert v == {"valid": False, "color": "", "masked_name": "", "reason": "bad_signature"}, v
    forged = b64e(json.dumps(dict(jws_parts(body["token"])[1], col="red"), separators=(",", ":")).encode())
    assert verify(cluster, f"{h}.{forged}.{s}")["reason"] == "bad_signature"
    assert verify(cluster, "not-a-token")["reason"] == "malformed"
    assert verify(cluster, "a.b.c")["reason"] == "malformed"
    none = b64e(b'{"alg":"none","typ":"hc+jwt"}') + "." + p + "."
    assert verify(cluster, none)["valid"] is False


def test_verify_says_expired_for_a_token_past_its_exp(cluster):
    now = int(time.time())
    token = sign_with_ring(cluster, {"iss": "cityhall", "sub": str(uuid.uuid4()), "col": "green", "nm": "张*",
                                     "iat": now - 3600, "exp": now - 3000})
    v = verify(cluster, token)
    assert v == {"valid": False, "color": "", "masked_name": "", "reason": "expired"}, v
    # the same key, a valid exp: valid (so the refusal above was about time, not the signature)
    token = sign_with_ring(cluster, {"iss": "cityhall", "sub": str(uuid.uuid4()), "col": "yellow", "nm": "张*",
                                     "iat": now, "exp": now + 200})
    v = verify(cluster, token)
    assert v["valid"] is True and v["color"] == "yellow" and v["masked_name"] == "张*", v
    # another issuer is not ours
    token = sign_with_ring(cluster, {"iss": "elsewhere", "sub": "x", "col": "green", "nm": "张*", "iat": now,
                                     "exp": now + 200})
    assert verify(cluster, token)["valid"] is False


def test_verify_needs_a_token(cluster):
    r = cluster.gateway.request("/v1/health/verify", method="POST", json={})
    assert_error(r, 400, "INVALID_ARGUMENT", "token")


def test_keys_are_a_public_jwks_of_p256_keys(cluster):
    r = cluster.gateway.request("/v1/health/keys")
    assert r.status == 200 and r.headers["content-type"] == "application/json", r
    assert r.headers["cache-control"] == "public, max-age=300", r.headers  # offline verifiers may keep it
    keys = r.json()
    assert keys["keys"], keys
    for k in keys["keys"]:
        assert set(k) == {"kty", "crv", "x", "y", "kid", "use", "alg"}, k
        assert (k["kty"], k["crv"], k["use"], k["alg"]) == ("EC", "P-256", "sig", "ES256"), k
        assert len(b64d(k["x"])) == 32 and len(b64d(k["y"])) == 32, k


# --------------------------------------------------------------------------- paper codes

def test_paper_code_issue_verify_revoke(cluster):
    who = citizen(cluster)
    s = staff(cluster)
    r = post(cluster, s, "/v1/staff/health/paper-codes", {"id_number": who["id"], "name": who["name"]})
    assert r.status == 201, r
    paper = r.json()
    assert set(paper) == {"paper_id", "token", "expires_at", "color", "masked_name"}, paper
    assert UUID.match(paper["paper_id"]) and paper["color"] == "green", paper
    assert paper["masked_name"] == who["name"][0] + "**", paper
    header, claims = jwks_verify(paper["token"], jwks(cluster))
    assert claims["paper"] == paper["paper_id"] and claims["col"] == "green", claims
    assert PAPER_TTL - 60 <= claims["exp"] - time.time() <= PAPER_TTL + 5, claims
    no_personal_data(paper["token"] + r.text, who)

    v = verify(cluster, paper["token"])
    assert v["valid"] is True and v["color"] == "green" and v["masked_name"] == paper["masked_name"], v

    # the citizen sees who printed it
    log = get(cluster, who, "/v1/me/access-log").json()
    entries = [e for e in log.get("entries", []) if e.get("action") == "healthcode.paper_issue"]
    assert len(entries) == 1 and entries[0]["actor"] == s["staff_id"], log

    r = post(cluster, s, f"/v1/staff/health/paper-codes/{paper['paper_id']}/revocation", None)
    assert r.status == 204 and r.body == b"", r
    v = verify(cluster, paper["token"])
    assert v == {"valid": False, "color": "", "masked_name": "", "reason": "revoked"}, v
    r = post(cluster, s, f"/v1/staff/health/paper-codes/{paper['paper_id']}/revocation", None)
    assert r.status == 204, r  # again: the same outcome
    assert cluster.pg.psql(f"SELECT revoked_by FROM hc_paper_codes WHERE paper_id = '{paper['paper_id']}'") == \
        s["staff_id"]
    assert_error(post(cluster, s, f"/v1/staff/health/paper-codes/{uuid.uuid4()}/revocation", None), 404, "NOT_FOUND")
    assert_error(post(cluster, s, "/v1/staff/health/paper-codes/nope/revocation", None), 404, "NOT_FOUND")


def test_a_paper_code_shows_when_the_color_changed(cluster):
    who = citizen(cluster)
    s = staff(cluster)
    paper = post(cluster, s, "/v1/staff/health/paper-codes", {"id_number": who["id"], "name": who["name"]}).json()
    assert verify(cluster, paper["token"])["valid"] is True
    set_code(cluster, who, "red", [], 3)
    v = wait_for(lambda: (lambda v: v if v["valid"] is False else None)(verify(cluster, paper["token"])),
                 timeout=5, what="the paper code to be out of date")
    assert v["reason"] == "color_changed" and v["color"] == "red", v


def test_paper_codes_need_a_registry_match_and_staff(cluster):
    who = citizen(cluster)
    s = staff(cluster)
    assert_error(post(cluster, s, "/v1/staff/health/paper-codes", {"id_number": who["id"], "name": "某人"}), 422,
                 "FAILED_PRECONDITION", "do not match")
    bad = who["id"][:17] + ("0" if who["id"][17] != "0" else "1")
    assert_error(post(cluster, s, "/v1/staff/health/paper-codes", {"id_number": bad, "name": who["name"]}), 422,
                 "FAILED_PRECONDITION", "id_number")
    assert_error(post(cluster, s, "/v1/staff/health/paper-codes", {"name": who["name"]}), 400, "INVALID_ARGUMENT",
                 "id_number")
    assert_error(post(cluster, s, "/v1/staff/health/paper-codes", {"id_number": who["id"]}), 400, "INVALID_ARGUMENT",
                 "name")
    assert_error(post(cluster, who, "/v1/staff/health/paper-codes", {"id_number": who["id"], "name": who["name"]}),
                 403, "PERMISSION_DENIED")
    # a resident without any account still gets one (no access log to write)
    p = residents(cluster, person())[0]
    r = post(cluster, s, "/v1/staff/health/paper-codes", {"id_number": p["id"], "name": p["name"]},
             headers={"Idempotency-Key": "paper-" + uuid.uuid4().hex})
    assert r.status == 201 and r.json()["masked_name"] == p["name"][0] + "**", r
    assert verify(cluster, r.json()["token"])["valid"] is True


# --------------------------------------------------------------------------- keys

def test_a_rotated_key_signs_new_tokens_and_the_old_one_still_verifies(cluster):
    who = citizen(cluster)
    old = code_of(cluster, who)["token"]
    old_kid = jws_parts(old)[0]["kid"]
    r = cluster.gateway.run("keys", "rotate", "--ring", "healthcode")
    assert r.returncode == 0, r.stdout + r.stderr
    keys = wait_for(lambda: (lambda k: k if len(k["keys"]) >= 2 else None)(jwks(cluster)), timeout=6,
                    what="the new key in the JWKS")
    new_kid = keys["keys"][0]["kid"]
    assert new_kid != old_kid and old_kid in {k["kid"] for k in keys["keys"]}, keys
    assert verify(cluster, old)["valid"] is True
    set_code(cluster, who, "yellow", [], 2)
    body = wait_for(lambda: (lambda b: b if b["color"] == "yellow" else None)(code_of(cluster, who)), timeout=5,
                    what="the yellow code")
    assert jws_parts(body["token"])[0]["kid"] == new_kid
    jwks_verify(body["token"], jwks(cluster))


# --------------------------------------------------------------------------- degraded mode

def test_redis_then_postgresql_down_held_codes_keep_showing_others_get_503(cluster):
    held = citizen(cluster)
    fresh = citizen(cluster)   # bound, but its code never asked for before Redis dies
    never = citizen(cluster)   # never asked for before both die
    token = code_of(cluster, held)["token"]
    for _ in range(16):        # new connections land on both threads: both hold it
        assert code_of(cluster, held)["token"] == token
    cluster.redis.kill()
    try:
        for _ in range(6):
            assert code_of(cluster, held)["token"] == token
        body = code_of(cluster, fresh)  # from PostgreSQL
        jwks_verify(body["token"], jwks(cluster))
        assert body["masked_name"] == fresh["name"][0] + "**", body
        cluster.pg.stop("fast")
        try:
            r = get(cluster, never, "/v1/health/code")
            assert_error(r, 503, "UNAVAILABLE")
            for _ in range(6):
                assert code_of(cluster, held)["token"] == token
            assert verify(cluster, token)["valid"] is True  # verification needs neither
        finally:
            cluster.pg.start()
    finally:
        cluster.redis.start()
    # everything back within seconds
    wait_for(lambda: get(cluster, never, "/v1/health/code").status == 200, timeout=15,
             what="the code of a citizen never seen, once PostgreSQL is back")
    assert code_of(cluster, held)["token"]  # held throughout, even while Redis resubscribed before PostgreSQL


def test_held_codes_survive_redis_returning_while_postgresql_is_still_down(cluster):
    """Redis back means invalidations may have been missed: held codes are fetched again, but while PostgreSQL
    cannot be reached they stay what the gateway holds (as during the outage) rather than becoming 503s."""
    # the previous test restarted both: every thread reconnected (new connections land on both threads)
    wait_for(lambda: all(cluster.gateway.request("/readyz").status == 200 for _ in range(8)), timeout=15,
             what="every gateway thread connected to PostgreSQL and Redis again")
    held = citizen(cluster)
    token = code_of(cluster, held)["token"]
    for _ in range(16):  # new connections land on both threads: both hold it
        assert code_of(cluster, held)["token"] == token
    log_from = len(cluster.gateway.log_text())
    cluster.redis.cli("DEL", f"hc:code:{held['resident_id']}")  # the Redis that returns has no copy (no PUBLISH)
    cluster.pg.stop("fast")
    try:
        cluster.redis.kill()
        cluster.redis.start()
        wait_for(lambda: "hc_subscribed" in cluster.gateway.log_text()[log_from:], timeout=10,
                 what="the gateway subscribed to Redis again")
        for _ in range(8):
            assert code_of(cluster, held)["token"] == token
    finally:
        cluster.pg.start()
    wait_for(lambda: get(cluster, held, "/v1/health/code").status == 200, timeout=15,
             what="the code once PostgreSQL is back")


def test_no_raw_personal_data_in_the_log(cluster):
    text = cluster.gateway.log_text()
    for n in IDS:
        assert n not in text, "an ID number in the gateway log"
    for n in NAMES:
        assert n not in text, "a name in the gateway log"
