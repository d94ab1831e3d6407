"""A personal-data audit against real PostgreSQL, Redis and the gateway: every flow runs once (SMS login, real-name
binding, dependents, staff login and acting for a citizen, health declarations, test results, quarantine orders,
confirmed cases, check-ins, paper codes, appeals decided by two staff members, the one-thing form, submission,
dispatch to a department system, callbacks, staff decisions, supplements, the access log), then the raw ID numbers
and phone numbers used are looked for in the gateway log, in every Redis key and value, in every column of every
table and in every file of the data folder (the development SMS outbox excepted: it stands for the SMS provider).
None may be there: ID numbers are kept sealed (AES-256-GCM) next to a keyed hash, phone numbers likewise, and only
masked forms are shown. Run by tests/run.py.

The flows run once per cluster (the first test to need them runs them); each test then audits one store."""

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import os
import random
import socket
import socketserver
import threading
import time
import uuid

import harness
from harness import wait_for

CLUSTER = {"threads": 2, "env": {"CITYHALL_DISPATCH_BACKOFF_MS": 100, "CITYHALL_DISPATCH_POLL_MS": 200}}
TIMEOUT = 240

REGION = "440106"
ADDRESS = "广州市天河区天河路1号"
# Columns allowed to hold a raw ID or phone number. None: the registry and the department datasets keep keyed
# hashes and sealed values only (sql/migrations/0003 and 0008); add a column here only with a reason.
ALLOWED_COLUMNS = set()

_rng = random.SystemRandom()
_runs = {}  # cluster tmpdir -> what the flows used


# --------------------------------------------------------------------------- people

def person(name, sex, birth, phone=""):
    return {"name": name, "sex": sex, "birth": birth, "id": harness.new_id_number(REGION, birth, sex), "phone": phone}


def import_registry(cluster, people):
    harness.import_registry(cluster.gateway, [
        (p["id"], p["name"], p["sex"], p["birth"], REGION, ADDRESS, "", p["phone"]) for p in people])


# --------------------------------------------------------------------------- HTTP

def call(cluster, token, path, method="GET", body=None, headers=None, expect=None):
    h = {"Authorization": f"Bearer {token}"} if token else {}
    h.update(headers or {})
    r = cluster.gateway.request(path, method=method, json=body, headers=h)
    if expect is not None:
        assert r.status == expect, (method, path, r)
    return r


def sms_login(cluster, phone):
    return harness.sms_login(cluster.gateway, phone)


def staff_login(cluster, dept):
    return harness.staff_token(cluster.gateway, dept)["token"]


def dept_login(cluster, dept):
    return harness.client_token(cluster.gateway, dept)["token"]


class Department:
    """A department system on 127.0.0.1 that accepts every delivery (200) and keeps nothing."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 2

            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", "0")))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, dept):
        return f"http://127.0.0.1:{self.server.server_address[1]}/{dept}/items"


def kiosk_session(cluster, p):
    """Registers a kiosk (`cityhall kiosk add`) and opens a citizen session for p from a signed ID-card read:
    {"token", "payload"}."""
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, utils
    except ImportError:
        raise harness.Skip("python3-cryptography is not installed (apt-get install python3-cryptography)")
    device_id = "pii-" + uuid.uuid4().hex[:10]
    key = ec.generate_private_key(ec.SECP256R1())
    path = os.path.join(cluster.tmpdir, f"{device_id}.pub.pem")
    with open(path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    r = cluster.gateway.run("kiosk", "add", "--device-id", device_id, "--hall", "tianhe-hall", "--public-key", path)
    assert r.returncode == 0, r.stdout + r.stderr
    claims = {"device_id": device_id, "id_number": p["id"], "name": p["name"], "face_score": 0.95,
              "nonce": os.urandom(16).hex(), "ts": int(time.time())}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    rr, ss = utils.decode_dss_signature(key.sign(payload.encode(), ec.ECDSA(hashes.SHA256())))
    sig = base64.urlsafe_b64encode(rr.to_bytes(32, "big") + ss.to_bytes(32, "big")).rstrip(b"=").decode()
    r = call(cluster, None, "/v1/kiosk/sessions", "POST", {"device_id": device_id, "payload": payload,
                                                          "signature": sig}, expect=200)
    return {"token": r.json()["access_token"], "payload": payload}


def callback(cluster, dept, secret, body):
    raw = json.dumps(body).encode()
    t = str(int(time.time()))
    sig = hmac.new(secret.encode(), t.encode() + b"." + raw, hashlib.sha256).hexdigest()
    r = cluster.gateway.request(f"/v1/departments/{dept}/callbacks", method="POST", data=raw,
                                headers={"content-type": "application/json", "x-cityhall-signature": f"t={t},v1={sig}"})
    assert r.status == 200, r
    return r.json()


def item_state(cluster, item_id):
    return cluster.pg.psql(f"SELECT state FROM application_items WHERE item_id = '{item_id}'")


def wait_item(cluster, item_id, want):
    wait_for(lambda: item_state(cluster, item_id) == want, timeout=20,
             what=f"item {item_id} {want} (is {item_state(cluster, item_id)})")


# --------------------------------------------------------------------------- the flows, once

def run_flows(cluster):
    today = datetime.date.today()
    mother = person("陈晓燕", "F", datetime.date(1992, 4, 11), harness.new_phone())
    father = person("林国栋", "M", datetime.date(1990, 8, 2), harness.new_phone())
    kid = person("林小雨", "F", today - datetime.timedelta(days=9 * 365))
    elder = person("王秀英", "F", datetime.date(1948, 3, 9), harness.new_phone())      # has no phone account
    other = person("黄志明", "M", datetime.date(1985, 12, 30))
    other["phone"] = harness.new_phone()                                              # an account, not in the registry
    people = [mother, father, kid, elder, other]
    import_registry(cluster, [mother, father, kid, elder, dict(other, phone="")])
    child = {"name": "林小宝", "birth": today - datetime.timedelta(days=12), "cert": "P%09d" % _rng.randrange(10 ** 9)}
    cluster.pg.psql("INSERT INTO birth_records (cert_no, child_name, child_sex, child_birth_date, hospital, "
                    f"mother_id_hmac, father_id_hmac) VALUES ('{child['cert']}', '{child['name']}', 'M', "
                    f"'{child['birth']:%Y-%m-%d}', '广州市妇女儿童医疗中心', decode('{harness.id_hmac(cluster.gateway, mother['id'])}', "
                    f"'hex'), decode('{harness.id_hmac(cluster.gateway, father['id'])}', 'hex'))")

    # identity: SMS login, real name, dependents, sessions, refresh
    m = sms_login(cluster, mother["phone"])
    tok = m["access_token"]
    call(cluster, tok, "/v1/me/real-name", "POST", {"id_number": mother["id"], "name": mother["name"]}, expect=200)
    harness.same_household(cluster.gateway, m["citizen_id"], kid["id"])
    dep = call(cluster, tok, "/v1/me/dependents", "POST", {"id_number": kid["id"], "name": kid["name"],
                                                           "relation": "child"}, expect=201).json()
    call(cluster, tok, "/v1/me/dependents", expect=200)
    call(cluster, tok, "/v1/me", expect=200)
    call(cluster, tok, "/v1/me/sessions", expect=200)
    o = sms_login(cluster, other["phone"])
    call(cluster, o["access_token"], "/v1/me/real-name", "POST", {"id_number": other["id"], "name": other["name"]},
         expect=200)
    refreshed = call(cluster, None, "/v1/auth/refresh", "POST", {"refresh_token": o["refresh_token"]}, expect=200)
    other_tok = refreshed.json()["access_token"]

    # staff acting for a citizen who is present
    health_staff, health_staff2 = staff_login(cluster, "health"), staff_login(cluster, "health")
    d = call(cluster, health_staff, "/v1/staff/delegations", "POST",
             {"id_number": mother["id"], "name": mother["name"], "purpose": "帮办健康码"}, expect=200).json()
    call(cluster, d["access_token"], "/v1/health/code", expect=200)
    call(cluster, d["access_token"], "/v1/me", expect=200)

    # a kiosk session opened from an ID-card read (the attestation carries the raw number, base64url-encoded)
    payload = kiosk_session(cluster, mother)
    call(cluster, payload["token"], "/v1/health/code", expect=200)

    # health code: declarations, test results, quarantine, confirmed case, venues and check-ins
    call(cluster, tok, "/v1/health/declarations", "POST", {"temperature_c": 36.6, "symptoms": []}, expect=201)
    call(cluster, tok, "/v1/health/declarations", "POST", {"temperature_c": 36.5, "dependent_id": str(dep["dependent_id"])})
    call(cluster, tok, "/v1/health/code", expect=200)
    call(cluster, tok, "/v1/health/code.png", expect=200)
    call(cluster, tok, f"/v1/me/dependents/{dep['dependent_id']}/health-code")
    authority = dept_login(cluster, "health")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    call(cluster, authority, "/v1/health/test-results", "POST", {"results": [
        {"id_number": mother["id"], "sample_time": now, "result": "negative", "lab": "gz-kingmed"},
        {"id_number": kid["id"], "sample_time": now, "result": "negative", "lab": "gz-kingmed"}]}, expect=200)
    call(cluster, authority, "/v1/health/quarantine-orders", "POST",
         {"id_number": elder["id"], "kind": "order", "at": now, "place": "天河区隔离点"}, expect=200)
    call(cluster, authority, "/v1/health/quarantine-orders", "POST",
         {"id_number": elder["id"], "kind": "release", "at": now, "place": "天河区隔离点"}, expect=200)
    venue = call(cluster, health_staff, "/v1/venues", "POST",
                 {"name": "天河城", "region": REGION, "address": ADDRESS}, expect=201).json()
    call(cluster, tok, f"/v1/venues/{venue['venue_id']}/checkins", "POST", {}, expect=201)
    call(cluster, tok, f"/v1/venues/{venue['venue_id']}/checkins", "POST", {"dependent_id": str(dep["dependent_id"])},
         expect=201)
    call(cluster, other_tok, f"/v1/venues/{venue['venue_id']}/checkins", "POST", {}, expect=201)
    call(cluster, authority, "/v1/health/confirmed-cases", "POST", {"id_number": other["id"], "confirmed_at": now},
         expect=200)
    code = call(cluster, tok, "/v1/health/code", expect=200).json()
    call(cluster, None, "/v1/health/verify", "POST", {"token": code["token"]}, expect=200)

    # an appeal, decided by two staff members
    wait_for(lambda: call(cluster, other_tok, "/v1/health/code").json().get("color") == "red", timeout=15,
             what="the confirmed case's code turning red")
    appeal = call(cluster, other_tok, "/v1/health/appeals", "POST", {"reason": "我已核酸检测阴性"}, expect=201).json()
    call(cluster, health_staff, "/v1/staff/health/appeals", expect=200)
    call(cluster, health_staff, f"/v1/staff/health/appeals/{appeal['appeal_id']}/proposal", "POST",
         {"decision": "approve", "color": "green", "note": "复核"}, expect=200)
    call(cluster, health_staff2, f"/v1/staff/health/appeals/{appeal['appeal_id']}/approval", "POST",
         {"approve": True, "note": "同意"}, expect=200)

    # a paper code for the resident without a phone, then revoked
    paper = call(cluster, health_staff, "/v1/staff/health/paper-codes", "POST",
                 {"id_number": elder["id"], "name": elder["name"]}, expect=201).json()
    call(cluster, None, "/v1/health/verify", "POST", {"token": paper["token"]}, expect=200)
    call(cluster, health_staff, f"/v1/staff/health/paper-codes/{paper['paper_id']}/revocation", "POST")

    # one thing: the form, a submission dispatched to health's system, callbacks, staff decisions, a supplement
    department = Department()
    secret = "pii-" + uuid.uuid4().hex
    r = cluster.gateway.run("dept", "endpoint", "--dept", "health", "--url", department.url("health"), "--secret", secret)
    assert r.returncode == 0, r.stdout + r.stderr
    for dept in ("police-hukou", "hrss", "medical-insurance"):
        r = cluster.gateway.run("dept", "endpoint", "--dept", dept, "--url", "none")
        assert r.returncode == 0, r.stdout + r.stderr
    call(cluster, tok, "/v1/onething/bundles", expect=200)
    call(cluster, tok, "/v1/onething/bundles/birth/form", expect=200)
    form = {"child.name": child["name"], "child.sex": "M", "child.birth_date": f"{child['birth']:%Y-%m-%d}",
            "child.hospital": "广州市妇女儿童医疗中心", "child.birth_cert_no": child["cert"], "mother.name": mother["name"],
            "mother.id_number": mother["id"], "father.name": father["name"], "father.id_number": father["id"],
            "hukou.follow": "mother", "hukou.address": ADDRESS, "applicant.phone": mother["phone"],
            "social_card.bank": "工商银行", "vaccine.clinic": "天河区妇幼保健院",
            "maternity.bank_account": "6222020200112233445"}
    app = call(cluster, tok, "/v1/onething/applications", "POST",
               {"bundle_code": "birth", "consent": True, "fields": [{"name": k, "value": v} for k, v in form.items()]},
               headers={"Idempotency-Key": uuid.uuid4().hex}, expect=201).json()
    assert app["state"] == "accepted", app
    its = {i["item_code"]: i["item_id"] for i in app["items"]}
    for code in ("BIRTH_CERT", "VACCINE_CERT"):
        wait_item(cluster, its[code], "in_review")
        callback(cluster, "health", secret, {"item_id": its[code], "decision": "approve",
                                             "callback_id": uuid.uuid4().hex})
    staff_of = {d: staff_login(cluster, d) for d in ("police-hukou", "hrss", "medical-insurance")}
    wait_item(cluster, its["HUKOU_REG"], "in_review")
    call(cluster, staff_of["police-hukou"], "/v1/staff/tasks", expect=200)
    call(cluster, staff_of["police-hukou"], f"/v1/staff/tasks/{its['HUKOU_REG']}/decision", "POST",
         {"decision": "request_supplement", "reason": "请核对户籍地址", "fields": ["hukou.address"]}, expect=200)
    call(cluster, tok, f"/v1/onething/applications/{app['application_id']}/supplements", "POST",
         {"fields": [{"name": "hukou.address", "value": ADDRESS}]}, expect=200)
    wait_item(cluster, its["HUKOU_REG"], "in_review")
    for dept, codes in (("police-hukou", ["HUKOU_REG"]), ("hrss", ["MATERNITY", "SOCIAL_CARD"]),
                        ("medical-insurance", ["MED_INS"])):
        for code in codes:
            wait_item(cluster, its[code], "in_review")
            call(cluster, staff_of[dept], "/v1/staff/tasks", expect=200)
            call(cluster, staff_of[dept], f"/v1/staff/tasks/{its[code]}/decision", "POST", {"decision": "approve"},
                 expect=200)
    wait_for(lambda: cluster.pg.psql(f"SELECT state FROM applications WHERE application_id = "
                                     f"'{app['application_id']}'") == "completed", timeout=20, what="completion")
    call(cluster, tok, "/v1/onething/applications", expect=200)
    call(cluster, tok, f"/v1/onething/applications/{app['application_id']}", expect=200)
    call(cluster, tok, "/v1/me/licences", expect=200)
    call(cluster, tok, "/v1/me/notifications", expect=200)
    call(cluster, tok, "/v1/health/notices", expect=200)
    # the access log, after the outbox's deliveries reached it
    wait_for(lambda: "onething.dispatch" in cluster.pg.psql("SELECT string_agg(action, ',') FROM access_log"),
             timeout=10, what="the department's read in the access log")
    call(cluster, tok, "/v1/me/access-log", expect=200)
    # refusals, which must not log or store what they refused either
    stranger = person("赵无名", "M", datetime.date(1979, 6, 1), harness.new_phone())
    people.append(stranger)
    call(cluster, other_tok, "/v1/me/real-name", "POST", {"id_number": stranger["id"], "name": "赵无名"})
    call(cluster, tok, "/v1/me/dependents", "POST", {"id_number": stranger["id"], "name": "赵无名", "relation": "child"})
    call(cluster, health_staff, "/v1/staff/delegations", "POST",
         {"id_number": mother["id"], "name": "别人", "purpose": "帮办"})
    call(cluster, health_staff, "/v1/staff/health/paper-codes", "POST", {"id_number": stranger["id"], "name": "赵无名"})
    call(cluster, authority, "/v1/health/test-results", "POST", {"results": [
        {"id_number": stranger["id"], "sample_time": now, "result": "positive", "lab": "gz-kingmed"}]})
    call(cluster, authority, "/v1/health/confirmed-cases", "POST", {"id_number": stranger["id"], "confirmed_at": now})
    call(cluster, None, "/v1/auth/sms-code", "POST", {"phone": stranger["phone"] + "9"})
    call(cluster, None, "/v1/auth/login", "POST", {"phone": stranger["phone"], "code": "000000"})
    call(cluster, tok, "/v1/onething/applications", "POST",
         {"bundle_code": "birth", "consent": True, "fields": [{"name": "mother.id_number", "value": stranger["id"]},
                                                              {"name": "applicant.phone", "value": stranger["phone"]}]})
    call(cluster, tok, "/v1/auth/logout", "POST", expect=204)
    time.sleep(1.5)  # let the loops flush their log buffers and the workers finish (SMS, access log)

    ids = {p["id"] for p in people}
    phones = {p["phone"] for p in people if p["phone"]}
    return {"ids": ids, "phones": phones, "payloads": {payload["payload"]}}


def used(cluster):
    """What run_flows used; a failure of the flows is raised again to every test rather than run again."""
    if cluster.tmpdir not in _runs:
        try:
            _runs[cluster.tmpdir] = run_flows(cluster)
        except (AssertionError, harness.CurlError, RuntimeError) as e:
            _runs[cluster.tmpdir] = e
    if isinstance(_runs[cluster.tmpdir], Exception):
        raise AssertionError(f"the flows did not all run: {_runs[cluster.tmpdir]}")
    return _runs[cluster.tmpdir]


def needles(cluster):
    """{label: [byte strings to look for]}: each number as text and as the hex text of its bytes."""
    u = used(cluster)
    out = {}
    for kind, values in (("ID number", u["ids"]), ("phone number", u["phones"])):
        for v in values:
            out[f"{kind} {v[:3]}…{v[-2:]}"] = [v.encode(), v.encode().hex().encode()]
    for v in u["payloads"]:
        out["kiosk attestation payload"] = [v[:40].encode()]
    return out


def found_in(data, ndl):
    return sorted(label for label, forms in ndl.items() if any(f in data for f in forms))


# --------------------------------------------------------------------------- Redis, without redis-cli per key

class Resp:
    """A minimal RESP2 client over one socket (binary-safe, for SCAN and the read commands)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "redis closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            assert chunk, "redis closed the connection"
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise AssertionError(f"redis error: {rest!r}")
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise AssertionError(f"unexpected RESP {line!r}")

    def cmd(self, *args):
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return self._reply()


def flatten(reply):
    if reply is None:
        return b""
    if isinstance(reply, list):
        return b"\n".join(flatten(r) for r in reply)
    return reply


# --------------------------------------------------------------------------- the audits

def test_no_raw_id_or_phone_number_in_the_gateway_or_postgresql_log(cluster):
    ndl = needles(cluster)
    log = cluster.gateway.log_text().encode()
    assert len(log) > 10000, "the gateway log is suspiciously short"
    assert found_in(log, ndl) == [], [
        line[:300] for line in log.decode("utf-8", "replace").splitlines()
        if found_in(line.encode(), ndl)][:5]
    # PostgreSQL's own log: the errors of refused statements must not carry their parameters either
    with open(cluster.pg.logpath, "rb") as f:
        pg_log = f.read()
    assert found_in(pg_log, ndl) == [], [line[:300] for line in pg_log.decode("utf-8", "replace").splitlines()
                                         if found_in(line.encode(), ndl)][:5]


def test_no_raw_id_or_phone_number_in_any_redis_key_or_value(cluster):
    ndl = needles(cluster)
    r = Resp(cluster.redis.port)
    readers = {b"string": lambda k: r.cmd("GET", k), b"hash": lambda k: r.cmd("HGETALL", k),
               b"set": lambda k: r.cmd("SMEMBERS", k), b"zset": lambda k: r.cmd("ZRANGE", k, 0, -1, "WITHSCORES"),
               b"list": lambda k: r.cmd("LRANGE", k, 0, -1), b"stream": lambda k: r.cmd("XRANGE", k, "-", "+")}
    cursor, keys = b"0", []
    while True:
        cursor, batch = r.cmd("SCAN", cursor, "COUNT", 1000)
        keys += batch
        if cursor == b"0":
            break
    assert len(keys) > 10, f"only {len(keys)} Redis keys after every flow"
    leaks = []
    for k in keys:
        kind = r.cmd("TYPE", k)
        if kind == b"none":
            continue  # expired meanwhile
        assert kind in readers, (k, kind)
        value = flatten(readers[kind](k))
        where = found_in(k, ndl) + found_in(value, ndl)
        if where:
            leaks.append((k.decode("utf-8", "replace")[:80], kind.decode(), where))
    assert leaks == [], leaks


def test_no_raw_id_or_phone_number_in_any_column_outside_the_allow_list(cluster):
    ndl = needles(cluster)
    cols = cluster.pg.psql("SELECT table_schema, table_name, column_name FROM information_schema.columns c "
                           "JOIN information_schema.tables t USING (table_schema, table_name) "
                           "WHERE t.table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', "
                           "'information_schema') ORDER BY 1, 2, 3").splitlines()
    assert len(cols) > 100, cols
    pattern = "|".join(f.decode() for forms in ndl.values() for f in forms)
    checks = []
    for line in cols:
        schema, table, column = line.split("|")
        checks.append(f"SELECT '{schema}.{table}.{column}' FROM \"{schema}\".\"{table}\" "
                      f"WHERE \"{column}\"::text ~ '{pattern}' LIMIT 1")
    hits = set()
    for i in range(0, len(checks), 100):
        out = cluster.pg.psql("(" + ") UNION ALL (".join(checks[i:i + 100]) + ")", timeout=120)
        hits |= {h for h in out.splitlines() if h}
    leaks = sorted(hits - ALLOWED_COLUMNS)
    detail = {}
    for col in leaks:
        schema, table, column = col.split(".")
        sample = cluster.pg.psql(f"SELECT left(\"{column}\"::text, 400) FROM \"{schema}\".\"{table}\" "
                                 f"WHERE \"{column}\"::text ~ '{pattern}' LIMIT 1")
        detail[col] = found_in(sample.encode(), ndl)
    assert leaks == [], detail


def test_no_raw_id_or_phone_number_in_the_data_folder_but_the_sms_outbox(cluster):
    ndl = needles(cluster)
    var = cluster.gateway.env["CITYHALL_VAR"]
    leaks, seen = [], 0
    for root, _, files in os.walk(var):
        for name in files:
            path = os.path.join(root, name)
            if os.path.relpath(path, var) == "sms-outbox.jsonl" or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read(64 << 20)
            seen += 1
            if found_in(data, ndl):
                leaks.append((os.path.relpath(path, var), found_in(data, ndl)))
    assert seen > 0 and leaks == [], leaks
    # the outbox is the development SMS provider: it does hold the phone numbers, and nothing else of the person
    with open(os.path.join(var, "sms-outbox.jsonl"), "rb") as f:
        outbox = f.read()
    assert found_in(outbox, {k: v for k, v in ndl.items() if k.startswith("ID")}) == []
