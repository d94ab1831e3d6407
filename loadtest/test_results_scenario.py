#!/usr/bin/python3
"""POST /v1/health/test-results: test-result rows applied per second, counted from the request to the moment every
code it touches is recomputed (target >= 50 000 rows/s; services/healthcode/inputs.c and recompute.c).

Called by loadtest/run as the `python` scenario "hc-test-results": measure(env, setting, opts). Standard library
only. A setting CxS runs C laboratory clients at once; S is ignored.

Preparation (once per cluster), the issue's setting "100 k seeded citizens with codes":
- `cityhall import registry` of ROUNDS x BATCH = 100 000 residents, each batch's residents in a home region of
  their own with consecutive resident ids (checked), so that the end of one batch's recompute can be seen on its
  own;
- every resident gets a code as the recompute writes it (green, no reasons, the active rule set's version): a
  result that leaves a code as it was costs the recompute less than a first code, and a province's residents have
  codes already;
- a department client (`cityhall client add`, POST /v1/auth/client-token).

Each batch is sent as protobuf (10 000 rows are ~0.6 MB in protobuf, ~1.1 MB in JSON, over the default 1 MiB body
limit), 5 % positives (those codes turn red: an update per positive). Each client sends its batches one after the
other, the next as soon as the previous one is acknowledged (committed), as a laboratory system uploading a day's
results would; the codes are recomputed by the background drainers meanwhile. rows/s = rows / (the moment the last
batch's codes are all recomputed - the first request's start).

A batch is recomputed when no queue row of its residents is due any more: its rows committed together with their
queue rows, so after the acknowledgement that is the only thing to wait for. One psql at a time polls for it
(every 2 ms, a range scan of the queue's primary key over the batch's resident ids: tens of microseconds), in the
order the batches were sent, and prints the database clock when it holds. Each batch's acknowledgement and
recompute times are in the JSON (ack_ms, recomputed_ms).
"""

import concurrent.futures
import datetime
import os
import queue
import random
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

BATCH = 10000
ROUNDS = 10
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
    t_prep = time.monotonic()
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
    pg = env.cluster_pg()
    ranges = {}
    for region, _ in batches:
        lo, hi, n = map(int, pg.psql(f"SELECT min(resident_id), max(resident_id), count(*) FROM registry_residents "
                                     f"WHERE region = '{region}'").split("|"))
        inside = int(pg.psql(f"SELECT count(*) FROM registry_residents WHERE resident_id BETWEEN {lo} AND {hi}"))
        if n != BATCH or hi - lo + 1 != BATCH or inside != BATCH:
            raise RuntimeError(f"region {region}: the batch's residents do not have consecutive ids")
        ranges[region] = (lo, hi)
    version = int(pg.psql("SELECT version FROM rule_sets WHERE active"))
    pg.psql("INSERT INTO health_codes (resident_id, color, reasons, rule_version, as_of, version) "
            f"SELECT resident_id, 'green', '[]'::jsonb, {version}, now() - interval '2 hours', 1 "
            "FROM registry_residents ON CONFLICT (resident_id) DO NOTHING", timeout=600)
    for table in ("registry_residents", "health_codes"):
        pg.psql(f"VACUUM ANALYZE {table}", timeout=600)
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
        bodies.append((ranges[region], harness.pb_encode({1: rows})))
    _prepared[gw.tmpdir] = (token, bodies)
    print(f"  (hc-test-results: {ROUNDS * BATCH} residents imported, with codes, "
          f"{time.monotonic() - t_prep:.1f} s)", flush=True)
    return _prepared[gw.tmpdir]


def _wait_done(pg, ids, timeout_s=120):
    """Blocks until no queue row of residents ids = (lo, hi) is due; returns that moment (Unix s, database clock)."""
    lo, hi = ids
    sql = (f"DO $$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN LOOP "
           f"EXIT WHEN NOT EXISTS (SELECT 1 FROM hc_recompute_queue "
           f"  WHERE resident_id BETWEEN {lo} AND {hi} AND due_at <= now()); "
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
    sent = queue.Queue()  # (batch index, request start, ack time, status), in the order of the acknowledgements

    def client(mine):
        for k in mine:
            ids, data = bodies[k]
            t0 = time.time()
            try:
                status = harness.curl(url, method="POST", headers=headers, data=data, timeout=120).status
            except Exception:  # noqa: BLE001 -- counted as not accepted; the poller must not wait for it
                status = 0
            sent.put((k, t0, time.time(), status))

    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as ex:
        futures = [ex.submit(client, list(range(c, len(bodies), clients))) for c in range(clients)]
        results = []
        for _ in bodies:  # one poller, batch after batch as they are acknowledged
            k, t0, t_ack, status = sent.get(timeout=300)
            done = _wait_done(pg, bodies[k][0]) if status == 200 else None
            results.append((t0, t_ack, done, status))
        for f in futures:
            f.result()
    end = max((r[2] for r in results if r[2] is not None), default=time.time())
    latencies, acks, non2xx = [], [], 0
    for t0, t_ack, done, status in results:
        if done is None:
            non2xx += 1
            continue
        latencies.append((done - t0) * 1000)
        acks.append((t_ack - t0) * 1000)
    rows = BATCH * (len(bodies) - non2xx)
    ordered = sorted(latencies)
    pick = lambda p: ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else None
    return {"rps": rows / (end - start), "p50_ms": pick(50), "p99_ms": pick(99), "non2xx": non2xx,
            "batches": len(bodies), "rows_per_batch": BATCH, "ack_ms": acks, "recomputed_ms": latencies,
            "acked_rows_per_s": rows / (max(r[1] for r in results) - start),
            "info": [f"rows acknowledged (committed) per second: {rows / (max(r[1] for r in results) - start):,.0f}; "
                     f"per batch, acknowledged after {sorted(acks)[len(acks) // 2]:.0f} ms and recomputed after "
                     f"{pick(50):.0f} ms (medians)"] if acks else [],
            "problems": [] if non2xx == 0 else [f"{non2xx} batches were not accepted"]}
