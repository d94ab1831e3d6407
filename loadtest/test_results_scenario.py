#!/usr/bin/python3
"""POST /v1/health/test-results: test-result rows applied per second, counted from the request to the moment every
code it touches is recomputed (target >= 50 000 rows/s; services/healthcode/inputs.c and recompute.c).

Called by loadtest/run as the `python` scenario "hc-test-results": measure(env, setting, opts). Standard library
only. A setting CxS runs C clients, each with one batch in flight at a time, ROUNDS batches in all; S is ignored.

Preparation (once per cluster): `cityhall import registry` of ROUNDS x BATCH residents, each batch's residents in
a home region of their own (so the end of one batch's recompute can be seen on its own), and a department client
(`cityhall client add`, POST /v1/auth/client-token).

Each batch is sent as protobuf (10 000 rows are ~0.6 MB in protobuf, ~1.1 MB in JSON, over the default 1 MiB body
limit), 5 % positives. Its end is seen by PostgreSQL itself: one psql runs a loop that polls every 2 ms until no
queue row of the batch's region is due and every resident of it has a code, then prints the database clock, so the
poll costs no client round trips. rows/s = rows / (end of the last batch - start of the first).
"""

import concurrent.futures
import datetime
import os
import random
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

BATCH = 10000
ROUNDS = 4
WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
_prepared = {}


def _id_numbers(n, rng):
    out, seen = [], set()
    while len(out) < n:
        born = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(0, 20000))
        first17 = f"530102{born:%Y%m%d}{rng.randrange(0, 1000):03d}"
        num = first17 + "10X98765432"[sum(int(c) * w for c, w in zip(first17, WEIGHTS)) % 11]
        if num not in seen:
            seen.add(num)
            out.append(num)
    return out


def _prepare(env):
    import harness
    gw = env.gateway()
    if gw.tmpdir in _prepared:
        return _prepared[gw.tmpdir]
    rng = random.Random(20261128)
    numbers = _id_numbers(ROUNDS * BATCH, rng)
    batches = []
    fd, path = tempfile.mkstemp(prefix="registry-", suffix=".csv", dir=gw.tmpdir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("id_number,name,sex,birth_date,region,address,household_id,phone\n")
        for b in range(ROUNDS):
            region = "53%04d" % (9000 + b)
            chunk = numbers[b * BATCH:(b + 1) * BATCH]
            batches.append((region, chunk))
            for num in chunk:
                f.write(f"{num},负载测试,{'M' if int(num[16]) % 2 else 'F'},{num[6:10]}-{num[10:12]}-{num[12:14]},"
                        f"{region},云南省测试路1号,,\n")
    try:
        r = gw.run("import", "registry", path, timeout=600)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        raise RuntimeError(f"cityhall import registry failed: {r.stderr[-300:]}")
    client_id = "loadtest-lab-%06d" % rng.randrange(1000000)
    r = gw.run("client", "add", "--client-id", client_id, "--dept", "health")
    if r.returncode != 0:
        raise RuntimeError(f"cityhall client add failed: {r.stderr[-300:]}")
    secret = dict(re.findall(r"^\s+([a-z ]+):\s+(\S+)$", r.stdout, re.M))["client secret"]
    r = gw.request("/v1/auth/client-token", method="POST", json={"client_id": client_id, "client_secret": secret})
    if r.status != 200:
        raise RuntimeError(f"client-token: {r.status} {r.text[:200]}")
    token = r.json()["access_token"]
    bodies = []
    now = int(time.time())
    for region, chunk in batches:
        rows = [{1: num, 2: {1: now - 3 * 3600 - i % 600}, 3: "positive" if i % 20 == 0 else "negative",
                 4: "loadtest-lab"} for i, num in enumerate(chunk)]
        bodies.append((region, harness.pb_encode({1: rows})))
    _prepared[gw.tmpdir] = (token, bodies)
    return _prepared[gw.tmpdir]


def _wait_done(pg, region, timeout_s=120):
    """Blocks until every resident of `region` has a code and none has a due queue row; returns that moment (Unix s,
    database clock)."""
    sql = (f"DO $$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN LOOP "
           f"EXIT WHEN NOT EXISTS (SELECT 1 FROM hc_recompute_queue q JOIN registry_residents r USING (resident_id) "
           f"  WHERE r.region = '{region}' AND q.due_at <= now()) "
           f"AND NOT EXISTS (SELECT 1 FROM registry_residents r LEFT JOIN health_codes h USING (resident_id) "
           f"  WHERE r.region = '{region}' AND h.resident_id IS NULL); "
           f"IF clock_timestamp() - t0 > interval '{timeout_s} seconds' THEN RAISE EXCEPTION 'not recomputed'; END IF; "
           f"PERFORM pg_sleep(0.002); END LOOP; END $$; SELECT extract(epoch FROM clock_timestamp())")
    return float(pg.psql(sql, timeout=timeout_s + 10).splitlines()[-1])


def measure(env, setting, opts):
    import harness
    clients = int(setting.split("x")[0])
    token, bodies = _prepare(env)
    gw, pg = env.gateway(), env.cluster_pg()
    url = gw.url("/v1/health/test-results")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf",
               "Accept": "application/json"}
    latencies, acks, non2xx = [], [], 0

    def one(body):
        region, data = body
        t0 = time.time()
        r = harness.curl(url, method="POST", headers=headers, data=data, timeout=120)
        t_ack = time.time()
        if r.status != 200:
            return t0, t_ack, None, r.status
        return t0, t_ack, _wait_done(pg, region), r.status

    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as ex:
        results = list(ex.map(one, bodies))
    end = max((r[2] for r in results if r[2] is not None), default=time.time())
    for t0, t_ack, done, status in results:
        if done is None:
            non2xx += 1
            continue
        latencies.append((done - t0) * 1000)
        acks.append((t_ack - t0) * 1000)
    latencies.sort()
    rows = BATCH * (len(bodies) - non2xx)
    pick = lambda p: latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] if latencies else None
    return {"rps": rows / (end - start), "p50_ms": pick(50), "p99_ms": pick(99), "non2xx": non2xx,
            "batches": len(bodies), "rows_per_batch": BATCH, "ack_ms": acks, "recomputed_ms": latencies,
            "problems": [] if non2xx == 0 else [f"{non2xx} batches were not accepted"]}
