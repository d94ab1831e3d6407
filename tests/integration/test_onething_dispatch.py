"""One-thing dispatch against real PostgreSQL, Redis, the gateway and a fake department system: outbox delivery
with retries, backoff and idempotency keys (signed with the department's secret), signed department callbacks,
staff queues and decisions, dependency order, e-licences, deadlines and escalations, and delivery exactly once
after the gateway is killed between commit and delivery. Run by tests/run.py.

The fake department is a real HTTP/1.1 server (Python http.server in a thread on 127.0.0.1): it checks every
delivery's x-cityhall-signature, counts deliveries per idempotency key, and answers 500 or answers too late
when a test asks it to. Citizens log in by SMS code and bind their real name through the API; applications
are submitted through POST /v1/onething/applications (the applications engineer's route)."""

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import os
import random
import re
import socket
import socketserver
import threading
import time
import uuid

import harness
from harness import wait_for

# Fast retries for tests: 100 ms doubling to 800 ms, six attempts (about 2.5 s in all), 700 ms response timeout.
CLUSTER = {"threads": 2, "env": {
    "CITYHALL_DISPATCH_BACKOFF_MS": 100,
    "CITYHALL_DISPATCH_BACKOFF_CAP_MS": 800,
    "CITYHALL_DISPATCH_MAX_ATTEMPTS": 6,
    "CITYHALL_DISPATCH_CONNECT_TIMEOUT_MS": 500,
    "CITYHALL_DISPATCH_RESPONSE_TIMEOUT_MS": 700,
    "CITYHALL_DISPATCH_POLL_MS": 250,
}}
TIMEOUT = 180

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
BIRTH_ITEMS = {  # item code -> (department, depends on)
    "BIRTH_CERT": ("health", []),
    "HUKOU_REG": ("police-hukou", ["BIRTH_CERT"]),
    "MED_INS": ("medical-insurance", ["HUKOU_REG"]),
    "SOCIAL_CARD": ("hrss", ["HUKOU_REG"]),
    "VACCINE_CERT": ("health", []),
    "MATERNITY": ("hrss", []),
}

_rng = random.SystemRandom()
ID_NUMBERS = set()  # every ID number used: none may reach a log line, an error body or the staff's view
PHONES = set()
_state = {}         # per cluster (keyed by tmpdir): the fake department and the departments' secrets


# --------------------------------------------------------------------------- the fake department

class FakeDepartment:
    """A department system: POST /<dept>/items with a signed JSON item. Records every delivery; while
    `fail[item_code] = n` is set it answers 500 to the first n deliveries of each idempotency key of that item
    code, and `slow[item_code] = n` answers the first n after `slow_s` seconds (past the gateway's response
    timeout)."""

    def __init__(self, secrets):
        self.secrets = secrets          # dept (from the path /<dept>/items) -> secret
        self.lock = threading.Lock()
        self.deliveries = []            # (key, dept, body dict, time, status)
        self.bad_signatures = 0
        self.fail, self.slow = {}, {}
        self.slow_s = 1.5
        self.mode = {}                  # dept -> "chunked", "close" (Connection: close) or "http10" (body ended
        outer = self                    # by the close); else a keep-alive answer with a Content-Length

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 2  # idle keep-alive connections are closed after 2 s, as real servers do

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("content-length", "0"))
                raw = self.rfile.read(n)
                dept = self.path.strip("/").split("/")[0]
                key = self.headers.get("idempotency-key", "")
                sig = self.headers.get("x-cityhall-signature", "")
                m = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", sig)
                secret = outer.secrets.get(dept, "")
                good = m is not None and hmac.compare_digest(
                    hmac.new(secret.encode(), m.group(1).encode() + b"." + raw, hashlib.sha256).hexdigest(),
                    m.group(2)) and abs(time.time() - int(m.group(1))) < 300
                body = json.loads(raw) if good else None
                code = body["item_code"] if good else ""
                with outer.lock:
                    if not good:
                        outer.bad_signatures += 1
                    seen = sum(1 for d in outer.deliveries if d[0] == key)
                    status = 401 if not good else 500 if seen < outer.fail.get(code, 0) else 200
                    slow = good and seen < outer.slow.get(code, 0)
                    outer.deliveries.append((key, dept, body, time.time(), status))
                if slow:
                    time.sleep(outer.slow_s)
                body = b'{"received":true}' if status == 200 else b'{"error":"try later"}'
                mode = outer.mode.get(dept)
                try:
                    if mode == "http10":
                        self.wfile.write(b"HTTP/1.0 %d X\r\ncontent-type: application/json\r\n\r\n" % status + body)
                        self.close_connection = True
                        return
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    if mode == "chunked":
                        self.send_header("transfer-encoding", "chunked")
                        self.end_headers()
                        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                        return
                    if mode == "close":
                        self.send_header("connection", "close")
                        self.close_connection = True
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the gateway gave up waiting (slow answer)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, dept):
        return f"http://127.0.0.1:{self.port}/{dept}/items"

    def ok(self, key=None, item_id=None):
        """The 2xx deliveries (of one key, or of one item)."""
        with self.lock:
            return [d for d in self.deliveries if d[4] == 200 and (key is None or d[0] == key)
                    and (item_id is None or d[2]["item_id"] == item_id)]

    def all(self, key):
        with self.lock:
            return [d for d in self.deliveries if d[0] == key]


def state(cluster):
    st = _state.get(cluster.tmpdir)
    if st is None:
        secrets = {}
        st = _state[cluster.tmpdir] = {"secrets": secrets, "dept": FakeDepartment(secrets)}
    return st


def fake(cluster):
    return state(cluster)["dept"]


def set_endpoint(cluster, dept, url=None):
    """`cityhall dept endpoint`: the fake department (default), a given URL, or "none" (staff queue)."""
    st = state(cluster)
    secret = st["secrets"].setdefault(dept, "s3cret-" + uuid.uuid4().hex)
    args = ["dept", "endpoint", "--dept", dept, "--url", url or st["dept"].url(dept)]
    if url != "none":
        args += ["--secret", secret]
    r = cluster.gateway.run(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return secret


# --------------------------------------------------------------------------- helpers: HTTP, SQL

def closed_port():
    """(socket, port): a port bound but not listening, held by this process, so that nothing else can answer on it
    while the test runs (a merely free port may be taken by another test's server meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def psql(cluster, sql):
    return cluster.pg.psql(sql)


def var_dir(cluster):
    return cluster.gateway.env["CITYHALL_VAR"]


def call(cluster, token, path, method="GET", body=None, headers=None, **kw):
    h = {"Authorization": f"Bearer {token}"}
    h.update(headers or {})
    return cluster.gateway.request(path, method=method, json=body, headers=h, **kw)


def assert_error(resp, status, code, message=None):
    return harness.assert_error(resp, status, code, message, hidden=ID_NUMBERS)


def callback(cluster, dept, body, secret=None, t=None, raw=None):
    """POST /v1/departments/{dept}/callbacks signed like a department system would."""
    raw = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode()
    t = int(time.time()) if t is None else t
    secret = secret if secret is not None else state(cluster)["secrets"][dept]
    sig = hmac.new(secret.encode(), str(t).encode() + b"." + raw, hashlib.sha256).hexdigest()
    return cluster.gateway.request(f"/v1/departments/{dept}/callbacks", method="POST", data=raw,
                                   headers={"content-type": "application/json",
                                            "x-cityhall-signature": f"t={t},v1={sig}"})


def items(cluster, app_id):
    """{item_code: (item_id, state, department)} of an application."""
    rows = psql(cluster, f"SELECT item_code, item_id, state, department FROM application_items "
                         f"WHERE application_id = '{app_id}'")
    return {r.split("|")[0]: tuple(r.split("|")[1:]) for r in rows.splitlines()}


def item_state(cluster, item_id):
    return psql(cluster, f"SELECT state FROM application_items WHERE item_id = '{item_id}'")


def app_state(cluster, app_id):
    return psql(cluster, f"SELECT state FROM applications WHERE application_id = '{app_id}'")


def wait_state(cluster, item_id, want, timeout=15):
    return wait_for(lambda: item_state(cluster, item_id) == want, timeout=timeout,
                    what=f"item {item_id} to be {want} (is {item_state(cluster, item_id)})")


def dispatch_key(cluster, item_id):
    return psql(cluster, f"SELECT dispatch_key FROM application_items WHERE item_id = '{item_id}'")


# --------------------------------------------------------------------------- helpers: people

def new_phone():
    return harness.new_phone(PHONES)


def aesgcm():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise harness.Skip("python3-cryptography is not installed (apt-get install python3-cryptography)")
    return AESGCM


def seal(cluster, plain):
    """ch_pii_encrypt: nonce || ciphertext || tag with the data key."""
    key, _ = harness.data_key(cluster.gateway)
    nonce = os.urandom(12)
    return nonce + aesgcm()(key).encrypt(nonce, plain, None)


def add_resident(cluster, name, sex, birth):
    number = harness.new_id_number("440106", birth, sex, used=ID_NUMBERS)
    psql(cluster, "INSERT INTO registry_residents (id_hmac, id_enc, id_masked, name, sex, birth_date, region, address) "
                  f"VALUES (decode('{harness.id_hmac(cluster.gateway, number)}', 'hex'), decode('{seal(cluster, number.encode()).hex()}', "
                  f"'hex'), '{number[:4]}**********{number[-4:]}', '{name}', '{sex}', '{birth:%Y-%m-%d}', '440106', "
                  "'广州市天河区天河路1号')")
    return number


def sms_texts(cluster, phone):
    try:
        with open(os.path.join(var_dir(cluster), "sms-outbox.jsonl")) as f:
            msgs = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [m for m in msgs if m.get("phone") == phone and "text" in m]


def login(cluster, phone):
    return harness.sms_login(cluster.gateway, phone)


def family(cluster):
    """A mother (logged in, real name bound), a father, a newborn with a hospital birth record."""
    today = datetime.date.today()
    mother = {"name": harness.new_name(), "birth": datetime.date(1993, 5, 17), "phone": new_phone()}
    father = {"name": harness.new_name(), "birth": datetime.date(1991, 2, 3)}
    mother["id"] = add_resident(cluster, mother["name"], "F", mother["birth"])
    father["id"] = add_resident(cluster, father["name"], "M", father["birth"])
    child = {"name": mother["name"][0] + "小" + harness.new_name(2)[1:], "sex": "M",
             "birth": today - datetime.timedelta(days=10), "cert": "P%09d" % _rng.randrange(10 ** 9)}
    psql(cluster, "INSERT INTO birth_records (cert_no, child_name, child_sex, child_birth_date, hospital, mother_id_hmac, "
                  f"father_id_hmac) VALUES ('{child['cert']}', '{child['name']}', 'M', '{child['birth']:%Y-%m-%d}', "
                  f"'广州市妇女儿童医疗中心', decode('{harness.id_hmac(cluster.gateway, mother['id'])}', 'hex'), "
                  f"decode('{harness.id_hmac(cluster.gateway, father['id'])}', 'hex'))")
    tok = login(cluster, mother["phone"])
    harness.bind_real_name(cluster.gateway, tok["token"], mother["id"], mother["name"])
    return {"mother": mother, "father": father, "child": child, "token": tok["access_token"],
            "citizen_id": tok["citizen_id"]}


def birth_form(fam):
    m, f, c = fam["mother"], fam["father"], fam["child"]
    return {"child.name": c["name"], "child.sex": c["sex"], "child.birth_date": f"{c['birth']:%Y-%m-%d}",
            "child.hospital": "广州市妇女儿童医疗中心", "child.birth_cert_no": c["cert"], "mother.name": m["name"],
            "mother.id_number": m["id"], "father.name": f["name"], "father.id_number": f["id"],
            "parents.marriage_cert_no": "", "hukou.follow": "mother", "hukou.address": "广州市天河区天河路1号",
            "applicant.phone": m["phone"], "social_card.bank": "工商银行", "vaccine.clinic": "天河区妇幼保健院",
            "maternity.employer": "", "maternity.bank_account": "6222020200112233445"}


def submit(cluster, fam):
    """A birth-bundle application through POST /v1/onething/applications (accepted by the pre-check: the form
    matches the hospital record and the registry). Returns the application id."""
    form = birth_form(fam)
    r = call(cluster, fam["token"], "/v1/onething/applications", "POST",
             {"bundle_code": "birth", "consent": True,
              "fields": [{"name": k, "value": v} for k, v in form.items() if v != ""]},
             headers={"Idempotency-Key": uuid.uuid4().hex})
    assert r.status == 201, r
    body = r.json()
    assert body["state"] == "accepted", body
    return body["application_id"]


# --------------------------------------------------------------------------- helpers: staff

def staff(cluster, dept):
    """A staff member of `dept` (cityhall staff add), logged in; cached per department. Returns the token."""
    st = state(cluster).setdefault("staff", {})
    if dept not in st:
        st[dept] = harness.staff_token(cluster.gateway, dept)["token"]
    return st[dept]


def tasks(cluster, dept, query=""):
    r = call(cluster, staff(cluster, dept), "/v1/staff/tasks" + query)
    assert r.status == 200, r
    return r.json()


def decide(cluster, dept, item_id, body):
    return call(cluster, staff(cluster, dept), f"/v1/staff/tasks/{item_id}/decision", "POST", body)


def configure(cluster):
    """Endpoints of the birth bundle's departments: health, police-hukou and hrss run their own systems (the fake
    department); medical-insurance works cityhall's staff queue."""
    st = state(cluster)
    if not st.get("configured"):
        for dept in ("health", "police-hukou", "hrss"):
            set_endpoint(cluster, dept)
        set_endpoint(cluster, "medical-insurance", "none")
        st["configured"] = True


def licence_key_pem(cluster):
    d = os.path.join(var_dir(cluster), "keys", "licence")
    names = sorted(n for n in os.listdir(d) if n.endswith(".pem"))
    assert names, "no licence key"
    with open(os.path.join(d, names[-1]), "rb") as f:
        return names[-1][:-4], f.read()


def verify_licence(cluster, token):
    """Checks an ES256 compact JWS with the licence ring's public key; returns (header, claims)."""
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, utils
    except ImportError:
        raise harness.Skip("python3-cryptography is not installed")
    kid, pem = licence_key_pem(cluster)
    pub = serialization.load_pem_private_key(pem, None).public_key()

    def dec(s):
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    h, p, s = token.split(".")
    raw = dec(s)
    assert len(raw) == 64
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    pub.verify(der, f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256()))
    header, claims = json.loads(dec(h)), json.loads(dec(p))
    assert header == {"alg": "ES256", "typ": "licence+jwt", "kid": kid}, header
    return header, claims


def no_personal_data_in_logs(cluster):
    log = cluster.gateway.log_text()
    for n in ID_NUMBERS:
        assert n not in log, "an ID number in the gateway log"
    for p in PHONES:
        assert p not in log, "a phone number in the gateway log"


# --------------------------------------------------------------------------- the birth bundle end to end

def test_birth_bundle_is_dispatched_decided_and_licensed_in_dependency_order(cluster):
    configure(cluster)
    dept = fake(cluster)
    fam = family(cluster)
    # the birth certificate's first delivery fails (500), the vaccination certificate's first answer comes too late
    dept.fail["BIRTH_CERT"] = 1
    dept.slow["VACCINE_CERT"] = 1
    try:
        app_id = submit(cluster, fam)
        its = items(cluster, app_id)
        for code in ("BIRTH_CERT", "VACCINE_CERT", "MATERNITY"):
            wait_state(cluster, its[code][0], "in_review")
    finally:
        dept.fail.clear()
        dept.slow.clear()
    assert set(its) == set(BIRTH_ITEMS), its
    key = {code: dispatch_key(cluster, its[code][0]) for code in its}
    assert app_state(cluster, app_id) == "in_progress"  # items are with their departments
    # each delivered under its own key, signed, with this item's form values only
    for code in ("BIRTH_CERT", "VACCINE_CERT", "MATERNITY"):
        ok = dept.ok(key[code])
        assert len(ok) >= 1, (code, dept.all(key[code]))
        body = ok[0][2]
        assert body["item_id"] == its[code][0] and body["item_code"] == code and body["application_id"] == app_id
        assert body["kind"] == "dispatch" and body["idempotency_key"] == key[code]
    assert set(dept.ok(key["MATERNITY"])[0][2]["fields"]) == {"child.birth_date", "mother.name", "mother.id_number",
                                                               "applicant.phone", "maternity.bank_account"}
    assert dept.ok(key["BIRTH_CERT"])[0][2]["fields"]["mother.id_number"] == fam["mother"]["id"]
    assert "social_card.bank" not in dept.ok(key["BIRTH_CERT"])[0][2]["fields"]
    assert len(dept.all(key["BIRTH_CERT"])) >= 2 and dept.all(key["BIRTH_CERT"])[0][4] == 500
    assert len(dept.all(key["VACCINE_CERT"])) >= 2, dept.all(key["VACCINE_CERT"])  # the late answer was retried
    errors = psql(cluster, f"SELECT error FROM dispatch_attempts WHERE item_id = '{its['BIRTH_CERT'][0]}' "
                           "ORDER BY attempt_id").splitlines()
    assert errors and errors[0] == "HTTP 500 from health", errors
    row = psql(cluster, f"SELECT state, attempts FROM outbox WHERE item_id = '{its['BIRTH_CERT'][0]}'")
    assert row == f"delivered|{len(errors) + 1}", row
    late = psql(cluster, f"SELECT error FROM dispatch_attempts WHERE item_id = '{its['VACCINE_CERT'][0]}'")
    assert late.splitlines()[0] == "no answer within the response timeout (health)", late
    assert dept.bad_signatures == 0
    # dependency order: nothing of HUKOU_REG (or its dependants) has gone anywhere yet
    for code in ("HUKOU_REG", "MED_INS", "SOCIAL_CARD"):
        assert its[code][1] == "blocked_on_dependency" and item_state(cluster, its[code][0]) == "blocked_on_dependency"
        assert psql(cluster, f"SELECT count(*) FROM outbox WHERE item_id = '{its[code][0]}'") == "0"
        assert not dept.all(key[code])

    # the health commission approves the birth certificate; its system sends the callback twice
    cb = {"item_id": its["BIRTH_CERT"][0], "decision": "approve", "callback_id": "h-" + uuid.uuid4().hex}
    first, again = callback(cluster, "health", cb), callback(cluster, "health", cb)
    assert first.status == 200 and first.json() == {"item_id": its["BIRTH_CERT"][0], "state": "issued"}, first
    assert again.status == 200 and again.json() == first.json(), again
    assert psql(cluster, f"SELECT count(*) FROM licences WHERE item_id = '{its['BIRTH_CERT'][0]}'") == "1"
    # ... which releases the household registration, delivered with the birth certificate's licence
    wait_for(lambda: dept.ok(key["HUKOU_REG"]), timeout=15, what="HUKOU_REG delivered")
    hukou = dept.ok(key["HUKOU_REG"])[0][2]
    birth_licence = hukou["licences"]["BIRTH_CERT"]
    assert birth_licence["child.birth_cert_no"] == fam["child"]["cert"], hukou
    assert re.fullmatch(r"BIRTH_CERT-\d{4}-\d{6}", birth_licence["licence_number"]), birth_licence
    assert "mother.id_number" not in birth_licence and "applicant.phone" not in birth_licence
    assert hukou["fields"]["child.birth_cert_no"] == fam["child"]["cert"]
    assert item_state(cluster, its["MED_INS"][0]) == "blocked_on_dependency"
    # ... and the citizen's next form is prefilled from the licence
    r = call(cluster, fam["token"], "/v1/onething/bundles/birth/form")
    assert r.status == 200, r
    field = [f for f in r.json()["fields"] if f["name"] == "child.birth_cert_no"][0]
    assert field["value"] == fam["child"]["cert"] and field["source"] == "licence:BIRTH_CERT", field

    # the same callback twice at the same moment: one decision, one licence, the same acknowledgement
    same = {"item_id": its["VACCINE_CERT"][0], "decision": "approve", "callback_id": uuid.uuid4().hex}
    answers = [None, None]

    def send(k):
        answers[k] = callback(cluster, "health", same)
    threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [a.status for a in answers] == [200, 200], answers
    assert answers[0].json() == answers[1].json() == {"item_id": its["VACCINE_CERT"][0], "state": "issued"}
    assert psql(cluster, f"SELECT count(*) FROM licences WHERE item_id = '{its['VACCINE_CERT'][0]}'") == "1"
    for code, d in (("MATERNITY", "hrss"), ("HUKOU_REG", "police-hukou")):
        wait_state(cluster, its[code][0], "in_review")
        r = callback(cluster, d, {"item_id": its[code][0], "decision": "approve", "callback_id": uuid.uuid4().hex})
        assert r.status == 200 and r.json()["state"] == "issued", r
    # medical insurance works the staff queue; the social-security card goes to hrss's system
    wait_state(cluster, its["MED_INS"][0], "in_review")
    wait_for(lambda: dept.ok(key["SOCIAL_CARD"]), timeout=15, what="SOCIAL_CARD delivered")
    queue = tasks(cluster, "medical-insurance", "?state=in_review")
    mine = [t for t in queue["tasks"] if t["task_id"] == its["MED_INS"][0]]
    assert len(mine) == 1, queue
    t = mine[0]
    assert t["application_id"] == app_id and t["item_code"] == "MED_INS" and t["state"] == "in_review"
    assert t["department"] == "medical-insurance" and t["item_name"] == "城乡居民基本医疗保险参保登记"
    assert t["applicant_masked_name"] == fam["mother"]["name"][0] + "*" * (len(fam["mother"]["name"]) - 1), t
    shown = {f["name"]: f["value"] for f in t["fields"]}
    assert shown["child.name"] == fam["child"]["name"] and shown["hukou.address"] == "广州市天河区天河路1号", shown
    assert shown["applicant.phone"] == fam["mother"]["phone"][:3] + "****" + fam["mother"]["phone"][-4:], shown
    assert "mother.id_number" not in shown  # not a field of this item
    assert t["due_at"] and t["received_at"] and t["overdue"] is False and t["escalated"] is False, t
    def log():
        return psql(cluster, f"SELECT actor_role, actor_dept, action, purpose FROM access_log "
                             f"WHERE citizen_id = '{fam['citizen_id']}' ORDER BY entry_id").splitlines()
    assert "staff|medical-insurance|onething.task_view|one-thing application reviewed in the staff queue" in log(), log()
    # deliveries reach the access log through access_log_pending, within a second or so
    wait_for(lambda: {"dept|health|onething.dispatch|one-thing items sent to the department: BIRTH_CERT",
                      "dept|health|onething.dispatch|one-thing items sent to the department: VACCINE_CERT",
                      "dept|health|onething.dispatch|one-thing items sent to the department: BIRTH_CERT, VACCINE_CERT"}
             & set(log()), timeout=10, what="the department's read in the access log")
    assert cluster.gateway.run("audit", "verify").returncode == 0
    r = decide(cluster, "medical-insurance", its["MED_INS"][0], {"decision": "approve"})
    assert r.status == 200, r
    assert r.json()["state"] == "issued" and r.json()["task_id"] == its["MED_INS"][0], r.json()
    r = callback(cluster, "hrss", {"item_id": its["SOCIAL_CARD"][0], "decision": "approve",
                                   "callback_id": uuid.uuid4().hex, "licence_number": "SSC-" + uuid.uuid4().hex[:10]})
    assert r.status == 200 and r.json()["state"] == "issued", r

    assert app_state(cluster, app_id) == "completed"
    # six licences, each a verifiable ES256 JWS held by the applicant
    r = call(cluster, fam["token"], "/v1/me/licences")
    assert r.status == 200, r
    lics = [l for l in r.json()["licences"] if l["type"] in BIRTH_ITEMS]
    assert sorted(l["type"] for l in lics) == sorted(BIRTH_ITEMS), lics
    for l in lics:
        _, claims = verify_licence(cluster, l["signature"])
        assert claims["lno"] == l["licence_number"] and claims["type"] == l["type"] and claims["sub"] == l["licence_id"]
        assert claims["iss"] == "cityhall" and claims["issuer"] == l["issuer"] == BIRTH_ITEMS[l["type"]][0]
        assert l["holder_masked_name"] == claims["holder"]
        assert fam["mother"]["id"] not in json.dumps(claims)
    birth = [l for l in lics if l["type"] == "BIRTH_CERT"][0]
    until = datetime.datetime.fromisoformat(birth["valid_until"].replace("Z", "+00:00"))
    assert until.year - datetime.datetime.now().year >= 99, birth
    assert [l for l in lics if l["type"] == "SOCIAL_CARD"][0]["licence_number"].startswith("SSC-")
    # every item reached its department exactly once as far as the department can tell
    for code in BIRTH_ITEMS:
        if BIRTH_ITEMS[code][0] != "medical-insurance":
            assert {d[0] for d in dept.ok(key[code])} == {key[code]}
    # the citizen was told, in the app and by SMS at the end
    kinds = psql(cluster, f"SELECT kind FROM notifications WHERE application_id = '{app_id}' ORDER BY notification_id")
    assert kinds.splitlines().count("item_issued") == 6 and "application_completed" in kinds.splitlines(), kinds
    wait_for(lambda: any(m["kind"] == "application_completed" for m in sms_texts(cluster, fam["mother"]["phone"])),
             timeout=10, what="the completion SMS")
    no_personal_data_in_logs(cluster)


def test_rejected_birth_certificate_rejects_its_dependants_and_ends_partially_completed(cluster):
    configure(cluster)
    fam = family(cluster)
    app_id = submit(cluster, fam)
    its = items(cluster, app_id)
    for code in ("BIRTH_CERT", "VACCINE_CERT", "MATERNITY"):
        wait_state(cluster, its[code][0], "in_review")
    r = callback(cluster, "health", {"item_id": its["BIRTH_CERT"][0], "decision": "reject",
                                     "reason": "出生医学证明信息与医院记录不符", "callback_id": uuid.uuid4().hex})
    assert r.status == 200 and r.json()["state"] == "rejected", r
    for code in ("HUKOU_REG", "MED_INS", "SOCIAL_CARD"):
        assert item_state(cluster, its[code][0]) == "rejected", code
        assert psql(cluster, f"SELECT count(*) FROM outbox WHERE item_id = '{its[code][0]}'") == "0"
    assert psql(cluster, f"SELECT reason FROM application_items WHERE item_id = '{its['HUKOU_REG'][0]}'") == \
        "depends on BIRTH_CERT, which was rejected"
    assert app_state(cluster, app_id) == "in_progress"
    for code, d in (("VACCINE_CERT", "health"), ("MATERNITY", "hrss")):
        r = callback(cluster, d, {"item_id": its[code][0], "decision": "approve", "callback_id": uuid.uuid4().hex})
        assert r.status == 200, r
    assert app_state(cluster, app_id) == "partially_completed"
    # a decided item takes no further decision
    r = callback(cluster, "health", {"item_id": its["BIRTH_CERT"][0], "decision": "approve",
                                     "callback_id": uuid.uuid4().hex})
    assert_error(r, 422, "FAILED_PRECONDITION", "rejected")
    assert psql(cluster, f"SELECT count(*) FROM licences WHERE item_id = '{its['BIRTH_CERT'][0]}'") == "0"
    wait_for(lambda: any(m["kind"] == "item_rejected" for m in sms_texts(cluster, fam["mother"]["phone"])),
             timeout=10, what="the rejection SMS")


def test_callbacks_refuse_bad_signatures_stale_times_and_other_departments_items(cluster):
    configure(cluster)
    fam = family(cluster)
    app_id = submit(cluster, fam)
    its = items(cluster, app_id)
    item = its["BIRTH_CERT"][0]
    wait_state(cluster, item, "in_review")
    body = {"item_id": item, "decision": "approve", "callback_id": uuid.uuid4().hex}
    assert_error(callback(cluster, "health", body, secret="not-the-secret-at-all"), 401, "UNAUTHENTICATED")
    assert_error(callback(cluster, "health", body, t=int(time.time()) - 400), 401, "UNAUTHENTICATED", "5 minutes")
    r = cluster.gateway.request("/v1/departments/health/callbacks", method="POST", json=body)
    assert_error(r, 401, "UNAUTHENTICATED", "x-cityhall-signature")
    # signed for one body, another body sent
    raw = json.dumps(body).encode()
    t = int(time.time())
    sig = hmac.new(state(cluster)["secrets"]["health"].encode(), f"{t}.".encode() + raw, hashlib.sha256).hexdigest()
    tampered = json.dumps(dict(body, decision="reject", reason="x")).encode()
    r = cluster.gateway.request("/v1/departments/health/callbacks", method="POST", data=tampered,
                                headers={"content-type": "application/json", "x-cityhall-signature": f"t={t},v1={sig}"})
    assert_error(r, 401, "UNAUTHENTICATED")
    # a department without an endpoint has no secret to sign with
    assert_error(callback(cluster, "medical-insurance", body, secret="anything-at-all"), 401, "UNAUTHENTICATED")
    # nothing changed, nothing recorded
    assert item_state(cluster, item) == "in_review"
    assert psql(cluster, f"SELECT count(*) FROM callbacks_seen WHERE item_id = '{item}'") == "0"
    # hrss signs correctly, but the item is the health commission's: like an unknown item
    other = callback(cluster, "hrss", body)
    unknown = callback(cluster, "hrss", dict(body, item_id=str(uuid.uuid4()), callback_id=uuid.uuid4().hex))
    assert_error(other, 404, "NOT_FOUND")
    assert_error(unknown, 404, "NOT_FOUND")
    assert other.json()["error"]["message"] == unknown.json()["error"]["message"]
    # bad input, every problem at once
    r = callback(cluster, "health", {"item_id": item, "decision": "request_supplement", "callback_id": uuid.uuid4().hex,
                                     "licence_number": "X-1"})
    err = assert_error(r, 400, "INVALID_ARGUMENT")
    assert "fields:" in err["message"] and "licence_number:" in err["message"], err
    r = callback(cluster, "health", {"item_id": item, "decision": "request_supplement", "fields": ["no.such"],
                                     "callback_id": uuid.uuid4().hex})
    assert_error(r, 400, "INVALID_ARGUMENT", "no.such")
    assert item_state(cluster, item) == "in_review"
    r = callback(cluster, "health", {"item_id": item, "decision": "in_review", "callback_id": uuid.uuid4().hex})
    assert r.status == 200 and r.json() == {"item_id": item, "state": "in_review"}, r


# --------------------------------------------------------------------------- staff queues

def test_staff_see_only_their_departments_tasks_and_cannot_decide_others(cluster):
    configure(cluster)
    fam = family(cluster)
    app_id = submit(cluster, fam)
    its = items(cluster, app_id)
    for code in ("BIRTH_CERT", "VACCINE_CERT", "MATERNITY"):
        wait_state(cluster, its[code][0], "in_review")
    # medical-insurance staff (queue department): of this application, only their own item (still blocked)
    mi = tasks(cluster, "medical-insurance", "?state=in_review,dispatched,failed_technical,blocked_on_dependency")
    assert [(t["task_id"], t["state"]) for t in mi["tasks"] if t["application_id"] == app_id] == \
        [(its["MED_INS"][0], "blocked_on_dependency")], mi
    assert not [t for t in tasks(cluster, "medical-insurance")["tasks"] if t["application_id"] == app_id]
    # a department that has no task at all sees an empty list
    assert tasks(cluster, "housing-fund") == {"tasks": [], "next_page_token": ""}
    mine = [t["task_id"] for t in tasks(cluster, "health", "?state=in_review")["tasks"] if t["application_id"] == app_id]
    assert sorted(mine) == sorted([its["BIRTH_CERT"][0], its["VACCINE_CERT"][0]]), mine
    # deciding another department's task is answered like an unknown task
    other = decide(cluster, "medical-insurance", its["BIRTH_CERT"][0], {"decision": "approve"})
    unknown = decide(cluster, "medical-insurance", str(uuid.uuid4()), {"decision": "approve"})
    assert_error(other, 404, "NOT_FOUND")
    assert_error(unknown, 404, "NOT_FOUND")
    assert other.json()["error"]["message"] == unknown.json()["error"]["message"]
    assert_error(decide(cluster, "medical-insurance", "not-a-uuid", {"decision": "approve"}), 404, "NOT_FOUND")
    assert item_state(cluster, its["BIRTH_CERT"][0]) == "in_review"
    # a task not in review takes no decision; unknown decisions and missing reasons are 400
    assert_error(decide(cluster, "police-hukou", its["HUKOU_REG"][0], {"decision": "approve"}), 422,
                 "FAILED_PRECONDITION", "blocked_on_dependency")
    err = assert_error(decide(cluster, "health", its["BIRTH_CERT"][0], {"decision": "reject"}), 400, "INVALID_ARGUMENT")
    assert "reason" in err["message"]
    assert_error(decide(cluster, "health", its["BIRTH_CERT"][0], {"decision": "maybe"}), 400, "INVALID_ARGUMENT",
                 "decision")
    assert_error(call(cluster, staff(cluster, "health"), "/v1/staff/tasks?state=lost"), 400, "INVALID_ARGUMENT", "state")
    # citizens are not staff
    assert call(cluster, fam["token"], "/v1/staff/tasks").status == 403


def test_staff_queue_pages_with_an_opaque_token_and_caps_the_page_size(cluster):
    configure(cluster)
    set_endpoint(cluster, "hrss", "none")  # hrss works the queue for this test
    try:
        apps = [submit(cluster, family(cluster)) for _ in range(3)]
        ids = []
        for a in apps:
            its = items(cluster, a)
            wait_state(cluster, its["MATERNITY"][0], "in_review")
            ids.append(its["MATERNITY"][0])
        seen, token = [], ""
        for _ in range(20):
            page = tasks(cluster, "hrss", f"?state=in_review&page_size=1&page_token={token}")
            assert len(page["tasks"]) <= 1, page
            seen += [t["task_id"] for t in page["tasks"]]
            token = page["next_page_token"]
            if not token:
                break
        assert set(ids) <= set(seen) and len(seen) == len(set(seen)), (ids, seen)
        big = tasks(cluster, "hrss", "?page_size=100000")
        assert len(big["tasks"]) <= 100
        assert_error(call(cluster, staff(cluster, "hrss"), "/v1/staff/tasks?page_token=bm9wZQ"), 400,
                     "INVALID_ARGUMENT", "page_token")
    finally:
        set_endpoint(cluster, "hrss")


def test_supplement_request_pauses_the_clock_and_only_that_item_returns_to_review(cluster):
    configure(cluster)
    fam = family(cluster)
    app_id = submit(cluster, fam)
    its = items(cluster, app_id)
    for code in ("BIRTH_CERT", "VACCINE_CERT", "MATERNITY"):
        wait_state(cluster, its[code][0], "in_review")
    r = callback(cluster, "health", {"item_id": its["BIRTH_CERT"][0], "decision": "approve",
                                     "callback_id": uuid.uuid4().hex})
    assert r.status == 200, r
    mi = its["MED_INS"][0]
    wait_state(cluster, its["HUKOU_REG"][0], "in_review")
    r = callback(cluster, "police-hukou", {"item_id": its["HUKOU_REG"][0], "decision": "approve",
                                           "callback_id": uuid.uuid4().hex})
    assert r.status == 200, r
    wait_state(cluster, mi, "in_review")
    due_before = psql(cluster, f"SELECT extract(epoch FROM due_at + make_interval(secs => paused_seconds)) "
                               f"FROM application_items WHERE item_id = '{mi}'")
    err = assert_error(decide(cluster, "medical-insurance", mi, {"decision": "request_supplement",
                                                                 "fields": ["hukou.address", "mother.id_number"]}),
                       400, "INVALID_ARGUMENT", "mother.id_number")
    assert "hukou.address" not in err["message"]
    r = decide(cluster, "medical-insurance", mi, {"decision": "request_supplement", "fields": ["hukou.address"],
                                                  "reason": "请补充完整的落户地址"})
    assert r.status == 200 and r.json()["state"] == "supplement_requested", r
    row = psql(cluster, f"SELECT state, supplement_fields, paused_at IS NOT NULL, reason FROM application_items "
                        f"WHERE item_id = '{mi}'")
    assert row == "supplement_requested|{hukou.address}|t|请补充完整的落户地址", row
    assert item_state(cluster, its["SOCIAL_CARD"][0]) != "supplement_requested"
    # while paused, a decision is refused and the sweeper does not count the item overdue
    assert_error(decide(cluster, "medical-insurance", mi, {"decision": "approve"}), 422, "FAILED_PRECONDITION")
    wait_for(lambda: any(m["kind"] == "supplement_requested" for m in sms_texts(cluster, fam["mother"]["phone"])),
             timeout=10, what="the supplement SMS")
    time.sleep(2.2)
    r = call(cluster, fam["token"], f"/v1/onething/applications/{app_id}/supplements", "POST",
             {"fields": [{"name": "hukou.address", "value": "广州市天河区天河路2号"}]},
             headers={"Idempotency-Key": uuid.uuid4().hex})
    assert r.status == 200, r
    assert [i["state"] for i in r.json()["items"] if i["item_id"] == mi] == ["in_review"], r.json()
    wait_state(cluster, mi, "in_review")
    due_after = psql(cluster, f"SELECT extract(epoch FROM due_at + make_interval(secs => paused_seconds)) "
                              f"FROM application_items WHERE item_id = '{mi}'")
    moved = float(due_after) - float(due_before)
    assert 2 <= moved <= 30, (due_before, due_after)
    task = [t for t in tasks(cluster, "medical-insurance")["tasks"] if t["task_id"] == mi][0]
    assert int(datetime.datetime.fromisoformat(task["due_at"].replace("Z", "+00:00")).timestamp()) == int(float(due_after))
    r = decide(cluster, "medical-insurance", mi, {"decision": "approve"})
    assert r.status == 200 and r.json()["state"] == "issued", r


def test_supplement_for_a_department_system_is_resubmitted_under_its_own_key(cluster):
    configure(cluster)
    dept = fake(cluster)
    fam = family(cluster)
    app_id = submit(cluster, fam)
    bc = items(cluster, app_id)["BIRTH_CERT"][0]
    wait_state(cluster, bc, "in_review")
    key = dispatch_key(cluster, bc)
    r = callback(cluster, "health", {"item_id": bc, "decision": "request_supplement", "fields": ["child.hospital"],
                                     "reason": "医院名称不完整", "callback_id": uuid.uuid4().hex})
    assert r.status == 200 and r.json()["state"] == "supplement_requested", r
    r = call(cluster, fam["token"], f"/v1/onething/applications/{app_id}/supplements", "POST",
             {"fields": [{"name": "child.hospital", "value": "广州市妇女儿童医疗中心珠江新城院区"}]},
             headers={"Idempotency-Key": uuid.uuid4().hex})
    assert r.status == 200, r
    wait_state(cluster, bc, "in_review")
    again = [d for d in dept.ok(item_id=bc) if d[0] != key]
    assert len(again) == 1, dept.ok(item_id=bc)
    body = again[0][2]
    assert body["kind"] == "resubmit" and body["idempotency_key"] == again[0][0] and again[0][0].startswith(key + ".")
    assert body["fields"]["child.hospital"] == "广州市妇女儿童医疗中心珠江新城院区", body
    assert len(dept.ok(key)) == 1  # the first delivery was not repeated
    assert psql(cluster, f"SELECT paused_at IS NULL AND paused_seconds >= 0 FROM application_items "
                         f"WHERE item_id = '{bc}'") == "t"


# --------------------------------------------------------------------------- deadlines

def test_sweep_escalates_items_past_their_promised_and_legal_deadlines_once(cluster):
    configure(cluster)
    fam = family(cluster)
    app_id = submit(cluster, fam)
    its = items(cluster, app_id)
    vac = its["VACCINE_CERT"][0]
    wait_state(cluster, vac, "in_review")
    # due_at counts working days from acceptance (weekends and holidays excluded)
    check = psql(cluster, f"SELECT due_at = ot_add_working_days(accepted_at, 1) FROM application_items "
                          f"WHERE item_id = '{vac}'")
    assert check == "t", check
    assert psql(cluster, "SELECT ot_add_working_days('2026-09-30 10:00+08', 1) = '2026-10-08 10:00+08', "
                         "ot_add_working_days('2026-02-13 09:00+08', 1) = '2026-02-14 09:00+08', "
                         "ot_add_working_days('2027-01-01 09:00+08', 3) = '2027-01-06 09:00+08'") == "t|t|t"
    due = psql(cluster, f"SELECT to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') "
                        f"FROM application_items WHERE item_id = '{vac}'")
    at = datetime.datetime.fromisoformat(due[:-1])
    r = cluster.gateway.run("onething", "sweep", "--now", (at - datetime.timedelta(hours=1)).isoformat() + "Z")
    assert r.returncode == 0, r.stderr
    assert psql(cluster, f"SELECT count(*) FROM escalations WHERE item_id = '{vac}'") == "0"
    r = cluster.gateway.run("onething", "sweep", "--now", (datetime.datetime.fromisoformat(due[:-1]) +
                                                            datetime.timedelta(hours=1)).isoformat() + "Z")
    assert r.returncode == 0 and re.search(r"escalations raised: [1-9]", r.stdout), r.stdout
    assert psql(cluster, f"SELECT level FROM escalations WHERE item_id = '{vac}'") == "1"
    task = [t for t in tasks(cluster, "health")["tasks"] if t["task_id"] == vac][0]
    assert task["overdue"] is True and task["escalated"] is True, task
    # the same sweep again raises nothing new for this item
    cluster.gateway.run("onething", "sweep", "--now", (datetime.datetime.fromisoformat(due[:-1]) +
                                                        datetime.timedelta(hours=2)).isoformat() + "Z")
    assert psql(cluster, f"SELECT count(*) FROM escalations WHERE item_id = '{vac}'") == "1"
    # past the legal deadline (10 working days): level 2, and the citizen hears about it by SMS too
    later = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=40)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = cluster.gateway.run("onething", "sweep", "--now", later)
    assert r.returncode == 0, r.stderr
    assert psql(cluster, f"SELECT string_agg(level::text, ',' ORDER BY level) FROM escalations "
                         f"WHERE item_id = '{vac}'") == "1,2"
    assert psql(cluster, f"SELECT count(*) FROM notifications WHERE application_id = '{app_id}' "
                         "AND kind = 'item_escalated'") != "0"
    wait_for(lambda: any(m["kind"] == "item_escalated" for m in sms_texts(cluster, fam["mother"]["phone"])),
             timeout=10, what="the escalation SMS")
    # a bad --now is refused
    assert cluster.gateway.run("onething", "sweep", "--now", "yesterday-ish").returncode != 0
    # deciding resolves the escalation
    r = callback(cluster, "health", {"item_id": vac, "decision": "approve", "callback_id": uuid.uuid4().hex})
    assert r.status == 200, r
    assert psql(cluster, f"SELECT bool_and(resolved_at IS NOT NULL) FROM escalations WHERE item_id = '{vac}'") == "t"


# --------------------------------------------------------------------------- failures

def test_undeliverable_item_becomes_failed_technical_and_staff_can_retry_it(cluster):
    configure(cluster)
    hold, closed = closed_port()
    set_endpoint(cluster, "hrss", f"http://127.0.0.1:{closed}/hrss/items")
    try:
        fam = family(cluster)
        app_id = submit(cluster, fam)
        mat = items(cluster, app_id)["MATERNITY"][0]
        wait_state(cluster, mat, "failed_technical", timeout=30)
        assert psql(cluster, f"SELECT count(*) FROM dispatch_attempts WHERE item_id = '{mat}' AND status = 'failed'") == "6"
        row = psql(cluster, f"SELECT state, attempts, last_error FROM outbox WHERE item_id = '{mat}'")
        assert row.startswith("failed|6|connection refused"), row
        task = [t for t in tasks(cluster, "hrss", "?state=failed_technical")["tasks"] if t["task_id"] == mat]
        assert len(task) == 1, task
        assert psql(cluster, f"SELECT count(*) FROM notifications WHERE application_id = '{app_id}' "
                             "AND kind = 'item_delayed'") == "1"
        set_endpoint(cluster, "hrss")
        assert_error(decide(cluster, "hrss", items(cluster, app_id)["BIRTH_CERT"][0], {"decision": "retry"}), 404,
                     "NOT_FOUND")
        r = decide(cluster, "hrss", mat, {"decision": "retry"})
        assert r.status == 200 and r.json()["state"] == "dispatched", r
        wait_state(cluster, mat, "in_review")
        key = dispatch_key(cluster, mat)
        assert len(fake(cluster).ok(key)) == 1
        assert_error(decide(cluster, "hrss", mat, {"decision": "retry"}), 422, "FAILED_PRECONDITION")
    finally:
        set_endpoint(cluster, "hrss")
        hold.close()


def test_delivery_reads_chunked_close_delimited_and_closing_answers_and_reuses_connections(cluster):
    configure(cluster)
    dept = fake(cluster)
    fams = [family(cluster) for _ in range(4)]
    try:
        for f, mode in zip(fams, ("chunked", "close", "http10", None)):
            dept.mode["hrss"] = mode
            app_id = submit(cluster, f)
            mat = items(cluster, app_id)["MATERNITY"][0]
            wait_state(cluster, mat, "in_review")
            assert len(dept.ok(dispatch_key(cluster, mat))) == 1, mode
            assert psql(cluster, f"SELECT count(*) FROM dispatch_attempts WHERE item_id = '{mat}'") == "0", mode
        # the department closed the idle keep-alive connections meanwhile: the next delivery opens a new one
        time.sleep(2.5)
        app_id = submit(cluster, family(cluster))
        mat = items(cluster, app_id)["MATERNITY"][0]
        wait_state(cluster, mat, "in_review")
        assert len(dept.ok(dispatch_key(cluster, mat))) == 1
        assert psql(cluster, f"SELECT count(*) FROM dispatch_attempts WHERE item_id = '{mat}'") == "0"
    finally:
        dept.mode.clear()


def test_gateway_killed_before_dispatch_delivers_every_item_exactly_once_after_restart(cluster):
    configure(cluster)
    dept = fake(cluster)
    hold, closed = closed_port()
    for d in ("health", "hrss"):
        set_endpoint(cluster, d, f"http://127.0.0.1:{closed}/{d}/items")
    try:
        families = [family(cluster) for _ in range(3)]
        apps = [submit(cluster, f) for f in families]
        ids = [items(cluster, a)[c][0] for a in apps for c in ("BIRTH_CERT", "VACCINE_CERT", "MATERNITY")]
        in_list = ",".join(f"'{i}'" for i in ids)
        # the workers have tried (and failed) at least once: the rows are committed and pending
        wait_for(lambda: psql(cluster, f"SELECT count(DISTINCT item_id) FROM dispatch_attempts WHERE item_id IN ({in_list})")
                 != "0", timeout=10, what="a first failed attempt")
        cluster.gateway.kill()
        pending = psql(cluster, f"SELECT count(*) FROM outbox WHERE item_id IN ({in_list}) AND state = 'pending'")
        assert pending == "9", (pending, psql(cluster, f"SELECT state, attempts, last_error FROM outbox "
                                                       f"WHERE item_id IN ({in_list})"))
        for d in ("health", "hrss"):
            set_endpoint(cluster, d)
        cluster.gateway.start()
        for i in ids:
            wait_state(cluster, i, "in_review", timeout=20)
        keys = [dispatch_key(cluster, i) for i in ids]
        for k in keys:
            ok = dept.ok(k)
            assert len(ok) == 1, (k, dept.all(k))
        assert len({d[0] for k in keys for d in dept.ok(k)}) == 9
    finally:
        for d in ("health", "hrss"):
            set_endpoint(cluster, d)
        hold.close()


def test_commands_refuse_bad_endpoints_and_licences_are_only_the_holders(cluster):
    r = cluster.gateway.run("dept", "endpoint", "--dept", "health", "--url", "http://example.org/x", "--secret",
                            "0123456789abcdef")
    assert r.returncode == 2 and "IP address" in r.stderr, r.stderr
    r = cluster.gateway.run("dept", "endpoint", "--dept", "health", "--url", "http://127.0.0.1:1/x", "--secret", "short")
    assert r.returncode == 2 and "secret" in r.stderr, r.stderr
    r = cluster.gateway.run("dept", "endpoint", "--dept", "Health!", "--url", "none")
    assert r.returncode == 2, r.stderr
    # the secret is sealed, never stored in clear
    configure(cluster)
    secret = state(cluster)["secrets"]["health"]
    assert secret not in psql(cluster, "SELECT encode(secret_enc, 'escape') FROM dept_endpoints")
    # another citizen sees none of this family's licences
    fam = family(cluster)
    other = login(cluster, new_phone())
    r = call(cluster, other["access_token"], "/v1/me/licences")
    assert r.status == 200 and r.json() == {"licences": []}, r
    assert call(cluster, fam["token"], "/v1/me/licences").status == 200
