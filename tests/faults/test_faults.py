"""The fault suite's short form, run by tests/run.py: one test per fault, each with client threads writing health
declarations, venue check-ins and one-thing applications through the public API (every write retried with its
Idempotency-Key until acknowledged) while the fault happens, then the invariants of DESIGN.md's reliability bar:
every acknowledged write stored exactly once, no duplicate, no 500 and no answer other than 503 + Retry-After (or a
refused connection while the gateway is down), nothing hanging past its timeout, health codes displayed while
Redis is out, full success within 5 s of the dependency's return, no crash, bounded RSS. 5 s pauses, 3 s outages;
tests/faults/faults.py --full runs the long form. Also: retries of one key racing each other (as after a cut or a
client timeout) make one row, and a changed body under that key is refused. See tests/faults/README.md."""

import json
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultkit  # noqa: E402
import harness  # noqa: E402

CLUSTER = {"threads": 2}
TIMEOUT = 120
PROFILE = faultkit.Profile(full=False)
FAULTS = {kind_name: (name, inject, kind) for name, inject, kind in faultkit.FAULTS
          for kind_name in [inject.__name__[len("fault_"):]]}


def check(cluster, which):
    name, inject, kind = FAULTS[which]
    res = faultkit.run_fault(cluster, name, inject, kind, PROFILE)
    bad = faultkit.violations(res, kind, PROFILE)
    assert not bad, f"{name}:\n  " + "\n  ".join(bad) + "\n" + faultkit.table([res])


def test_a_gateway_killed_and_restarted_loses_and_duplicates_no_acknowledged_write(cluster):
    check(cluster, "gateway_kill")


def test_postgres_stopped_immediately_answers_503_and_loses_no_acknowledged_write(cluster):
    check(cluster, "pg_immediate")


def test_redis_killed_keeps_writes_and_code_displays_going(cluster):
    check(cluster, "redis_kill")


def test_postgres_frozen_by_sigstop_answers_503_in_time_and_recovers(cluster):
    check(cluster, "pg_sigstop")


def test_redis_frozen_by_sigstop_keeps_writes_and_code_displays_going(cluster):
    check(cluster, "redis_sigstop")


def test_connections_to_postgres_and_redis_cut_with_ss_k_are_rebuilt_without_errors(cluster):
    check(cluster, "cut")


def test_client_connections_cut_mid_write_are_retried_into_exactly_one_row(cluster):
    check(cluster, "cut_clients")


def race(cluster, who, path, bodies, key):
    """The bodies sent at once under one Idempotency-Key, each on its own connection; the answers in order."""
    calls = [harness.curl_async(cluster.gateway.url(path), method="POST", json=b, timeout=20,
                                headers={"Authorization": f"Bearer {who['token']}", "Idempotency-Key": key})
             for b in bodies]
    return [c.wait() for c in calls]


def test_racing_retries_of_one_key_make_one_row_and_a_changed_body_gets_422(cluster):
    who, = faultkit.citizens(cluster, 1)
    venue = faultkit.venue(cluster)
    for _ in range(4):
        # a declaration whose retries race a misuse of its key: one request is stored and answered 201, whatever
        # committed first; every other body is 422 (a snapshot taken before that commit must not hide it)
        key = "race-" + uuid.uuid4().hex
        bodies = [{"temperature_c": round(36.0 + i / 10, 1)} for i in range(6)]
        answers = race(cluster, who, "/v1/health/declarations", bodies, key)
        won = [b for b, a in zip(bodies, answers) if a.status == 201]
        assert len(won) == 1 and all(a.status in (201, 422) for a in answers), answers
        stored = cluster.pg.psql(f"SELECT temperature_c FROM declarations WHERE idem_key = '{key}'")
        assert stored and float(stored) == won[0]["temperature_c"], (stored, won)
        # the same check-in retried at once: one row, every answer the same
        key = "race-" + uuid.uuid4().hex
        answers = race(cluster, who, f"/v1/venues/{venue}/checkins", [{}] * 6, key)
        assert all(a.status == 201 for a in answers), answers
        assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1, [a.text for a in answers]
        assert cluster.pg.psql(f"SELECT count(*) FROM checkins WHERE checkin_id = '{answers[0].json()['checkin_id']}'"
                               f" OR (venue_id = '{venue}' AND at > now() - interval '1 minute')") == "1"
        cluster.pg.psql(f"DELETE FROM checkins WHERE venue_id = '{venue}'")
