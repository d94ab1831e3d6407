#!/usr/bin/python3
"""GET /v1/health/code by many distinct citizens (DESIGN.md target: >= 0.5 x the bare libh2o handler, p99 < 10 ms).

Called by loadtest/run as the `python` scenarios "health-code" (2 000 seeded citizens) and "health-code-100k"
(100 000): measure(env, setting, opts, citizens=N). Standard library only, plus the `openssl` command.

Preparation (once per cluster and size, before anything is measured):

1. `cityhall seed --citizens N` (the synthetic registry);
2. every seeded resident gets a citizen account bound to it by real name, and a health_codes row (mostly green,
   some yellow and red with reasons), in bulk with SQL: the display path reads what R's recompute writes;
3. access tokens are minted for a sample of those citizens with the gateway's own access key (`openssl dgst
   -sign`, the raw r||s signature rebuilt from its DER): what a login would have issued, without 2 000 SMS logins.

Why several h2load processes: h2load sends the same headers on every request, so one h2load is one citizen.
A C x S setting runs C h2load processes of one connection and S streams each, every process with its own
citizen's token: C distinct citizens in flight at once, the same C x S requests in flight as the bare
reference's single h2load. The throughput run and the latency run use two disjoint sets of citizens, so the
latency run starts on cold per-thread caches for its citizens (their first requests fill from Redis or
PostgreSQL and sign) and its p99 includes that. Measured on this 2-CPU VM with bare: 32 h2load processes of
1 connection gave 557 k req/s where one h2load of 32 connections gave 486-861 k in the same minute (noise):
the shape costs the generator little, so the ratio is taken against the usual bare row.

What the ratio mostly measures: every request carries a ~400-byte bearer token, and nghttp2 (h2load, like most
HTTP/2 clients) never indexes Authorization in HPACK, so h2o Huffman-decodes it on every request; perf puts a
quarter of the gateway's CPU in that decoder, and `ping-with-token` (GET /v1/system/ping with the same header)
costs the gateway about as much as the health code. The row's JSON therefore also records the bare handler
loaded exactly the same way (`bare_same_shape_rps`, `ratio_to_bare_same_shape`).
"""

import base64
import glob
import json
import os
import random
import re
import subprocess
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_prepared = {}  # (cluster tmpdir, n) -> [(citizen_id, token)]


def _b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _der_to_raw(der):
    """ECDSA-Sig-Value (SEQUENCE { INTEGER r, INTEGER s }) to 64 bytes r || s."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        v = der[i + 2:i + 2 + n].lstrip(b"\0")
        out += v.rjust(32, b"\0")
        i += 2 + n
    return out


def mint_access_token(var_dir, citizen_id, ttl=3600):
    """An access token for `citizen_id` signed with the gateway's newest access key (as login would issue)."""
    ring = os.path.join(var_dir, "keys", "access")
    kid = sorted(f[:-4] for f in os.listdir(ring) if f.endswith(".pem"))[-1]
    now = int(time.time())
    head = _b64(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": kid}, separators=(",", ":")).encode())
    claims = {"iss": "cityhall", "aud": "cityhall-api", "iat": now, "exp": now + ttl, "sub": citizen_id,
              "sid": citizen_id, "role": "citizen", "jti": _b64(os.urandom(16))}
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", os.path.join(ring, kid + ".pem")],
                         input=f"{head}.{body}".encode(), capture_output=True, check=True).stdout
    return f"{head}.{body}.{_b64(_der_to_raw(der))}"


def prepare(env, n, sample):
    """Seeds n residents, binds an account to each, writes their codes; returns `sample` (citizen_id, token)."""
    gw = env.gateway()
    pg = env.cluster_pg()
    key = (gw.tmpdir, n)
    if key in _prepared and len(_prepared[key]) >= sample:
        return _prepared[key][:sample]
    t0 = time.monotonic()
    r = gw.run("seed", "--citizens", str(n), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"cityhall seed --citizens {n} failed: {r.stderr[-500:]}")
    # one account per resident without one, bound by real name (phone columns: placeholders of the right shape)
    pg.psql("INSERT INTO citizens (citizen_id, phone_hmac, phone_enc, registry_id, real_name_verified_at) "
            "SELECT gen_random_uuid(), sha256(convert_to('loadtest-' || r.resident_id, 'UTF8')), "
            "       decode(repeat('00', 40), 'hex'), r.resident_id, now() "
            "FROM registry_residents r WHERE NOT EXISTS (SELECT 1 FROM citizens c WHERE c.registry_id = r.resident_id)",
            timeout=600)
    # codes as recompute writes them: 90 % green, 7 % yellow (symptoms), 3 % red (a positive test)
    red = ('[{"code":"POSITIVE_TEST","data_source":"lab:gz-lab-01","as_of":"2026-11-28T08:00:00Z",'
           '"rule_version":1,"detail":"a positive nucleic acid test"}]')
    yellow = ('[{"code":"SYMPTOMS","data_source":"declaration","as_of":"2026-11-28T08:00:00Z","rule_version":1,'
              '"detail":"declared symptoms"}]')
    pg.psql("INSERT INTO health_codes (resident_id, color, reasons, rule_version, as_of, version) "
            "SELECT resident_id, "
            "       CASE WHEN resident_id % 100 < 3 THEN 'red' WHEN resident_id % 100 < 10 THEN 'yellow' ELSE 'green' END, "
            f"      CASE WHEN resident_id % 100 < 3 THEN '{red}'::jsonb "
            f"           WHEN resident_id % 100 < 10 THEN '{yellow}'::jsonb ELSE '[]'::jsonb END, "
            "       1, now() - interval '2 hours', 1 "
            "FROM registry_residents ON CONFLICT (resident_id) DO NOTHING", timeout=600)
    pg.psql("ANALYZE citizens; ANALYZE health_codes; ANALYZE registry_residents", timeout=600)
    rows = pg.psql(f"SELECT citizen_id FROM citizens WHERE registry_id IS NOT NULL ORDER BY random() LIMIT {sample}",
                   timeout=120).split()
    var_dir = gw.env["CITYHALL_VAR"]
    out = [(cid, mint_access_token(var_dir, cid)) for cid in rows]
    _prepared[key] = out
    print(f"  (health-code: {n} citizens seeded, bound and given codes, {len(out)} tokens, "
          f"{time.monotonic() - t0:.1f} s)", flush=True)
    return out


# --------------------------------------------------------------------------- CPU accounting

def _cpu(pid, descendants=True):
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except OSError:
            continue
        if descendants:
            for t in glob.glob(f"/proc/{p}/task/*/children"):
                try:
                    with open(t) as f:
                        todo += [int(x) for x in f.read().split()]
                except OSError:
                    pass
    return total


def _idle():
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return (int(parts[4]) + int(parts[5])) / _CLK_TCK


# --------------------------------------------------------------------------- running h2load processes

def _run_h2loads(url, citizens, streams, duration, warmup, log_dir=None, server_pids=None):
    """One h2load per citizen (1 connection, `streams` streams). Returns (texts, cpu dict or None)."""
    procs = []
    for i, (_, token) in enumerate(citizens):
        cmd = ["h2load", "-c", "1", "-m", str(streams), "-t", "1", "-D", f"{round(duration * 1000)}ms",
               "--warm-up-time", f"{round(warmup * 1000)}ms", "-H", f"authorization: Bearer {token}"]
        if log_dir:
            cmd.append(f"--log-file={os.path.join(log_dir, f'h2load-{i}.log')}")
        procs.append(subprocess.Popen(cmd + [url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    cpu = None
    if server_pids is not None:
        time.sleep(warmup + 0.1)
        t0, i0 = time.monotonic(), _idle()
        s0 = {k: _cpu(p) for k, p in server_pids.items()}
        g0 = sum(_cpu(p.pid, False) for p in procs)
        time.sleep(max(0.2, duration - 0.2))
        wall = time.monotonic() - t0
        s1 = {k: _cpu(p) for k, p in server_pids.items()}
        g1 = sum(_cpu(p.pid, False) for p in procs)
        idle = (_idle() - i0) / wall
        parts = {k: (s1[k] - s0[k]) / wall for k in s0}
        srv, gen = sum(parts.values()), (g1 - g0) / wall
        cpu = {"server": round(srv, 2), "generator": round(gen, 2),
               "other": round(max(0.0, (os.cpu_count() or 1) - idle - srv - gen), 2), "idle": round(idle, 2)}
        cpu.update({"server." + k: round(v, 2) for k, v in parts.items()})
    texts = [p.communicate(timeout=duration + warmup + 60)[0].decode("utf-8", "replace") for p in procs]
    return texts, cpu


def _summary(text):
    m = re.search(r"^finished in ([0-9.]+)(m?s), ([0-9.]+) req/s", text, re.M)
    if not m:
        raise RuntimeError("h2load did not finish: " + " / ".join(text.strip().splitlines()[-4:]))
    out = {"rps": float(m.group(3))}
    m = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", text, re.M)
    s = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if m and s:
        out["non2xx"] = int(m.group(3)) - int(s.group(1)) + int(m.group(6)) + int(m.group(7))
    p = re.search(r"^Application protocol: (\S+)", text, re.M)
    out["protocol"] = p.group(1) if p else None
    return out


def _percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


def measure(env, setting, opts, citizens=2000):
    conns, streams = (int(x) for x in setting.split("x"))
    sample = prepare(env, citizens, 2 * conns)
    gw = env.gateway()
    url = f"http://127.0.0.1:{gw.http_port}/v1/health/code"
    pids = {"gateway": gw.pid, "postgres": env.cluster.pg.pid, "redis": env.cluster.redis.pid}
    t = opts.timing
    texts, cpu = _run_h2loads(url, sample[:conns], streams, t["measure"], t["warmup"], server_pids=pids)
    runs = [_summary(x) for x in texts]
    rps = sum(r["rps"] for r in runs)
    non2xx = sum(r.get("non2xx", 0) for r in runs)
    problems = sorted({f"h2load negotiated {r['protocol']}, not h2c" for r in runs if r["protocol"] != "h2c"})

    log_dir = os.path.join(opts.workdir, "health-code-logs")
    os.makedirs(log_dir, exist_ok=True)
    for f in glob.glob(os.path.join(log_dir, "*.log")):
        os.unlink(f)  # h2load appends to an existing log
    texts2, _ = _run_h2loads(url, sample[conns:2 * conns], streams, t["latency"], t["latency_warmup"], log_dir)
    lat_runs = [_summary(x) for x in texts2]
    lat, failed = [], 0
    for f in glob.glob(os.path.join(log_dir, "*.log")):
        with open(f, "rb") as fh:
            for line in fh:
                parts = line.split(b"\t")
                if len(parts) < 3:
                    continue
                status = int(parts[1])
                if status < 0 or not 200 <= status < 300:
                    failed += 1
                if status >= 0:
                    lat.append(int(parts[2]))
        if not opts.keep:
            os.unlink(f)
    lat.sort()
    ms = lambda v: None if v is None else v / 1000.0
    # For reading the ratio: the bare handler loaded the same way (one h2load per connection, each sending a
    # citizen's bearer token, which h2o Huffman-decodes on every request: nghttp2 never indexes Authorization).
    bare_url = env.server("bare")["url"] + "/"
    bare_texts, _ = _run_h2loads(bare_url, sample[:conns], streams, t["measure"], t["warmup"])
    bare_same_shape = sum(_summary(x)["rps"] for x in bare_texts)
    return {
        "rps": rps, "p50_ms": ms(_percentile(lat, 50)), "p99_ms": ms(_percentile(lat, 99)),
        "non2xx": non2xx + failed, "cpu_cores": cpu, "problems": problems,
        "citizens_seeded": citizens, "distinct_citizens": 2 * conns,
        "bare_same_shape_rps": bare_same_shape, "ratio_to_bare_same_shape": rps / bare_same_shape,
        "throughput_run": {"processes": len(runs), "rps_each": [round(r["rps"]) for r in runs]},
        "latency_run": {"rps": sum(r["rps"] for r in lat_runs), "n": len(lat), "p90_ms": ms(_percentile(lat, 90)),
                        "p999_ms": ms(_percentile(lat, 99.9)), "max_ms": ms(lat[-1] if lat else None)},
    }


def measure_100k(env, setting, opts):
    return measure(env, setting, opts, citizens=100000)
