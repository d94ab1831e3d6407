"""Venue check-ins for loadtest/run: the fixture behind the "checkin" row and its pgbench reference.

The target (DESIGN.md, "Targets"): check-ins >= 1.5 x pgbench running the same single-row INSERT with the same
number of clients. Both sides write the same rows into the same table (checkins, with its primary key and its two
time indexes), durably (synchronous_commit on, fsync on: tests/harness.py's PostgreSQL), with the same number of
writes in flight:

- pgbench: C clients, each one INSERT per transaction (-M prepared), so C commits in flight;
- the gateway: h2load with C connections x 1 stream, each POST /v1/venues/{id}/checkins acknowledged only after
  the transaction holding its row committed, so at most C check-ins in flight.

The gateway's request does more than the INSERT: token check, the citizen's resident, the venue, the citizen's
code (from the display cache) in the answer. What it saves is the commit per row: the check-ins of a loop thread
that arrive while its previous batch commits go to PostgreSQL as one multi-row INSERT in one transaction
(services/healthcode/venues.c), where pgbench pays one transaction per row.

Primary keys: the gateway makes time-ordered ids (UUIDv7); the reference makes ids of the same shape in SQL
(48 bits of milliseconds, then random bits), so that both insert at the right edge of the primary-key index.

Which setting is judged: 32x1. With C writes in flight, a closed loop runs at C / latency on both sides. At 32 both
keep the two CPUs busy (32 backends; 32 connections), so the ratio says how much work a durable row costs each
way, which is what group commit saves. At 16 (measured, shown as info) neither side saturates 2 CPUs when the
machine is otherwise idle, and the rate is bounded by the disk's flush latency for both: a commit cannot be
acknowledged before its WAL flush, and PostgreSQL already shares one flush among pgbench's concurrent commits.
"""

import json
import os
import time

# A venue and a resident of the load test only (outside what `cityhall seed` makes).
VENUE_ID = "5e1f0000-0000-4000-8000-00000000feed"
RESIDENT_ID = 900000001

PGBENCH_SQL = (
    "INSERT INTO checkins (checkin_id, venue_id, resident_id, at) VALUES "
    "((lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') "
    "|| substr(md5(random()::text), 1, 20))::uuid, "
    f"'{VENUE_ID}', {RESIDENT_ID}, now());"
)

_FIXTURE = f"""
INSERT INTO registry_residents (resident_id, id_hmac, id_enc, id_masked, name, region)
VALUES ({RESIDENT_ID}, sha256('cityhall loadtest resident'::bytea), '\\x00'::bytea, '1201**********0000', '测试者',
        '120101')
ON CONFLICT (resident_id) DO NOTHING;
INSERT INTO venues (venue_id, name, region, address)
VALUES ('{VENUE_ID}', '压测场所', '120101', '天津市和平区南京路1号')
ON CONFLICT (venue_id) DO NOTHING;
"""


def _outbox_code(var, phone):
    try:
        with open(os.path.join(var, "sms-outbox.jsonl")) as f:
            codes = [json.loads(line)["code"] for line in f if line.strip() and json.loads(line)["phone"] == phone]
    except FileNotFoundError:
        return None
    return codes[-1] if codes else None


def citizen_token(env):
    """Logs a fresh citizen in by SMS code and binds the account to the load-test resident (by SQL: the
    registry match is not what is measured). Returns the access token."""
    gw = env.gateway()
    pg = env.cluster_pg()
    pg.psql(_FIXTURE)
    phone = "1990009%04d" % (int(time.time() * 1000) % 10000)
    r = gw.request("/v1/auth/sms-code", method="POST", json={"phone": phone})
    if r.status != 202:
        raise RuntimeError(f"checkin setup: sms-code answered {r.status}: {r.text[:200]}")
    deadline = time.monotonic() + 5
    code = None
    while code is None and time.monotonic() < deadline:
        code = _outbox_code(gw.env["CITYHALL_VAR"], phone)
        if code is None:
            time.sleep(0.05)
    if code is None:
        raise RuntimeError("checkin setup: no SMS code in the outbox")
    r = gw.request("/v1/auth/login", method="POST", json={"phone": phone, "code": code})
    if r.status != 200:
        raise RuntimeError(f"checkin setup: login answered {r.status}: {r.text[:200]}")
    body = r.json()
    pg.psql(f"UPDATE citizens SET registry_id = {RESIDENT_ID}, real_name_verified_at = now() "
            f"WHERE citizen_id = '{body['citizen_id']}' AND registry_id IS NULL")
    return body["access_token"]


def setup(env):
    """loadtest/run's setup for the "checkin" row: request overrides (one citizen checking in at one venue)."""
    token = citizen_token(env)
    path = f"/v1/venues/{VENUE_ID}/checkins"
    r = env.gateway().request(path, method="POST", json={}, headers={"Authorization": f"Bearer {token}"})
    if r.status != 201:
        raise RuntimeError(f"checkin setup: a check-in answered {r.status}: {r.text[:200]}")
    return {"path": path, "method": "POST", "body": "{}",
            "headers": ("authorization: Bearer " + token, "content-type: application/json")}


def setup_reference(env):
    """loadtest/run's setup for the pgbench reference: the same fixture (the table is the gateway's)."""
    env.cluster_pg().psql(_FIXTURE)
    return {}
