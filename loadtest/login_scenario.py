#!/usr/bin/python3
"""Login throughput: SMS code check + token issue + session write, per second (target >= 5 k/s).

    loadtest/login_scenario.py [--n 20000] [--conns 64] [--depth 4] [--procs 2] [--threads 2]
                               [--pg-conns 2] [--returning] [--json]

Starts its own cluster (tests/harness.py: PostgreSQL with fsync on, Redis with AOF, the gateway with
--threads loops), then:

1. pre-generates N codes: POST /v1/auth/sms-code for N distinct phones. The per-address limit
   (20 codes per 10 minutes) is honoured, not bypassed: each batch of 20 comes from its own loopback
   source address (127.x.y.z, all routed to lo), which is what N distinct clients look like;
2. reads the codes from <var>/sms-outbox.jsonl;
3. fires the N logins (POST /v1/auth/login) as fast as the gateway answers: --procs processes, each with
   its share of --conns h2c connections, --depth streams in flight on each. Every
   login is a first login (the account is created); with --returning a second round logs the same
   citizens in again (the account exists; the codes of round two are sent after the one-a-minute keys
   are expired in Redis, as a minute passing would).

Prints logins/s (200s over the wall time from the first request to the last answer), status counts,
p50/p99 latency and the CPU each side used. Why not h2load: every login has its own body (phone and
code), and h2load sends one body for all requests; a minimal h2c client below does instead. The
generator is Python: if it uses much more than a core, the figure says more about the generator than
about the gateway (the CPU line shows it).

Also usable from loadtest/run: run_scenario(gateway_url, var_dir, redis_cli, n, ...) returns the figures
as a dict for a gateway already running.
"""

import argparse
import json
import multiprocessing
import os
import random
import selectors
import socket
import sys
import time
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SMS_PER_ADDRESS = 20  # the gateway's per-address limit per window (services/identity/login.c)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- a minimal h2c client

# h2load sends one body for every request; each login has its own (phone, code). This client speaks
# just enough HTTP/2 (prior knowledge) to keep many streams in flight per connection at little CPU
# cost: the request header block is the same for every request (HPACK literals without indexing, and
# every body of a round has the same length), so it is encoded once; answers are told apart by their
# body (a TokenResponse or {"retry_after_s"} versus {"error"}), so no HPACK decoding is needed.
# (HTTP/1.1 keep-alive is no option: the gateway closes an HTTP/1.1 connection after any POST it
# answers from an asynchronous callback.)

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS = 1, 1, 4


def _frame(ftype, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name, value):
    name, value = name.encode(), value.encode()
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _header_block(authority, path, length):
    return b"".join(_literal(k, v) for k, v in ((":method", "POST"), (":scheme", "http"), (":path", path),
                                                 (":authority", authority), ("content-type", "application/json"),
                                                 ("user-agent", "cityhall-loadtest"),
                                                 ("content-length", str(length))))


def _bodies(items):
    return [json.dumps(b, separators=(",", ":")).encode() for b in items]


def _ok_body(body):
    return not body.startswith(b'{"error"')


class _Conn:
    __slots__ = ("sock", "block", "bodies", "next", "open", "sent_at", "inbuf", "outbuf", "done", "rx")

    def __init__(self, sock, block, bodies):
        self.sock, self.block, self.bodies, self.next, self.open = sock, block, bodies, 0, 0
        self.sent_at, self.inbuf, self.outbuf, self.done, self.rx = {}, b"", b"", 0, {}


def run_connections(specs, port, authority, path, max_open, depth, results):
    """Runs connection specs [(source address or None, [body bytes])] (bodies of one length), at most
    max_open connections at once, each with up to `depth` streams in flight. Appends (ok, latency s,
    response body, request body) per answer to results. Returns (first send time, last answer time) on the monotonic clock."""
    sel = selectors.DefaultSelector()
    todo = list(reversed(specs))
    open_conns = 0
    first = last = None

    def start():
        nonlocal open_conns
        src, bodies = todo.pop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src:
            s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        c = _Conn(s, _header_block(authority, path, len(bodies[0])), bodies)
        # SETTINGS_INITIAL_WINDOW_SIZE 2^30 and a connection window as large: no WINDOW_UPDATE needed later
        c.outbuf = (_PREFACE + _frame(_SETTINGS, 0, 0, (4).to_bytes(2, "big") + (1 << 30).to_bytes(4, "big"))
                    + _frame(_WINDOW_UPDATE, 0, 0, ((1 << 30) - 65535).to_bytes(4, "big")))
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        open_conns += 1

    def fill(c):
        nonlocal first
        now = time.monotonic()
        out = []
        while c.next < len(c.bodies) and c.open < depth:
            sid = 2 * c.next + 1
            out.append(_frame(_HEADERS, _END_HEADERS, sid, c.block))
            out.append(_frame(_DATA, _END_STREAM, sid, c.bodies[c.next]))
            c.sent_at[sid] = now
            c.next += 1
            c.open += 1
            if first is None:
                first = now
        if out:
            c.outbuf += b"".join(out)

    while todo or open_conns:
        while todo and open_conns < max_open:
            start()
        for key, ev in sel.select(timeout=10):
            c = key.data
            if ev & selectors.EVENT_READ:
                data = c.sock.recv(262144)
                if not data:
                    raise RuntimeError("the gateway closed a connection early")
                c.inbuf += data
                now = time.monotonic()
                buf, pos = c.inbuf, 0
                while len(buf) - pos >= 9:
                    n = int.from_bytes(buf[pos:pos + 3], "big")
                    if len(buf) - pos < 9 + n:
                        break
                    ftype, flags = buf[pos + 3], buf[pos + 4]
                    sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                    payload = buf[pos + 9:pos + 9 + n]
                    pos += 9 + n
                    if ftype == _SETTINGS and not flags & _ACK:
                        c.outbuf += _frame(_SETTINGS, _ACK, 0)
                    elif ftype == _PING and not flags & _ACK:
                        c.outbuf += _frame(_PING, _ACK, 0, payload)
                    elif ftype == _GOAWAY:
                        raise RuntimeError(f"GOAWAY from the gateway: {payload[8:]!r}")
                    elif ftype == _RST:
                        raise RuntimeError(f"stream {sid} reset by the gateway")
                    elif sid and ftype in (_DATA, _HEADERS):
                        if ftype == _DATA:
                            c.rx[sid] = c.rx.get(sid, b"") + payload
                        if flags & _END_STREAM:
                            body = c.rx.pop(sid, b"")
                            results.append((_ok_body(body), now - c.sent_at.pop(sid), body, c.bodies[sid // 2]))
                            c.done += 1
                            c.open -= 1
                            last = now
                c.inbuf = buf[pos:]
                fill(c)
            if ev & selectors.EVENT_WRITE or c.outbuf:
                fill(c)
                if c.outbuf:
                    try:
                        n = c.sock.send(c.outbuf)
                    except BlockingIOError:
                        n = 0
                    c.outbuf = c.outbuf[n:]
            if c.done == len(c.bodies):
                sel.unregister(c.sock)
                c.sock.close()
                open_conns -= 1
            else:
                sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.outbuf else 0), c)
    return first, last


def _worker(args):
    specs, port, authority, path, max_open, depth, barrier = args
    results = []
    barrier.wait()
    t0, t1 = run_connections(specs, port, authority, path, max_open, depth, results)
    statuses = {}
    for ok, _, body, _ in results:
        k = "ok" if ok else _error_code(body)
        statuses[k] = statuses.get(k, 0) + 1
    sample = next((b for ok, _, b, _ in results if not ok), b"")[:300]
    return {"t0": t0, "t1": t1, "lat": [lat for _, lat, _, _ in results], "statuses": statuses,
            "cpu": sum(os.times()[:2]), "sample_error": sample.decode("utf-8", "replace")}


def _error_code(body):
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unparsed"


def fire(specs, port, authority, path, procs, conns, depth):
    """Runs the specs split over `procs` processes; returns the merged figures."""
    shares = [specs[i::procs] for i in range(procs)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(procs)
    with ctx.Pool(procs) as pool:
        outs = pool.map(_worker, [(s, port, authority, path, max(1, conns // procs), depth, barrier)
                                  for s in shares])
    lat = sorted(x for o in outs for x in o["lat"])
    statuses = {}
    for o in outs:
        for k, v in o["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    t0 = min(o["t0"] for o in outs if o["t0"] is not None)
    t1 = max(o["t1"] for o in outs if o["t1"] is not None)

    def pct(p):
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None

    return {"seconds": t1 - t0, "ok": statuses.get("ok", 0), "statuses": statuses,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lat[-1] * 1000 if lat else None,
            "generator_cpu_s": sum(o["cpu"] for o in outs),
            "sample_error": next((o["sample_error"] for o in outs if o["sample_error"]), "")}


# --------------------------------------------------------------------------- the scenario

def source_address(i):
    """The i-th loopback source address, 127.1.0.1 onwards (127.0.0.1 is left to everyone else)."""
    i += 1
    return f"127.{1 + i // 65025}.{(i // 255) % 255}.{1 + i % 255}"


def make_phones(n, seed=None):
    rng = random.Random(seed)
    phones = set()
    while len(phones) < n:
        phones.add("1" + rng.choice("3456789") + "".join(rng.choice("0123456789") for _ in range(9)))
    return sorted(phones)


def send_codes(port, host, phones, conns, first_address=0):
    reqs = _bodies({"phone": p} for p in phones)
    specs = [(source_address(first_address + i // SMS_PER_ADDRESS), reqs[i:i + SMS_PER_ADDRESS])
             for i in range(0, len(reqs), SMS_PER_ADDRESS)]
    results = []
    t0, t1 = run_connections(specs, port, host, "/v1/auth/sms-code", conns, SMS_PER_ADDRESS, results)
    bad = [b for ok, _, b, _ in results if not ok]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(phones)} sms-code requests failed, e.g. {bad[0]}")
    return len(results) / (t1 - t0)


def read_codes(var_dir, phones):
    wanted, codes = set(phones), {}
    with open(os.path.join(var_dir, "sms-outbox.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m["phone"] in wanted:
                codes[m["phone"]] = m["code"]
    missing = wanted - codes.keys()
    if missing:
        raise RuntimeError(f"{len(missing)} codes missing from the outbox")
    return codes


def login_round(port, host, phones, codes, procs, conns, depth):
    reqs = _bodies({"phone": p, "code": codes[p]} for p in phones)
    per = -(-len(reqs) // conns)
    specs = [(None, reqs[i:i + per]) for i in range(0, len(reqs), per)]
    return fire(specs, port, host, "/v1/auth/login", procs, conns, depth)


def run_scenario(gateway_url, var_dir, redis_cli=None, n=20000, procs=2, conns=32, depth=16, returning=False,
                 cpu_pids=(), seed=None):
    """Measures logins/s against a running gateway. redis_cli(*args) is needed for --returning (to end
    the one-a-minute window of each phone). cpu_pids: server PIDs whose CPU (with children) is reported."""
    u = urlparse(gateway_url)
    port, host = u.port, u.netloc
    phones = make_phones(n, seed)
    out = {"n": n, "procs": procs, "conns": conns, "depth": depth}
    out["sms_code_per_s"] = send_codes(port, host, phones, 64)
    codes = read_codes(var_dir, phones)
    rounds = [("first_login", phones)]
    if returning:
        rounds.append(("returning_login", phones))
    for name, ph in rounds:
        if name == "returning_login":
            # a minute passes: the one-a-minute keys (named by the keyed hash) expire
            keys = redis_cli("--scan", "--pattern", "id:{*}:resend").split()
            for i in range(0, len(keys), 1000):
                redis_cli("DEL", *keys[i:i + 1000])
            send_codes(port, host, ph, 64, first_address=-(-n // SMS_PER_ADDRESS))
            codes = read_codes(var_dir, ph)
        before = [_cpu([p]) for p in cpu_pids]
        r = login_round(port, host, ph, codes, procs, conns, depth)
        after = [_cpu([p]) for p in cpu_pids]
        secs = r["seconds"] if r["seconds"] > 0 else float("nan")
        r["logins_per_s"] = r["ok"] / r["seconds"] if r["seconds"] > 0 else 0.0
        r["server_cpu_cores"] = (sum(after) - sum(before)) / secs
        r["server_cpu_split"] = [round((a - b) / secs, 2) for a, b in zip(after, before)]
        r["generator_cpu_cores"] = r["generator_cpu_s"] / r["seconds"] if r["seconds"] > 0 else None
        out[name] = r
    return out


# The login's durable write alone, as pgbench runs it: the reference for the login figure (the same
# statement as services/identity/login.c's stmt_login, one login per transaction, random keys).
PGBENCH_LOGIN = """\\set r random(1, 2000000000)
WITH c AS (INSERT INTO citizens (citizen_id, phone_hmac, phone_enc)
  VALUES (gen_random_uuid(), sha256(('p' || :r || random())::bytea), sha256(('e' || :r)::bytea) || sha256(('f' || :r)::bytea))
  ON CONFLICT (phone_hmac) DO UPDATE SET last_login_at = now() RETURNING citizen_id, real_name_verified_at IS NOT NULL AS verified),
 s AS (INSERT INTO sessions (session_id, role, subject, expires_at, client)
  SELECT gen_random_uuid(), 'citizen', c.citizen_id::text, now() + interval '12 hours', 'pgbench' FROM c RETURNING session_id),
 r AS (INSERT INTO refresh_tokens (token_hash, session_id) SELECT sha256(('t' || :r || random())::bytea), s.session_id FROM s
  RETURNING session_id)
SELECT c.citizen_id::text, c.verified FROM c, r;
"""


def pgbench_reference(pg_port, tmpdir, clients, seconds=5):
    """Transactions/s of the login's write alone: pgbench -M prepared with `clients` connections."""
    import subprocess
    script = os.path.join(tmpdir, "login-write.sql")
    with open(script, "w") as f:
        f.write(PGBENCH_LOGIN)
    r = subprocess.run(["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds),
                        "-f", script, "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "cityhall"],
                       capture_output=True, text=True, timeout=seconds + 60)
    tps = [float(line.split("=")[1].split()[0]) for line in r.stdout.splitlines() if line.startswith("tps")]
    if r.returncode != 0 or not tps:
        raise RuntimeError(f"pgbench failed: {r.stdout}{r.stderr}")
    return tps[0]


def _cpu(pids):
    total, todo, seen = 0, [p for p in pids if p], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="logins (distinct phones) per round")
    ap.add_argument("--conns", type=int, default=32, help="h2c connections in total")
    ap.add_argument("--depth", type=int, default=16, help="streams in flight per connection")
    ap.add_argument("--procs", type=int, default=2, help="generator processes")
    ap.add_argument("--threads", type=int, default=2, help="gateway event loops")
    ap.add_argument("--pg-conns", type=int, default=0, help="PostgreSQL connections per loop (0: default)")
    ap.add_argument("--returning", action="store_true", help="a second round with existing accounts")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the pgbench run of the login's write alone (threads x pg_conns clients)")
    args = ap.parse_args()

    import harness
    env = {"CITYHALL_MAX_REQUESTS_PER_CONNECTION": "0"}  # h2load does not reconnect after a GOAWAY
    if args.pg_conns:
        env["CITYHALL_PG_CONNS"] = args.pg_conns
    cluster = harness.Cluster(threads=args.threads, env=env).start()  # keys init, migrate, serve
    try:
        gw = cluster.gateway
        out = run_scenario(gw.url("/"), gw.env["CITYHALL_VAR"], cluster.redis.cli, args.n, args.procs,
                           args.conns, args.depth, args.returning,
                           cpu_pids=(gw.pid, cluster.pg.pid, cluster.redis.pid))
        if not args.no_reference:
            clients = args.threads * int(gw.env.get("CITYHALL_PG_CONNS", 2))
            out["reference"] = {"what": "pgbench, the login's write alone", "clients": clients,
                                "tps": pgbench_reference(cluster.pg.port, cluster.tmpdir, clients)}
    finally:
        cluster.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"sms-code (pre-generation, {args.n} phones from {-(-args.n // SMS_PER_ADDRESS)} addresses): "
          f"{out['sms_code_per_s']:.0f}/s")
    for name in ("first_login", "returning_login"):
        r = out.get(name)
        if r is None:
            continue
        print(f"{name}: {r['logins_per_s']:.0f} logins/s ({r['ok']} ok in {r['seconds']:.2f} s; "
              f"statuses {r['statuses']}); p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; "
              f"cpu: servers {r['server_cpu_cores']:.2f} cores (gateway, postgres, redis: "
              f"{r['server_cpu_split']}), generator {r['generator_cpu_cores']:.2f} cores "
              f"[{args.conns} conns x {args.depth} streams, {args.procs} procs]")
        if r["sample_error"]:
            print(f"  e.g. {r['sample_error']}")
        verdict = "PASS" if r["logins_per_s"] >= 5000 else "MISS"
        ref = out.get("reference")
        vs = (f"; {r['logins_per_s'] / ref['tps']:.2f} x pgbench running the same write with "
              f"{ref['clients']} clients ({ref['tps']:.0f} tps)") if ref else ""
        print(f"  target >= 5000/s: {verdict}{vs}")


if __name__ == "__main__":
    main()
