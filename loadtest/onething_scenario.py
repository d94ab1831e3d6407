#!/usr/bin/python3
"""Birth-bundle submissions and their dispatch lag (DESIGN.md target: >= 1 k applications/s; outbox-to-department
dispatch lag p99 < 1 s at that rate, against a department that answers at once).

Called by loadtest/run as the `python` scenario "onething-birth": measure(env, setting, opts). Standard library
only, plus the `openssl` command.

Preparation (once per cluster): 2 x C families, each a mother and a father in the registry (`cityhall import
registry`), a hospital birth record naming them, and the mother's citizen account bound to her by real name (SQL:
the SMS login is not what is measured); an access token per mother minted with the gateway's access key (what a
login would issue). Every department of the birth bundle gets an endpoint: the runner's bare libh2o server,
which answers 200 at once (`cityhall dept endpoint`).

A C x S setting runs C h2load processes of one connection and S streams each, each process POSTing its own
family's birth form (h2load sends the same headers and body every time: one process is one citizen; no
Idempotency-Key, so every request is a new application). The target setting is 128 x 1: 128 distinct citizens
with one submission in flight each, as the public submits; a few citizens each submitting many at once would
mostly measure the waits on their own access-log chain (every submission appends to it). The pre-check passes, so each answer is a 201 with
three items dispatched at once (birth certificate, vaccination certificate, maternity allowance) and three
blocked on them. The throughput run gives applications/s; a second run with other families gives the
submission latency. Dispatch lag: for every outbox row the throughput run created, delivered_at - created_at
(created in the submission's transaction, delivered when the department's 2xx came back), once the workers
drained the backlog; a row not delivered within 30 s counts as a problem.
"""

import datetime
import glob
import hashlib
import hmac
import json
import os
import random
import tempfile
import time

import h2load_kit as kit
import uuid

_prepared = {}  # cluster tmpdir -> [family]
BIRTH_DEPTS = ("health", "police-hukou", "medical-insurance", "hrss")
LAG_TARGET_MS = 1000
DRAIN_S = 30
_rng = random.Random(20261128)


def _id_number(birth, sex, used):
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    while True:
        first17 = f"440106{birth:%Y%m%d}{_rng.randrange(0, 500) * 2 + (1 if sex == 'M' else 0):03d}"
        n = first17 + "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights)) % 11]
        if n not in used:
            used.add(n)
            return n


SURNAMES = "赵钱孙李周吴郑王冯陈褚卫蒋沈韩杨朱秦尤许何吕施张孔曹严华金魏陶姜"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红"


def _name():
    return _rng.choice(SURNAMES) + "".join(_rng.choice(GIVEN) for _ in range(2))


def _form(f):
    return {"bundle_code": "birth", "consent": True, "fields": [{"name": k, "value": v} for k, v in (
        ("child.name", f["child"]), ("child.sex", "M"), ("child.birth_date", f["born"]),
        ("child.hospital", "广州市妇女儿童医疗中心"), ("child.birth_cert_no", f["cert"]),
        ("mother.name", f["mother"]), ("mother.id_number", f["mother_id"]), ("father.name", f["father"]),
        ("father.id_number", f["father_id"]), ("hukou.follow", "mother"), ("hukou.address", "广州市天河区天河路1号"),
        ("applicant.phone", f["phone"]), ("social_card.bank", "工商银行"), ("vaccine.clinic", "天河区妇幼保健院"),
        ("maternity.bank_account", "6222020200112233445"))]}


def prepare(env, n):
    """n families ready to submit; endpoints of the birth departments pointed at the bare server."""
    gw = env.gateway()
    pg = env.cluster_pg()
    have = _prepared.setdefault(gw.tmpdir, [])
    bare = env.server("bare")["url"]
    for dept in BIRTH_DEPTS:
        r = gw.run("dept", "endpoint", "--dept", dept, "--url", f"{bare}/{dept}/items", "--secret",
                   "loadtest-department-secret")
        if r.returncode != 0:
            raise RuntimeError(f"dept endpoint {dept} failed: {r.stderr[-300:]}")
    if len(have) >= n:
        return have[:n]
    var = gw.env["CITYHALL_VAR"]
    with open(os.path.join(var, "keys", "data.key")) as fh:
        mac_key = bytes.fromhex(fh.read().strip())[32:64]

    def id_hmac(number):
        return hmac.new(mac_key, b"id\0" + number.encode(), hashlib.sha256).hexdigest()

    used = set()
    born = datetime.date.today() - datetime.timedelta(days=12)
    fams = []
    for _ in range(n - len(have)):
        f = {"mother": _name(), "father": _name(), "born": f"{born:%Y-%m-%d}",
             "mother_id": _id_number(datetime.date(1990 + _rng.randrange(8), 1 + _rng.randrange(12),
                                                   1 + _rng.randrange(28)), "F", used),
             "father_id": _id_number(datetime.date(1988 + _rng.randrange(8), 1 + _rng.randrange(12),
                                                   1 + _rng.randrange(28)), "M", used),
             "cert": "L%09d" % _rng.randrange(10 ** 9), "phone": "139%08d" % _rng.randrange(10 ** 8),
             "citizen_id": str(uuid.uuid4())}
        f["child"] = f["mother"][0] + "小" + _rng.choice(GIVEN)
        fams.append(f)
    fd, path = tempfile.mkstemp(prefix="onething-registry-", suffix=".csv", dir=gw.tmpdir)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("id_number,name,sex,birth_date,region,address,household_id,phone\n")
        for f in fams:
            for who, sex in (("mother", "F"), ("father", "M")):
                num = f[who + "_id"]
                fh.write(f"{num},{f[who]},{sex},{num[6:10]}-{num[10:12]}-{num[12:14]},440106,"
                         f"广州市天河区天河路1号,,\n")
    r = gw.run("import", "registry", path, timeout=300)
    os.unlink(path)
    if r.returncode != 0:
        raise RuntimeError(f"import registry failed: {r.stderr[-300:]}")
    for k in range(0, len(fams), 40):  # a few statements per psql call (its command line has a size limit)
        _insert_families(pg, fams[k:k + 40], id_hmac)
    for f in fams:
        f["token"] = kit.mint_access_token(var, f["citizen_id"], sid=str(uuid.uuid4()))
        f["body"] = json.dumps(_form(f), ensure_ascii=False)
    # one submission each, to be sure the form passes the pre-check before anything is measured
    for f in fams[:1]:
        r = gw.request("/v1/onething/applications", method="POST", data=f["body"].encode(),
                       headers={"Authorization": f"Bearer {f['token']}", "Content-Type": "application/json"})
        if r.status != 201 or r.json().get("state") != "accepted":
            raise RuntimeError(f"a birth submission answered {r.status}: {r.text[:300]}")
    have += fams
    return have[:n]


def _insert_families(pg, fams, id_hmac):
    sql = ["BEGIN"]
    for f in fams:
        sql.append("INSERT INTO birth_records (cert_no, child_name, child_sex, child_birth_date, hospital, "
                   f"mother_id_hmac, father_id_hmac) VALUES ('{f['cert']}', '{f['child']}', 'M', '{f['born']}', "
                   f"'广州市妇女儿童医疗中心', decode('{id_hmac(f['mother_id'])}', 'hex'), "
                   f"decode('{id_hmac(f['father_id'])}', 'hex')) ON CONFLICT DO NOTHING")
        # the account (SMS login is not what is measured): phone sealed values are never opened here
        sql.append("INSERT INTO citizens (citizen_id, phone_hmac, phone_enc, registry_id, real_name_verified_at) "
                   f"SELECT '{f['citizen_id']}', decode('{os.urandom(32).hex()}', 'hex'), "
                   f"decode('{os.urandom(48).hex()}', 'hex'), resident_id, now() FROM registry_residents "
                   f"WHERE id_hmac = decode('{id_hmac(f['mother_id'])}', 'hex')")
    sql.append("COMMIT")
    pg.psql(";".join(sql), timeout=300)


def _run_h2loads(url, fams, streams, duration, warmup, workdir, log_dir=None, server_pids=None):
    """One h2load per family, with its own token and body. Returns (texts, cpu or None)."""
    jobs = []
    for i, f in enumerate(fams):
        body = os.path.join(workdir, f"onething-body-{i}.json")
        with open(body, "w", encoding="utf-8") as fh:
            fh.write(f["body"])
        jobs.append(["-d", body, "-H", f"authorization: Bearer {f['token']}", "-H", "content-type: application/json"])
    return kit.run_h2loads(url, jobs, streams, duration, warmup, log_dir, server_pids)


def dispatch_lag(pg, first_id, last_id):
    """Waits for the outbox rows (first_id, last_id] to be delivered (at most DRAIN_S); returns the lag figures."""
    deadline = time.monotonic() + DRAIN_S
    while True:
        pending = int(pg.psql(f"SELECT count(*) FROM outbox WHERE outbox_id > {first_id} AND outbox_id <= {last_id} "
                              "AND state = 'pending'"))
        if pending == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    lags = pg.psql(f"SELECT round(extract(epoch FROM delivered_at - created_at) * 1000, 1) FROM outbox "
                   f"WHERE outbox_id > {first_id} AND outbox_id <= {last_id} AND delivered_at IS NOT NULL")
    lag = sorted(float(x) for x in lags.split())
    return {"rows": last_id - first_id, "delivered": len(lag), "undelivered": pending,
            "p50_ms": kit.percentile(lag, 50), "p90_ms": kit.percentile(lag, 90), "p99_ms": kit.percentile(lag, 99),
            "max_ms": lag[-1] if lag else None}


def measure(env, setting, opts):
    conns, streams = (int(x) for x in setting.split("x"))
    fams = prepare(env, 2 * conns)
    gw = env.gateway()
    pg = env.cluster_pg()
    url = f"http://127.0.0.1:{gw.http_port}/v1/onething/applications"
    pids = {"gateway": gw.pid, "postgres": env.cluster.pg.pid, "redis": env.cluster.redis.pid,
            "department": env.bare_proc.pid}
    t = opts.timing
    first = int(pg.psql("SELECT coalesce(max(outbox_id), 0) FROM outbox"))
    texts, cpu = _run_h2loads(url, fams[:conns], streams, t["measure"], t["warmup"], opts.workdir, server_pids=pids)
    last = int(pg.psql("SELECT coalesce(max(outbox_id), 0) FROM outbox"))
    runs = [kit.summary(x) for x in texts]
    rps = sum(r["rps"] for r in runs)
    non2xx = sum(r["non2xx"] for r in runs)
    lag = dispatch_lag(pg, first, last)
    problems = sorted({f"h2load negotiated {r['protocol']}, not h2c" for r in runs if r["protocol"] != "h2c"})
    if lag["undelivered"]:
        problems.append(f"{lag['undelivered']} of {lag['rows']} dispatches not delivered within {DRAIN_S} s")
    if lag["p99_ms"] is None or lag["p99_ms"] >= LAG_TARGET_MS:
        problems.append(f"dispatch lag p99 {lag['p99_ms']} ms >= {LAG_TARGET_MS} ms")

    log_dir = os.path.join(opts.workdir, "onething-logs")
    os.makedirs(log_dir, exist_ok=True)
    for f in glob.glob(os.path.join(log_dir, "*.log")):
        os.unlink(f)  # h2load appends to an existing log
    texts2, _ = _run_h2loads(url, fams[conns:2 * conns], streams, t["latency"], t["latency_warmup"], opts.workdir,
                             log_dir)
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
    return {
        "rps": rps, "p50_ms": ms(kit.percentile(lat, 50)), "p99_ms": ms(kit.percentile(lat, 99)),
        "non2xx": non2xx + failed, "cpu_cores": cpu, "problems": problems,
        "dispatch_lag": lag, "families": 2 * conns,
        "throughput_run": {"processes": len(runs), "rps_each": [round(r["rps"]) for r in runs]},
        "latency_run": {"rps": sum(r["rps"] for r in lat_runs), "n": len(lat), "p90_ms": ms(kit.percentile(lat, 90)),
                        "max_ms": ms(lat[-1] if lat else None)},
    }
