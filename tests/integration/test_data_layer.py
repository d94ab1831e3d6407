"""The data layer on its own event loop, against real servers: gateway/pg.c (pipeline mode,
transactions per sync, bounded queue) and gateway/redis.c (pipelining, errors, pub/sub,
timeouts, reconnection). Each C program prints TAP; every line must be ok."""

import os
import re
import subprocess

import harness

CLUSTER = {"gateway": False}


def _run_tap(args, timeout=120):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    lines = r.stdout.splitlines()
    oks = [l for l in lines if re.match(r"^ok \d+", l)]
    bad = [l for l in lines if l.startswith("not ok")]
    plan = [l for l in lines if re.match(r"^1\.\.\d+$", l)]
    assert not bad, "\n".join(bad) + "\n" + r.stderr[-2000:]
    assert plan and int(plan[-1][3:]) == len(oks) and oks, f"incomplete TAP run:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    return len(oks)


def test_pg_pool_pipelines_transactions_and_bounds_its_queue(cluster):
    binary = os.path.join(harness.BUILD, "tests", "pg_loop_test")
    assert _run_tap([binary, cluster.pg.conninfo]) >= 10


def test_redis_connection_pipelines_reports_errors_and_recovers(cluster):
    binary = os.path.join(harness.BUILD, "tests", "redis_loop_test")
    assert _run_tap([binary, "127.0.0.1", str(cluster.redis.port)]) >= 10
