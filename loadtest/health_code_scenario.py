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

import glob
import os
import time

import h2load_kit as kit

_prepared = {}  # (cluster tmpdir, n) -> [(citizen_id, token)]


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
    out = [(cid, kit.mint_access_token(var_dir, cid)) for cid in rows]
    _prepared[key] = out
    print(f"  (health-code: {n} citizens seeded, bound and given codes, {len(out)} tokens, "
          f"{time.monotonic() - t0:.1f} s)", flush=True)
    return out


def _run_h2loads(url, citizens, streams, duration, warmup, log_dir=None, server_pids=None):
    """One h2load per citizen, with its own token. Returns (texts, cpu dict or None)."""
    jobs = [["-H", f"authorization: Bearer {token}"] for _, token in citizens]
    return kit.run_h2loads(url, jobs, streams, duration, warmup, log_dir, server_pids)


def measure(env, setting, opts, citizens=2000):
    conns, streams = (int(x) for x in setting.split("x"))
    sample = prepare(env, citizens, 2 * conns)
    gw = env.gateway()
    url = f"http://127.0.0.1:{gw.http_port}/v1/health/code"
    pids = {"gateway": gw.pid, "postgres": env.cluster.pg.pid, "redis": env.cluster.redis.pid}
    t = opts.timing
    texts, cpu = _run_h2loads(url, sample[:conns], streams, t["measure"], t["warmup"], server_pids=pids)
    runs = [kit.summary(x) for x in texts]
    rps = sum(r["rps"] for r in runs)
    non2xx = sum(r.get("non2xx", 0) for r in runs)
    problems = sorted({f"h2load negotiated {r['protocol']}, not h2c" for r in runs if r["protocol"] != "h2c"})

    log_dir = os.path.join(opts.workdir, "health-code-logs")
    os.makedirs(log_dir, exist_ok=True)
    for f in glob.glob(os.path.join(log_dir, "*.log")):
        os.unlink(f)  # h2load appends to an existing log
    texts2, _ = _run_h2loads(url, sample[conns:2 * conns], streams, t["latency"], t["latency_warmup"], log_dir)
    lat_runs = [kit.summary(x) for x in texts2]
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
    bare_same_shape = sum(kit.summary(x)["rps"] for x in bare_texts)
    return {
        "rps": rps, "p50_ms": ms(kit.percentile(lat, 50)), "p99_ms": ms(kit.percentile(lat, 99)),
        "non2xx": non2xx + failed, "cpu_cores": cpu, "problems": problems,
        "citizens_seeded": citizens, "distinct_citizens": 2 * conns,
        "bare_same_shape_rps": bare_same_shape, "ratio_to_bare_same_shape": rps / bare_same_shape,
        "info": [f"the bare handler loaded the same way ({conns} h2load processes, each sending a citizen's token): "
                 f"{bare_same_shape:,.0f} req/s; the route is {rps / bare_same_shape:.2f}x that"],
        "throughput_run": {"processes": len(runs), "rps_each": [round(r["rps"]) for r in runs]},
        "latency_run": {"rps": sum(r["rps"] for r in lat_runs), "n": len(lat), "p90_ms": ms(kit.percentile(lat, 90)),
                        "p999_ms": ms(kit.percentile(lat, 99.9)), "max_ms": ms(lat[-1] if lat else None)},
    }


def measure_100k(env, setting, opts):
    return measure(env, setting, opts, citizens=100000)
