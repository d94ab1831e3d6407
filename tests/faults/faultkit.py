"""The fault suite's machinery: people and places to write for, an HTTP/2 load generator that retries every write
with its Idempotency-Key, the faults themselves, and the invariants checked after each one.

Used by tests/faults/faults.py (all faults, one table) and tests/faults/test_faults.py (one test per fault, the
short form run by tests/run.py). Talks to a harness.Cluster of real PostgreSQL, Redis and gateway on loopback.

The load: Profile.threads client threads, each with its own HTTP/2 connection (h2c prior knowledge, python3-h2 over
a raw socket), write one at a time, paced, choosing among a health declaration, a venue check-in and a one-thing
birth application. Every write has its own Idempotency-Key and is sent again with the same key and the same body after
a 503 (after its Retry-After), a 429, a 500, a refused or cut connection or a client timeout, until it is
acknowledged (2xx) or its deadline passes. Every attempt is recorded: key, status, Retry-After, latency, error kind.
A prober thread meanwhile displays health codes (GET /v1/health/code): of citizens who write nothing, whose codes
the gateway held before the fault, and of the writers; and asks GET /readyz (both stores answer) for the recovery
time."""

import importlib.util
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import harness

if importlib.util.find_spec("h2") is None:
    # Debian's python3-h2 (ops/dev) is pure Python, installed for /usr/bin/python3: let another python3 use it too
    sys.path.append("/usr/lib/python3/dist-packages")
try:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
except ImportError:
    h2 = None

REGION = "530102"  # Kunming: a region that neither `cityhall seed` nor the other suites use
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
MOTHER_PHONE = "19900000001"  # the demo mother of a newborn, from `cityhall seed`
EXTRA_BIRTH_FIELDS = {"social_card.bank": "工商银行", "maternity.bank_account": "6222020200112233445",
                      "vaccine.clinic": "天河区天园街社区卫生服务中心"}

_rng = random.SystemRandom()
_used_ids = set()
_used_phones = set()


class Profile:
    """How long and how hard one fault run is. The short form keeps the whole suite under about four minutes."""

    def __init__(self, full=False):
        self.full = full
        self.threads = 6
        self.pace_s = 0.2                         # pause between one thread's writes
        self.warm_s = 8.0 if full else 3.0        # load before the fault
        self.after_s = 15.0 if full else 7.0      # load after the dependency is back
        self.pause_s = 20.0 if full else 5.0      # SIGSTOP length
        self.down_s = 10.0 if full else 3.0       # how long a killed or stopped server stays down
        self.cuts = 40 if full else 12            # ss -K rounds, 0.25 s apart
        self.timeout_s = 10.0                     # per request, client side (the gateway's pg timeout is 3 s)
        self.deadline_s = 60.0 if full else 40.0  # per write: retried until acknowledged or this passes
        self.recovery_target_s = 5.0
        self.rss_growth_kb = 64 * 1024            # allowed growth of the gateway's RSS over one fault run


# --------------------------------------------------------------------------- people, places, logins

def login(cluster, phone):
    """A citizen's SMS login (harness.sms_login): {phone, token, citizen_id}."""
    r = harness.sms_login(cluster.gateway, phone)
    return {"phone": phone, "token": r["access_token"], "citizen_id": r["citizen_id"]}


def citizens(cluster, n):
    """n logged-in citizens, each bound to a fresh registry resident: [{phone, token, citizen_id}]."""
    people = [(harness.new_id_number(REGION, used=_used_ids), "测试" + "甲乙丙丁戊己庚辛壬癸"[i % 10]) for i in range(n)]
    harness.import_registry(cluster.gateway, [
        (number, name, "M" if int(number[16]) % 2 else "F", harness.id_birth_date(number), REGION, "云南省昆明市测试路1号",
         "", "") for number, name in people])
    out = []
    for number, name in people:
        who = login(cluster, harness.new_phone(_used_phones))
        harness.bind_real_name(cluster.gateway, who["token"], number, name)
        out.append(who)
    return out


def venue(cluster):
    """A new venue registered by a new health-department staff member; returns its id."""
    staff = harness.staff_token(cluster.gateway, dept="health")
    r = cluster.gateway.request("/v1/venues", method="POST", headers={"Authorization": f"Bearer {staff['token']}"},
                                json={"name": f"故障测试场所{_rng.randrange(10**6)}", "region": REGION,
                                      "address": "云南省昆明市五华区测试路2号"})
    assert r.status == 201, r
    return r.json()["venue_id"]


_seeded = set()


def mother(cluster):
    """The demo mother (`cityhall seed`, once per cluster), logged in, with her birth form's fields."""
    if cluster.tmpdir not in _seeded:
        r = cluster.gateway.run("seed", "--citizens", "300", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        _seeded.add(cluster.tmpdir)
    who = login(cluster, MOTHER_PHONE)
    r = cluster.gateway.request("/v1/onething/bundles/birth/form", headers={"Authorization": f"Bearer {who['token']}"})
    assert r.status == 200, r
    values = {f["name"]: f["value"] for f in r.json()["fields"] if f["value"]}
    values.update(EXTRA_BIRTH_FIELDS)
    who["birth_fields"] = [{"name": k, "value": v} for k, v in values.items()]
    return who


class Setup:
    """Who writes and where, fresh for each fault run: one citizen per load thread (declarations and check-ins),
    citizens who only display their code, a venue, the demo mother (one-thing applications)."""

    def __init__(self, cluster, profile, displayers=2):
        people = citizens(cluster, profile.threads + displayers)
        self.writers, self.displayers = people[:profile.threads], people[profile.threads:]
        self.venue_id = venue(cluster)
        self.mother = mother(cluster)
        self.prefix = "flt-" + uuid.uuid4().hex[:12] + "-"


# --------------------------------------------------------------------------- HTTP/2 client

class ClientError(Exception):
    """An attempt that ended without an HTTP response; .kind says how (refused, reset, closed, timeout, ...)."""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class H2:
    """One h2c (prior knowledge) connection; request() sends one request and waits for its whole answer."""

    def __init__(self, port, timeout):
        if h2 is None:
            raise harness.Skip("python3-h2 is not importable (run with /usr/bin/python3; ops/dev installs it)")
        self.port = port
        try:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=min(timeout, 5))
        except socket.timeout:
            raise ClientError("connect_timeout")
        except ConnectionRefusedError:
            raise ClientError("refused")
        except OSError as e:
            raise ClientError("connect_error", str(e))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.dead = False
        self._flush()

    def _flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def close(self):
        self.dead = True
        try:
            self.sock.close()
        except OSError:
            pass

    def request(self, method, path, headers=(), body=None, timeout=10.0):
        """(status, {header: value}, body bytes); raises ClientError (and leaves the connection dead)."""
        deadline = time.monotonic() + timeout
        try:
            sid = self.conn.get_next_available_stream_id()
            hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", f"127.0.0.1:{self.port}")]
            hdrs += list(headers)
            if body is not None:
                hdrs += [("content-type", "application/json"), ("content-length", str(len(body)))]
            self.conn.send_headers(sid, hdrs, end_stream=body is None)
            if body is not None:
                self.conn.send_data(sid, body, end_stream=True)
            self._flush()
            status, rh, chunks = None, {}, []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClientError("timeout", f"no answer within {timeout:g}s")
                self.sock.settimeout(left)
                data = self.sock.recv(65536)
                if not data:
                    raise ClientError("closed", "the server closed the connection")
                for ev in self.conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        rh = dict(ev.headers)
                        status = int(rh.pop(":status"))
                    elif isinstance(ev, h2.events.DataReceived):
                        if ev.stream_id == sid:
                            chunks.append(ev.data)
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        raise ClientError("stream_reset", f"error code {ev.error_code}")
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        if ev.last_stream_id is None or ev.last_stream_id < sid:
                            raise ClientError("goaway", f"error code {ev.error_code}")
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        self._flush()
                        return status, rh, b"".join(chunks)
                self._flush()
        except ClientError:
            self.close()
            raise
        except socket.timeout:
            self.close()
            raise ClientError("timeout", f"no answer within {timeout:g}s")
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as e:
            self.close()
            raise ClientError("reset", str(e))
        except OSError as e:
            self.close()
            raise ClientError("socket_error", str(e))
        except h2.exceptions.ProtocolError as e:
            self.close()
            raise ClientError("protocol_error", repr(e))


# --------------------------------------------------------------------------- the load

class Attempt:
    __slots__ = ("key", "op", "t0", "t1", "status", "retry_after", "kind", "body")

    def __init__(self, key, op, t0):
        self.key, self.op, self.t0 = key, op, t0
        self.t1 = self.status = self.retry_after = self.kind = self.body = None

    @property
    def latency(self):
        return self.t1 - self.t0

    @property
    def ok(self):
        return self.status is not None and 200 <= self.status < 300


class Write:
    """One logical write: its key, its body, its attempts, and what the answers said."""

    def __init__(self, op, key, path, body, scope):
        self.op, self.key, self.path, self.body, self.scope = op, key, path, body, scope
        self.attempts = []
        self.acked = False
        self.ids = set()      # the ids the 2xx answers carried (one, or the answer was wrong)
        self.wrong = []       # answers that were not what this write must get
        self.gave_up = None   # why it was never acknowledged


class Load:
    """Writer threads (one per Setup.writers), a display prober and a readiness prober, started by start() and
    stopped by stop() (writes in flight are still retried until acknowledged or past their deadline)."""

    def __init__(self, cluster, setup, profile):
        self.cluster, self.setup, self.p = cluster, setup, profile
        self.port = cluster.gateway.http_port
        self.writes = []
        self.probes = []  # displays: (t0, t1, status or None, kind)
        self.ready = []   # GET /readyz: (t0, t1, status)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seq = 0
        self.threads = []

    def start(self):
        for i, who in enumerate(self.setup.writers):
            t = threading.Thread(target=self._writer, args=(who,), name=f"writer-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        for fn in (self._prober, self._ready_prober):
            t = threading.Thread(target=fn, name=fn.__name__, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        self._stop.set()
        limit = time.monotonic() + self.p.deadline_s + self.p.timeout_s + 10
        for t in self.threads:
            t.join(max(0.1, limit - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"load threads did not finish: {stuck}"

    def _next_write(self, who):
        with self._lock:
            self._seq += 1
            n = self._seq
        roll = _rng.random()
        if roll < 0.4:
            op, path, scope = "declaration", "/v1/health/declarations", who
            body = {"temperature_c": round(36.0 + _rng.random(), 1), "symptoms": [""]}
        elif roll < 0.8:
            op, path, scope = "checkin", f"/v1/venues/{self.setup.venue_id}/checkins", who
            body = {}
        else:
            op, path, scope = "onething", "/v1/onething/applications", self.setup.mother
            body = {"bundle_code": "birth", "fields": scope["birth_fields"], "consent": True}
        w = Write(op, f"{self.setup.prefix}{op[0]}{n}", path, json.dumps(body).encode(), scope)
        with self._lock:
            self.writes.append(w)
        return w

    def _writer(self, who):
        conn = None
        while not self._stop.is_set():
            w = self._next_write(who)
            conn = self._complete(w, conn)
            self._stop.wait(self.p.pace_s)
        if conn is not None:
            conn.close()

    def _complete(self, w, conn):
        """Sends w until acknowledged or past its deadline; returns the connection to go on with."""
        deadline = time.monotonic() + self.p.deadline_s
        headers = [("authorization", f"Bearer {w.scope['token']}"), ("idempotency-key", w.key)]
        while True:
            a = Attempt(w.key, w.op, time.monotonic())
            w.attempts.append(a)
            wait = 0.0
            try:
                if conn is None or conn.dead:
                    conn = H2(self.port, self.p.timeout_s)
                    a.t0 = time.monotonic()
                status, rh, body = conn.request("POST", w.path, headers, w.body, self.p.timeout_s)
                a.t1, a.status, a.body = time.monotonic(), status, body
                a.retry_after = rh.get("retry-after")
            except ClientError as e:
                a.t1, a.kind = time.monotonic(), e.kind
                conn = None
                wait = 0.2
            if a.status is not None:
                if a.ok:
                    self._check_answer(w, a)
                    w.acked = True
                    return conn
                if a.status in (429, 503) or a.status >= 500:
                    try:
                        wait = min(float(a.retry_after or 1), 5.0)
                    except ValueError:
                        wait = 1.0
                else:
                    w.gave_up = f"{a.status} {a.body[:200]!r}"
                    return conn
            if time.monotonic() + wait >= deadline:
                w.gave_up = f"not acknowledged within {self.p.deadline_s:g}s"
                return conn
            time.sleep(wait)

    @staticmethod
    def _check_answer(w, a):
        try:
            doc = json.loads(a.body)
        except ValueError:
            w.wrong.append(f"{a.status} not JSON: {a.body[:200]!r}")
            return
        if a.status != 201:
            w.wrong.append(f"status {a.status}: {doc}")
        if w.op == "declaration":
            ok = doc.get("color") in ("green", "yellow", "red") and doc.get("code_id")
            ident = doc.get("code_id")
        elif w.op == "checkin":
            ident = doc.get("checkin_id")
            ok = UUID.match(ident or "") and isinstance(doc.get("code"), dict)
        else:
            ident = doc.get("application_id")
            ok = UUID.match(ident or "") and doc.get("items")
        if not ok:
            w.wrong.append(f"{a.status} {json.dumps(doc)[:300]}")
        w.ids.add(ident)

    def _prober(self):
        conn = None
        i = 0
        while not self._stop.is_set():
            # citizens who never wrote (their codes the gateway held before the fault), then the writers too:
            # a code must display from the gateway or from PostgreSQL whatever Redis does
            people = self.setup.displayers + self.setup.writers
            who = people[i % len(people)]
            i += 1
            t0 = time.monotonic()
            try:
                if conn is None or conn.dead:
                    conn = H2(self.port, self.p.timeout_s)
                status, _, body = conn.request("GET", "/v1/health/code", [("authorization", f"Bearer {who['token']}")],
                                               None, self.p.timeout_s)
                kind = None
                if status == 200 and b'"token"' not in body:
                    kind = "no token in the answer"
                self.probes.append((t0, time.monotonic(), status, kind))
            except ClientError as e:
                self.probes.append((t0, time.monotonic(), None, e.kind))
                conn = None
            self._stop.wait(0.1)
        if conn is not None:
            conn.close()

    def _ready_prober(self):
        """GET /readyz: both stores answered the gateway thread that took it (either: SO_REUSEPORT)."""
        conn = None
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if conn is None or conn.dead:
                    conn = H2(self.port, self.p.timeout_s)
                status, _, _ = conn.request("GET", "/readyz", [], None, self.p.timeout_s)
                self.ready.append((t0, time.monotonic(), status))
            except ClientError:
                self.ready.append((t0, time.monotonic(), None))
                conn = None
            self._stop.wait(0.1)
        if conn is not None:
            conn.close()


def warm_display(cluster, setup):
    """Each displayer's code is shown once before the fault, so that the gateway holds it."""
    for who in setup.displayers:
        r = cluster.gateway.request("/v1/health/code", headers={"Authorization": f"Bearer {who['token']}"})
        assert r.status == 200, r


# --------------------------------------------------------------------------- faults

def rss_kb(pid):
    """The resident set size of pid in KiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cut_connections(*ports):
    """Destroys every established TCP connection to or from the ports with `ss -K` (both ends of each: the
    kernel's SOCK_DESTROY aborts the socket and resets its peer); returns how many sockets it closed."""
    flt = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    r = subprocess.run(["ss", "-K", "-t", "-n", "state", "established", f"( {flt} )"], capture_output=True,
                       text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"ss -K failed ({r.returncode}): {r.stderr.strip()}")
    return max(0, len([ln for ln in r.stdout.splitlines() if ln.strip()]) - 1)


def ss_kill_works():
    """True if this kernel lets `ss -K` destroy a socket (CONFIG_INET_DIAG_DESTROY, CAP_NET_ADMIN)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port), timeout=2)
    s, _ = srv.accept()
    try:
        cut_connections(port)
        c.settimeout(1)
        try:
            return c.recv(1) == b""
        except OSError:
            return True
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return False
    finally:
        for x in (c, s, srv):
            x.close()


def fault_gateway_kill(cluster, p, note):
    cluster.gateway.kill()
    time.sleep(1.0)
    cluster.gateway.start()
    return time.monotonic()


def fault_pg_immediate(cluster, p, note):
    cluster.pg.stop("immediate")
    time.sleep(p.down_s)
    cluster.pg.start()
    return time.monotonic()


def fault_redis_kill(cluster, p, note):
    cluster.redis.kill()
    time.sleep(p.down_s)
    cluster.redis.start()
    return time.monotonic()


def _frozen(server, seconds):
    """SIGSTOPs the server for `seconds`, then SIGCONT; returns the moment it runs again."""
    server.pause()
    try:
        time.sleep(seconds)
    finally:
        server.resume()
    return time.monotonic()


def fault_pg_sigstop(cluster, p, note):
    return _frozen(cluster.pg, p.pause_s)


def fault_redis_sigstop(cluster, p, note):
    return _frozen(cluster.redis, p.pause_s)


def fault_cut(cluster, p, note):
    if not ss_kill_works():
        raise harness.Skip("ss -K cannot destroy sockets in this kernel (CONFIG_INET_DIAG_DESTROY)")
    note["cut"] = _cut_repeatedly(p, cluster.pg.port, cluster.redis.port)
    assert note["cut"] > 0, "ss -K found no connection of the gateway to PostgreSQL or Redis to cut"
    return time.monotonic()


def fault_cut_clients(cluster, p, note):
    if not ss_kill_works():
        raise harness.Skip("ss -K cannot destroy sockets in this kernel (CONFIG_INET_DIAG_DESTROY)")
    note["cut"] = _cut_repeatedly(p, cluster.gateway.http_port)
    return time.monotonic()


def _cut_repeatedly(p, *ports):
    """p.cuts rounds of ss -K, 0.25 s apart: often, so that some cuts catch writes in flight."""
    cut = 0
    for i in range(p.cuts):
        if i:
            time.sleep(0.25)
        cut += cut_connections(*ports)
    return cut


FAULTS = [
    ("gateway kill -9 + restart", fault_gateway_kill, "gateway"),
    ("pg stop -m immediate + start", fault_pg_immediate, "pg"),
    ("redis kill -9 + start", fault_redis_kill, "redis"),
    ("pg SIGSTOP/SIGCONT", fault_pg_sigstop, "pg"),
    ("redis SIGSTOP/SIGCONT", fault_redis_sigstop, "redis"),
    ("ss -K pg+redis connections", fault_cut, "cut"),
    ("ss -K client connections", fault_cut_clients, "clients"),
]


# --------------------------------------------------------------------------- one run and its invariants

def _rows(cluster, sql):
    out = cluster.pg.psql(sql)
    return [line.split("|") for line in out.splitlines() if line]


def _sql_list(values):
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values) or "NULL"


def run_fault(cluster, name, inject, kind, profile):
    """Runs the load around one fault and checks the invariants; returns a result dict (see table())."""
    setup = Setup(cluster, profile)
    warm_display(cluster, setup)
    t_db0 = cluster.pg.psql("SELECT now()")
    pid0 = cluster.gateway.pid
    log_from = len(cluster.gateway.log_text())
    load = Load(cluster, setup, profile)
    load.start()
    note = {}
    gw = cluster.gateway
    pid_up = pid0  # the gateway that must stay up: after a kill, the restarted one
    try:
        time.sleep(profile.warm_s)
        rss_before = rss_kb(gw.pid)
        t_fault = time.monotonic()
        t_back = inject(cluster, profile, note)
        pid_up = gw.pid
        time.sleep(profile.after_s)
    finally:
        crashed = [] if gw.running else [f"gateway exited (status {gw.proc.returncode})"]
        cluster.ensure_running()  # whatever happened, the writes in flight get their chance
        load.stop()
    if not crashed and gw.pid != pid_up:
        crashed.append("gateway restarted")
    rss_after = rss_kb(gw.pid)
    glog = gw.log_text()[log_from:]
    for pat in ("Assertion `", "Segmentation fault", "AddressSanitizer", "double_answer"):
        if pat in glog:
            crashed.append(f"gateway log mentions {pat!r}")
    return _verify(cluster, name, setup, load, t_db0, t_fault, t_back, note, rss_before, rss_after, crashed, profile)


def _verify(cluster, name, setup, load, t_db0, t_fault, t_back, note, rss_before, rss_after, crashed, p):
    writes = load.writes
    attempts = [a for w in writes for a in w.attempts]
    acked = [w for w in writes if w.acked]
    problems = []

    # every acknowledged write is stored exactly once, under the id its answer carried
    found = {}
    dec = {r[0]: int(r[1]) for r in _rows(cluster, f"SELECT idem_key, count(*) FROM declarations WHERE idem_key LIKE "
                                                   f"'{setup.prefix}%' GROUP BY idem_key")}
    cin = {r[0]: int(r[1]) for r in _rows(cluster, f"SELECT checkin_id, count(*) FROM checkins WHERE venue_id = "
                                                   f"'{setup.venue_id}' GROUP BY checkin_id")}
    app_ids = [i for w in acked if w.op == "onething" for i in w.ids if i]
    apps = {r[0]: int(r[1]) for r in _rows(cluster, f"SELECT application_id, count(*) FROM applications WHERE "
                                                    f"application_id IN ({_sql_list(app_ids)}) GROUP BY 1")}
    for w in acked:
        if w.op == "declaration":
            found[w.key] = dec.get(w.key, 0)
        else:
            ident = next(iter(w.ids)) if len(w.ids) == 1 else None
            found[w.key] = (cin if w.op == "checkin" else apps).get(ident, 0) if ident else 0
    once = sum(1 for n in found.values() if n == 1)
    lost = [k for k, n in found.items() if n == 0]

    # duplicates: more rows than committed keys (each keyed write commits its row and its key together)
    committed = {r[0]: int(r[1]) for r in _rows(cluster, f"SELECT substr(key, {len(setup.prefix) + 1}, 1), count(*) "
                                                         f"FROM idempotency_keys WHERE key LIKE '{setup.prefix}%' "
                                                         f"GROUP BY 1")}
    n_checkins = sum(cin.values())
    n_apps = int(cluster.pg.psql(f"SELECT count(*) FROM applications WHERE citizen_id = "
                                 f"'{setup.mother['citizen_id']}' AND submitted_at >= '{t_db0}'"))
    writers = _sql_list([w["citizen_id"] for w in setup.writers])
    n_decl = int(cluster.pg.psql(f"SELECT count(*) FROM declarations WHERE declared_by IN ({writers}) "
                                 f"AND declared_at >= '{t_db0}'"))
    # declarations keep their key in their own row (services/healthcode/inputs.c), the others in idempotency_keys
    dup = max(0, n_decl - len(dec)) + max(0, n_checkins - committed.get("c", 0)) + \
        max(0, n_apps - committed.get("o", 0))

    wrong = [(w.key, x) for w in writes for x in w.wrong] + [(w.key, f"several ids {w.ids}") for w in acked
                                                              if len(w.ids) != 1]
    unacked = [(w.key, w.gave_up) for w in writes if not w.acked]
    s500 = [a for a in attempts if a.status is not None and a.status >= 500 and a.status != 503]
    s503_no_ra = [a for a in attempts if a.status == 503 and not a.retry_after]
    non503 = [a for a in attempts if a.status is not None and not a.ok and a.status != 503]
    conn_errs = [a for a in attempts if a.status is None]
    timeouts = [a for a in conn_errs if a.kind == "timeout"]
    max_lat = max((a.latency for a in attempts), default=0.0)

    # recovery: from the dependency's return to the end of the last failed write or readiness probe (0 if none
    # failed after it); then writes must succeed again
    ends = [a.t1 for a in attempts if not a.ok] + [x[1] for x in load.ready if x[2] != 200]
    last_fail = max(ends, default=None)
    recovery = max(0.0, last_fail - t_back) if last_fail is not None else 0.0
    later_ok = any(a.ok and a.t0 >= (last_fail or 0) for a in attempts)

    probes_during = [x for x in load.probes if x[1] >= t_fault and x[0] <= t_back + recovery + 1]
    display_bad = [x for x in probes_during if x[2] != 200 or x[3]]

    res = {
        "fault": name, "writes": len(writes), "acked": len(acked), "once": once, "lost": len(lost), "dup": dup,
        "s500": len(s500), "non503": len(non503), "conn_errors": len(conn_errs), "timeouts": len(timeouts),
        "s503": sum(1 for a in attempts if a.status == 503), "s503_no_retry_after": len(s503_no_ra),
        "max_latency": max_lat, "recovery": recovery, "recovered": later_ok, "unacked": len(unacked),
        "wrong": len(wrong), "display_probes": len(probes_during), "display_bad": len(display_bad),
        "rss_before": rss_before, "rss_after": rss_after, "crashed": crashed, "note": note,
        "attempts": len(attempts),
        "samples": {"lost": lost[:5], "wrong": wrong[:5], "unacked": unacked[:5],
                    "non503": [(a.key, a.status, (a.body or b"")[:200]) for a in non503[:5]],
                    "conn_errors": sorted({a.kind for a in conn_errs}),
                    "display_bad": [(round(x[0] - t_fault, 2), x[2], x[3]) for x in display_bad[:5]]},
        "problems": problems,
    }
    return res


def violations(res, kind, p):
    """What this run broke of the reliability bar (DESIGN.md), as sentences; [] when nothing."""
    out = list(res["problems"])
    if res["acked"] == 0:
        out.append("no write was acknowledged")
    if res["lost"]:
        out.append(f"{res['lost']} acknowledged writes not found in PostgreSQL: {res['samples']['lost']}")
    if res["dup"]:
        out.append(f"{res['dup']} duplicated rows")
    if res["wrong"]:
        out.append(f"{res['wrong']} wrong answers: {res['samples']['wrong']}")
    if res["unacked"]:
        out.append(f"{res['unacked']} writes never acknowledged: {res['samples']['unacked']}")
    if res["s500"] or res["non503"]:
        out.append(f"{res['non503']} errors other than 503 ({res['s500']} of them 5xx): {res['samples']['non503']}")
    if res["s503_no_retry_after"]:
        out.append(f"{res['s503_no_retry_after']} 503 answers without Retry-After")
    if res["timeouts"]:
        out.append(f"{res['timeouts']} requests hung until the client's {p.timeout_s:g}s timeout")
    if res["conn_errors"] and kind not in ("gateway", "clients"):
        out.append(f"{res['conn_errors']} connection errors ({res['samples']['conn_errors']}) while the gateway was up")
    if res["recovery"] > p.recovery_target_s or not res["recovered"]:
        out.append(f"full success {res['recovery']:.1f}s after the dependency returned "
                   f"(target {p.recovery_target_s:g}s{'' if res['recovered'] else ', never'})")
    if kind == "redis" and res["display_bad"]:
        out.append(f"{res['display_bad']} of {res['display_probes']} code displays failed while Redis was out: "
                   f"{res['samples']['display_bad']}")
    if res["crashed"]:
        out.append(f"gateway: {res['crashed']}")
    if kind != "gateway" and res["rss_before"] and res["rss_after"] and \
            res["rss_after"] - res["rss_before"] > p.rss_growth_kb:
        out.append(f"gateway RSS grew from {res['rss_before']} to {res['rss_after']} KiB")
    return out


COLUMNS = ["fault", "writes acked", "found exactly once", "lost", "dup", "500s", "non-503 errors", "max latency",
           "recovery s", "gateway RSS before/after", "crashed", "503s", "conn errors", "display ok"]


def row(res):
    rss = f"{(res['rss_before'] or 0) // 1024}/{(res['rss_after'] or 0) // 1024} MiB"
    disp = f"{res['display_probes'] - res['display_bad']}/{res['display_probes']}"
    return [res["fault"], f"{res['acked']}/{res['writes']}", str(res["once"]), str(res["lost"]), str(res["dup"]),
            str(res["s500"]), str(res["non503"]), f"{res['max_latency']:.2f} s", f"{res['recovery']:.1f}", rss,
            "yes: " + "; ".join(res["crashed"]) if res["crashed"] else "no", str(res["s503"]),
            str(res["conn_errors"]), disp]


def table(results):
    """A Markdown table of the results, one row per fault."""
    rows = [COLUMNS] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
