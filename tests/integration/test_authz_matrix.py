"""The authorization matrix: every route that `cityhall routes` lists is called by every kind of caller (no token,
citizen A, citizen B, staff of another department, staff, a kiosk, the health authority's client, another
department's client, an admin) against resources owned by A (or by a department), and each answer is checked against the route's declared roles and ownership policy: 401
without a token on a non-public route, 403 for a role outside the route's mask, 404 for B (or another department)
on A's resource, byte for byte the 404 of an unknown id apart from the request id (403 for a write that only
another department makes), and for a permitted caller an
answer that proves the handler ran (2xx, or a domain 4xx such as 400/409/422; never 401/403/404 or 5xx). Lists
scoped to a citizen or a department must not show A's resources to anyone else. A route without a fixture here,
or with policy "undeclared", fails the test. Run by tests/run.py.

The callers are real: citizens log in by SMS code, staff with `cityhall staff add` + TOTP, the department client
with `cityhall client add` + POST /v1/auth/client-token, the admin is a staff account with role admin. The kiosk
role is not issued by any route yet (a kiosk's attestation opens a *citizen* session, services/identity/kiosk.c),
so its token is minted here with the gateway's access signing key, exactly as cityhall would sign one."""

import base64
import datetime
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

CLUSTER = {"threads": 2}
TIMEOUT = 240

CALLERS = ["none", "citizen_a", "citizen_b", "staff_other", "staff", "kiosk", "dept", "dept_other", "admin"]
ROLE = {"citizen_a": "citizen", "citizen_b": "citizen", "staff_other": "staff", "staff": "staff", "kiosk": "kiosk",
        "dept": "dept", "dept_other": "dept", "admin": "admin"}
REGION = "110105"
STAFF_DEPT = "market-regulation"  # works the business-registration item in cityhall's staff queue
OTHER_DEPT = "tax"
_rng = random.SystemRandom()


# --------------------------------------------------------------------------- helpers

def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, utils
    except ImportError:
        raise harness.Skip("python3-cryptography is not installed (ops/dev installs it)")
    return hashes, serialization, ec, utils


def es256(key, data):
    hashes, _, ec, utils = crypto()
    r, s = utils.decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def new_person(age, sex="F"):
    """A valid GB 11643 number in REGION with a birth date `age` years ago, and a name."""
    born = datetime.date.today() - datetime.timedelta(days=int(age * 365.25) + _rng.randrange(10, 200))
    return {"id": harness.new_id_number(REGION, born, sex), "name": _rng.choice("赵钱孙李周吴郑王") + _rng.choice("伟芳娜敏静丽强磊"),
            "sex": sex, "born": born}


class World:
    """Everything the matrix needs, made once: the callers and A's resources (built lazily, in call order)."""

    def __init__(self, cluster):
        self.c = cluster
        self.gw = cluster.gateway
        self._memo = {}

    def memo(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def psql(self, sql):
        return self.c.pg.psql(sql)

    def call(self, caller, method, path, body=None, headers=None, raw=None):
        h = dict(headers or {})
        token = self.tokens.get(caller)
        if token:
            h["Authorization"] = f"Bearer {token}"
        if raw is not None:
            h.setdefault("Content-Type", "application/json")
            return self.gw.request(path, method=method, data=raw, headers=h)
        return self.gw.request(path, method=method, json=body, headers=h)

    # ---- people and callers

    def setup(self):
        self.a, self.b, self.child, self.child2, self.other = (
            new_person(40, "M"), new_person(35), new_person(6), new_person(5), new_person(50))
        family = (self.a, self.child, self.child2)  # one household: A's children may be A's dependents
        household = f"AUTHZ-{uuid.uuid4().hex[:12]}"
        harness.import_registry(self.gw, [
            (p["id"], p["name"], p["sex"], p["born"], REGION, "北京市朝阳区测试路1号",
             household if any(p is q for q in family) else "", "")
            for p in (self.a, self.b, self.child, self.child2, self.other)])
        self.a.update(self.citizen(self.a))
        self.b.update(self.citizen(self.b))
        self.staff_other = harness.staff_token(self.gw, dept=OTHER_DEPT)
        self.staff = harness.staff_token(self.gw, dept=STAFF_DEPT)
        self.helper_staff = harness.staff_token(self.gw, dept="health")  # not a caller: proposes in fixtures
        self.dept = harness.client_token(self.gw, dept="health")
        self.dept_other = harness.client_token(self.gw, dept="hrss")
        self.kiosk_device, self.kiosk_key = self.kiosk_add()
        self.tokens = {"none": None, "citizen_a": self.a["token"], "citizen_b": self.b["token"],
                       "staff_other": self.staff_other["token"], "staff": self.staff["token"],
                       "kiosk": self.mint_kiosk_token(), "dept": self.dept["token"],
                       "dept_other": self.dept_other["token"], "admin": harness.admin_token(self.gw)}

    def citizen(self, p):
        login = harness.sms_login(self.gw)
        harness.bind_real_name(self.gw, login["token"], p["id"], p["name"])
        return {"token": login["access_token"], "phone": login["phone"], "citizen_id": login["citizen_id"],
                "session_id": login["session_id"]}

    def kiosk_add(self):
        _, serialization, ec, _ = crypto()
        device = "authz-" + uuid.uuid4().hex[:8]
        key = ec.generate_private_key(ec.SECP256R1())
        path = os.path.join(self.c.tmpdir, f"{device}.pem")
        with open(path, "wb") as f:
            f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        r = self.gw.run("kiosk", "add", "--device-id", device, "--hall", "tianhe-hall", "--public-key", path)
        assert r.returncode == 0, r.stdout + r.stderr
        return device, key

    def mint_kiosk_token(self):
        """A role-kiosk access token for the registered device, signed with the current access key."""
        _, serialization, _, _ = crypto()
        ring = os.path.join(self.gw.env["CITYHALL_VAR"], "keys", "access")
        kid = max(n[:-4] for n in os.listdir(ring) if n.endswith(".pem"))
        with open(os.path.join(ring, kid + ".pem"), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        now = int(time.time())
        claims = {"iss": "cityhall", "aud": "cityhall-api", "iat": now, "exp": now + 900, "sub": self.kiosk_device,
                  "sid": str(uuid.uuid4()), "role": "kiosk", "jti": b64url(os.urandom(16)), "hall": "tianhe-hall"}
        head = {"alg": "ES256", "typ": "at+jwt", "kid": kid}
        si = b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(claims).encode())
        return si + "." + b64url(es256(key, si.encode()))

    # ---- A's resources

    def a_call(self, method, path, body=None):
        r = self.call("citizen_a", method, path, body)
        assert r.status < 300, (method, path, r)
        return r.json() if r.body else None

    def second_session(self):
        return self.memo("session", lambda: harness.sms_login(self.gw, self.a["phone"])["session_id"])

    def child_id(self):
        def make():
            return self.a_call("POST", "/v1/me/dependents",
                               {"id_number": self.child["id"], "name": self.child["name"], "relation": "child"}
                               )["dependent_id"]
        return self.memo("child", make)

    def appeal(self, dependent=""):
        """An open appeal of A's code (or of A's child's), made yellow by a declared fever first."""
        def make():
            self.a_call("POST", "/v1/health/declarations",
                        {"symptoms": ["fever"], "temperature_c": 38.6, "dependent_id": dependent})
            return self.a_call("POST", "/v1/health/appeals", {"reason": "the fever was measured wrongly",
                                                              "dependent_id": dependent})["appeal_id"]
        return self.memo(("appeal", dependent), make)

    def proposed_appeal(self):
        """An appeal of A's child's code, proposed by a staff member who is not one of the callers."""
        def make():
            appeal_id = self.appeal(self.child_id())
            r = self.gw.request(f"/v1/staff/health/appeals/{appeal_id}/proposal", method="POST",
                                json={"decision": "approve", "color": "green", "note": "checked"},
                                headers={"Authorization": f"Bearer {self.helper_staff['token']}"})
            assert r.status == 200, r
            return appeal_id
        return self.memo("proposed", make)

    def venue(self):
        def make():
            r = self.gw.request("/v1/venues", method="POST", json={"name": "测试商场", "region": REGION,
                                                                   "address": "北京市朝阳区1号"},
                                headers={"Authorization": f"Bearer {self.helper_staff['token']}"})
            assert r.status == 201, r
            return r.json()["venue_id"]
        return self.memo("venue", make)

    def paper_code(self):
        def make():
            r = self.gw.request("/v1/staff/health/paper-codes", method="POST",
                                json={"id_number": self.other["id"], "name": self.other["name"]},
                                headers={"Authorization": f"Bearer {self.helper_staff['token']}"})
            assert r.status == 201, r
            return r.json()["paper_id"]
        return self.memo("paper", make)

    def business_fields(self):
        today = harness.china_today()
        return [{"name": "company.name", "value": f"北京授权{uuid.uuid4().hex[:6]}科技有限公司"},
                {"name": "company.type", "value": "limited_company"},
                {"name": "company.address", "value": "北京市朝阳区1号"},
                {"name": "company.registered_capital", "value": "100"},
                {"name": "company.business_scope", "value": "软件开发"},
                {"name": "legal_rep.name", "value": self.a["name"]},
                {"name": "legal_rep.id_number", "value": self.a["id"]},
                {"name": "applicant.phone", "value": self.a["phone"]}, {"name": "seal.count", "value": "1"},
                {"name": "tax.invoice", "value": "false"}, {"name": "si.employees", "value": "1"},
                {"name": "bank.name", "value": "招商银行"},
                {"name": "bank.appointment_date", "value": str(today + datetime.timedelta(days=3))}]

    def application(self, which):
        """A's business-opening applications: "task" (its registration item waits in the staff queue of
        STAFF_DEPT, whose callbacks are then signed with a secret) and "own" (for the citizen's routes)."""
        def make():
            app = self.a_call("POST", "/v1/onething/applications",
                              {"bundle_code": "business_opening", "fields": self.business_fields(), "consent": True})
            assert app["state"] == "accepted", app
            item = next(i for i in app["items"] if i["department"] == STAFF_DEPT)
            return {"id": app["application_id"], "item": item["item_id"]}
        return self.memo(("app", which), make)

    def task(self):
        """The staff-queue item of STAFF_DEPT, in review."""
        def make():
            app = self.application("task")
            wait_for(lambda: self.psql(f"SELECT state FROM application_items WHERE item_id = '{app['item']}'")
                     == "in_review", timeout=10, what="the item in the staff queue")
            return app["item"]
        return self.memo("task", make)

    def callback_secret(self):
        """STAFF_DEPT's callback secret, configured once its staff-queue item is in review (items already there
        stay there; later ones would go to the unreachable endpoint and be retried, which the matrix ignores)."""
        def make():
            self.task()
            secret = os.urandom(24).hex()
            r = self.gw.run("dept", "endpoint", "--dept", STAFF_DEPT, "--url", "http://127.0.0.1:1/authz",
                            "--secret", secret)
            assert r.returncode == 0, r.stdout + r.stderr
            return secret
        return self.memo("secret", make)

    def signed_callback(self):
        raw = json.dumps({"item_id": self.task(), "decision": "in_review", "callback_id": uuid.uuid4().hex}).encode()
        t = int(time.time())
        sig = hmac.new(self.callback_secret().encode(), str(t).encode() + b"." + raw, hashlib.sha256).hexdigest()
        return raw, {"x-cityhall-signature": f"t={t},v1={sig}"}

    def kiosk_attestation(self):
        claims = {"device_id": self.kiosk_device, "id_number": self.a["id"], "name": self.a["name"],
                  "face_score": 0.95, "nonce": os.urandom(16).hex(), "ts": int(time.time())}
        payload = b64url(json.dumps(claims).encode())
        return {"device_id": self.kiosk_device, "payload": payload,
                "signature": b64url(es256(self.kiosk_key, payload.encode()))}

    def sms_body(self):
        phone = "199" + "".join(_rng.choice("0123456789") for _ in range(8))
        harness.sms_lift_limits(self.gw, phone)
        return {"phone": phone}

    def login_body(self):
        body = self.sms_body()
        r = self.gw.request("/v1/auth/sms-code", method="POST", json=body)
        assert r.status == 202, r
        return dict(body, code=harness.wait_sms_code(self.gw, body["phone"]))

    def staff_login_body(self):
        acct = harness.staff_add(self.gw, dept=OTHER_DEPT)
        return {"username": acct["username"], "password": acct["password"], "totp": harness.totp(acct["secret"])}


def rfc3339(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_uuid(w):
    return str(uuid.uuid4())


# --------------------------------------------------------------------------- the fixture table
#
# One entry per route of `cityhall routes`, keyed by (method, path). Each value says how to call it:
#   params(w)        path parameters naming A's resource (or a public one); missing(w): the same for an unknown one
#                    (needed by citizen- and department-owned routes with a parameter)
#   body(w)          a valid JSON body, made again for every call (tokens, codes and nonces are single-use)
#   signed(w)        (raw body, headers) for routes that authenticate by signature instead of a token
#   hidden(w)        strings of A's (or STAFF_DEPT's) that another citizen's (department's) answer must not contain
#   dept(w)          the department that owns the resource (department-owned routes)

def F(**kw):
    return kw


FIXTURES = {
    ("GET", "/healthz"): F(),
    ("GET", "/readyz"): F(),
    ("GET", "/metrics"): F(),
    ("GET", "/v1/system/info"): F(),
    ("GET", "/v1/system/ping"): F(),
    ("POST", "/v1/system/echo"): F(body=lambda w: {"text": "authz"}),
    ("POST", "/v1/system/probes"): F(body=lambda w: {"note": "authz matrix"}),

    ("POST", "/v1/auth/sms-code"): F(body=lambda w: w.sms_body()),
    ("POST", "/v1/auth/login"): F(body=lambda w: w.login_body()),
    ("POST", "/v1/auth/refresh"): F(body=lambda w: {"refresh_token": harness.sms_login(w.gw)["refresh_token"]}),
    ("POST", "/v1/auth/logout"): F(),  # called last: it ends every caller's session
    ("GET", "/v1/me/sessions"): F(hidden=lambda w: [w.second_session()]),
    ("DELETE", "/v1/me/sessions/{id}"): F(params=lambda w: {"id": w.second_session()},
                                          missing=lambda w: {"id": random_uuid(w)}),
    ("GET", "/v1/me"): F(hidden=lambda w: [w.a["citizen_id"]]),
    ("POST", "/v1/me/real-name"): F(body=lambda w: {"id_number": w.child2["id"], "name": w.child2["name"]}),
    ("POST", "/v1/me/dependents"): F(body=lambda w: {"id_number": w.child2["id"], "name": w.child2["name"],
                                                     "relation": "child"}),
    ("GET", "/v1/me/dependents"): F(hidden=lambda w: [w.child_id()]),
    ("GET", "/v1/me/access-log"): F(hidden=lambda w: [w.a["citizen_id"]]),
    ("POST", "/v1/staff/login"): F(body=lambda w: w.staff_login_body()),
    ("POST", "/v1/staff/delegations"): F(body=lambda w: {"id_number": w.a["id"], "name": w.a["name"],
                                                         "purpose": "authz matrix"}),
    ("POST", "/v1/auth/client-token"): F(body=lambda w: {"client_id": w.dept["client_id"],
                                                         "client_secret": w.dept["secret"]}),
    ("POST", "/v1/kiosk/sessions"): F(body=lambda w: w.kiosk_attestation()),

    ("GET", "/v1/health/code"): F(),
    ("GET", "/v1/health/code.png"): F(),
    ("GET", "/v1/health/code.svg"): F(),
    ("GET", "/v1/me/dependents/{id}/health-code"): F(params=lambda w: {"id": w.child_id()},
                                                     missing=lambda w: {"id": str(_rng.randrange(10**9, 2 * 10**9))}),
    ("GET", "/v1/health/keys"): F(),
    ("POST", "/v1/health/verify"): F(body=lambda w: {"token": "a.b.c"}),
    ("POST", "/v1/health/declarations"): F(body=lambda w: {"temperature_c": 36.6}),
    ("POST", "/v1/health/test-results"): F(dept=lambda w: "health", body=lambda w: {"results": [
        {"id_number": w.other["id"], "sample_time": rfc3339(time.time() - 3600), "result": "negative",
         "lab": "authz-lab"}]}),
    ("POST", "/v1/health/risk-areas"): F(dept=lambda w: "health", body=lambda w: {"areas": [
        {"region": "110199", "level": "low", "valid_from": rfc3339(time.time() - 60),
         "valid_until": rfc3339(time.time() + 3600)}]}),
    ("POST", "/v1/health/quarantine-orders"): F(dept=lambda w: "health", body=lambda w: {"id_number": w.other["id"], "kind": "order",
                                                                "at": rfc3339(time.time() - 60), "place": "家中"}),
    ("POST", "/v1/health/confirmed-cases"): F(dept=lambda w: "health", body=lambda w: {"id_number": w.other["id"],
                                                              "confirmed_at": rfc3339(time.time() - 60)}),
    ("GET", "/v1/health/notices"): F(),
    ("POST", "/v1/venues"): F(body=lambda w: {"name": "授权测试场所", "region": REGION, "address": "北京市朝阳区2号"}),
    ("POST", "/v1/venues/{id}/checkins"): F(params=lambda w: {"id": w.venue()}, body=lambda w: {}),
    ("POST", "/v1/health/appeals"): F(body=lambda w: {"reason": "authz matrix"}),
    ("GET", "/v1/health/appeals"): F(hidden=lambda w: [w.appeal()]),
    ("GET", "/v1/health/appeals/{id}"): F(params=lambda w: {"id": w.appeal()}, missing=lambda w: {"id": random_uuid(w)}),
    # appeals and paper codes are the health department's: its staff are not among the callers (the health tests
    # use them), so every caller here is refused, with a queue that shows none of A's appeals
    ("GET", "/v1/staff/health/appeals"): F(dept=lambda w: "health", hidden=lambda w: [w.appeal()]),
    ("POST", "/v1/staff/health/appeals/{id}/proposal"): F(
        dept=lambda w: "health", params=lambda w: {"id": w.appeal()}, missing=lambda w: {"id": random_uuid(w)},
        body=lambda w: {"decision": "reject", "note": "authz matrix"}),
    ("POST", "/v1/staff/health/appeals/{id}/approval"): F(
        dept=lambda w: "health", params=lambda w: {"id": w.proposed_appeal()},
        missing=lambda w: {"id": random_uuid(w)}, body=lambda w: {"approve": False, "note": "authz matrix"}),
    ("POST", "/v1/staff/health/paper-codes"): F(
        dept=lambda w: "health", body=lambda w: {"id_number": w.other["id"], "name": w.other["name"]}),
    ("POST", "/v1/staff/health/paper-codes/{id}/revocation"): F(
        dept=lambda w: "health", params=lambda w: {"id": w.paper_code()}, missing=lambda w: {"id": random_uuid(w)}),

    ("GET", "/v1/onething/bundles"): F(),
    ("GET", "/v1/onething/bundles/{code}/form"): F(params=lambda w: {"code": "business_opening"}),
    ("POST", "/v1/onething/applications"): F(body=lambda w: {"bundle_code": "business_opening", "fields": [],
                                                             "consent": True}),
    ("GET", "/v1/onething/applications"): F(hidden=lambda w: [w.application("own")["id"]]),
    ("GET", "/v1/onething/applications/{id}"): F(params=lambda w: {"id": w.application("own")["id"]},
                                                 missing=lambda w: {"id": random_uuid(w)}),
    ("POST", "/v1/onething/applications/{id}/supplements"): F(
        params=lambda w: {"id": w.application("own")["id"]}, missing=lambda w: {"id": random_uuid(w)},
        body=lambda w: {"fields": [{"name": "company.address", "value": "北京市朝阳区3号"}]}),
    ("POST", "/v1/onething/applications/{id}/withdrawal"): F(params=lambda w: {"id": w.application("own")["id"]},
                                                             missing=lambda w: {"id": random_uuid(w)}),
    ("POST", "/v1/onething/applications/{id}/rating"): F(params=lambda w: {"id": w.application("own")["id"]},
                                                         missing=lambda w: {"id": random_uuid(w)},
                                                         body=lambda w: {"stars": 5}),
    ("GET", "/v1/me/notifications"): F(hidden=lambda w: [w.application("own")["id"]]),
    ("GET", "/v1/me/licences"): F(),
    ("POST", "/v1/departments/{dept}/callbacks"): F(params=lambda w: {"dept": STAFF_DEPT},
                                                    signed=lambda w: w.signed_callback()),
    ("GET", "/v1/staff/tasks"): F(dept=lambda w: STAFF_DEPT, hidden=lambda w: [w.task()]),
    ("POST", "/v1/staff/tasks/{id}/decision"): F(
        dept=lambda w: STAFF_DEPT, params=lambda w: {"id": w.task()}, missing=lambda w: {"id": random_uuid(w)},
        body=lambda w: {"decision": "request_supplement", "fields": ["company.address"],
                        "reason": "authz matrix"}),
}

CALLER_DEPT = {"staff_other": OTHER_DEPT, "staff": STAFF_DEPT, "admin": "platform", "dept": "health",
               "dept_other": "hrss"}


# --------------------------------------------------------------------------- expectations

def expected(route, caller, fx, w):
    """'ok' (the handler runs), 401, 403, or 404 (the answer of an unknown id, or for lists: nothing of A's)."""
    if route["public"]:
        return "ok"
    if caller == "none":
        return 401
    if ROLE[caller] not in route["roles"]:
        return 403
    policy = route["policy"]
    if policy == "citizen" and caller != "citizen_a":
        return 404
    if policy == "self" and caller != "citizen_a" and fx.get("hidden"):
        return "ok-hidden"
    if policy == "department" and CALLER_DEPT.get(caller) != fx["dept"](w):
        if "{" in route["path"]:
            return 404
        return "ok-hidden" if route["method"] == "GET" else 403
    return "ok"


def strip_request_id(resp):
    try:
        rid = resp.json()["error"]["request_id"]
    except (AssertionError, KeyError, TypeError):
        return resp.body
    return resp.body.replace(rid.encode(), b"")


def fill(path, params):
    for k, v in params.items():
        path = path.replace("{" + k + "}", v)
    assert "{" not in path, f"no fixture value for a parameter of {path}"
    return path


def check(route, caller, fx, w):
    """Calls the route as `caller`; returns (status, problem or None)."""
    want = expected(route, caller, fx, w)
    method = route["method"]
    path = fill(route["path"], fx["params"](w) if fx.get("params") else {})
    raw = headers = None
    if fx.get("signed"):
        raw, headers = fx["signed"](w)
    body = fx["body"](w) if fx.get("body") else None
    r = w.call(caller, method, path, body, headers, raw)
    if want in (401, 403):
        code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}[want]
        if r.status != want or r.json().get("error", {}).get("code") != code:
            return r.status, f"expected {want} {code}, got {r!r}"
        return r.status, None
    if want == 404:
        if r.status != 404:
            return r.status, f"expected the 404 of an unknown id for a resource that is not the caller's, got {r!r}"
        unknown_path = fill(route["path"], fx["missing"](w))
        u = w.call(caller, method, unknown_path, fx["body"](w) if fx.get("body") else None)
        if u.status != 404 or strip_request_id(u) != strip_request_id(r) or \
                u.headers.get("content-type") != r.headers.get("content-type"):
            return r.status, f"not yours {r!r} differs from does not exist {u!r}"
        return r.status, None
    if r.status in (401, 403, 404) or r.status >= 500:
        return r.status, f"a permitted caller was refused or failed: {r!r}"
    if want == "ok-hidden" and r.status < 300:
        for s in fx["hidden"](w):
            if f'"{s}"'.encode() in r.body:
                return r.status, f"{caller} sees {s} of A's (or of {STAFF_DEPT}) in {r!r}"
    return r.status, None


def order(callers, route, fx, w):
    """Refused callers first, so that a permitted write (a deletion, a decision) cannot hide a refusal."""
    return sorted(callers, key=lambda c: expected(route, c, fx, w) in ("ok", "ok-hidden"))


def render(routes, results):
    width = max(len(f"{r['method']} {r['path']}") for r in routes)
    out = [" " * (width + 2) + " ".join(f"{c[:11]:>11}" for c in CALLERS)]
    for r in routes:
        key = (r["method"], r["path"])
        row = results.get(key, {})
        cells = []
        for c in CALLERS:
            status, problem = row.get(c, ("-", None))
            cells.append(f"{('!' if problem else '') + str(status):>11}")
        out.append(f"{r['method'] + ' ' + r['path']:<{width}}  " + " ".join(cells) + f"  [{r['policy']}]")
    return "\n".join(out)


# --------------------------------------------------------------------------- the test

def routes_of(gw):
    r = gw.run("routes")
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_cityhall_routes_lists_every_route_with_roles_policy_and_messages(cluster):
    routes = routes_of(cluster.gateway)
    assert len(routes) == len({(r["method"], r["path"]) for r in routes}) > 40, routes
    by = {(r["method"], r["path"]): r for r in routes}
    me = by[("GET", "/v1/me")]
    assert me["roles"] == ["citizen"] and me["public"] is False and me["policy"] == "self", me
    assert me["request"] is None and me["response"] == "cityhall.identity.v1.Me", me
    probes = by[("POST", "/v1/system/probes")]
    assert probes["roles"] == ["admin"] and probes["flags"] == ["idempotent"], probes
    assert by[("GET", "/healthz")]["public"] is True and by[("GET", "/healthz")]["flags"] == ["raw"]
    assert by[("POST", "/v1/staff/tasks/{id}/decision")]["policy"] == "department"
    assert by[("GET", "/v1/onething/applications/{id}")]["policy"] == "citizen"


def test_every_route_answers_every_caller_as_its_roles_and_ownership_policy_say(cluster):
    t0 = time.monotonic()
    routes = routes_of(cluster.gateway)
    undeclared = [f"{r['method']} {r['path']}" for r in routes if r["policy"] == "undeclared"]
    assert not undeclared, f"routes without an ownership policy: {undeclared}"
    missing = [f"{r['method']} {r['path']}" for r in routes if (r["method"], r["path"]) not in FIXTURES]
    assert not missing, f"routes without a fixture in test_authz_matrix.py (add one): {missing}"
    stale = [k for k in FIXTURES if k not in {(r["method"], r["path"]) for r in routes}]
    assert not stale, f"fixtures of routes that no longer exist: {stale}"

    w = World(cluster)
    w.setup()
    # logout ends the caller's session: last, so that every other route still sees live tokens
    routes.sort(key=lambda r: r["path"] == "/v1/auth/logout")
    results, problems = {}, []
    for route in routes:
        key = (route["method"], route["path"])
        fx = FIXTURES[key]
        row = results.setdefault(key, {})
        for caller in order(CALLERS, route, fx, w):
            try:
                row[caller] = check(route, caller, fx, w)
            except (AssertionError, harness.CurlError, subprocess.SubprocessError) as e:
                row[caller] = ("err", str(e))
            if row[caller][1]:
                problems.append(f"{route['method']} {route['path']} as {caller}: {row[caller][1]}")
    took = time.monotonic() - t0
    assert not problems, "\n".join(problems[:20]) + f"\n\n{render(routes, results)}"
    assert took < 120, f"the matrix took {took:.0f} s\n{render(routes, results)}"
