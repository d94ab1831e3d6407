"""The test harness itself (tests/harness.py), which every integration test and the load-test
runner rely on: real PostgreSQL and Redis started, stopped, killed and paused by PID, and the
protobuf wire helpers. No gateway needed. Run by tests/run.py."""

import subprocess
import time

from harness import Fixed32, Fixed64, pb_decode, pb_encode, pb_int64, pb_varint, wait_for

CLUSTER = {"gateway": False}


def test_harness_postgres_has_database_cityhall_with_fsync_and_checksums(cluster):
    out = cluster.pg.psql("select current_database(), current_setting('fsync'), "
                          "current_setting('data_checksums'), current_setting('server_encoding')")
    assert out == "cityhall|on|on|UTF8", out
    assert f"port={cluster.pg.port}" in cluster.pg.conninfo


def test_harness_postgres_pause_hangs_queries_until_resume(cluster):
    pg = cluster.pg
    pg.pause()
    try:
        t0 = time.monotonic()
        try:
            pg.psql("select 1", timeout=1)
            raise AssertionError("a query was answered while PostgreSQL was paused")
        except subprocess.TimeoutExpired:
            pass
        assert time.monotonic() - t0 < 3
    finally:
        pg.resume()
    assert pg.psql("select 41 + 1") == "42"


def test_harness_postgres_immediate_stop_keeps_committed_rows(cluster):
    pg = cluster.pg
    pg.psql("create table if not exists harness_t (x int); insert into harness_t values (7)")
    pid = pg.pid
    assert pg.stop("immediate") is not None and not pg.running and pg.pid is None
    pg.start()
    assert pg.pid != pid
    assert pg.psql("select count(*) from harness_t where x = 7") == "1"


def test_harness_redis_kill_restarts_on_the_same_port_with_aof_data(cluster):
    redis = cluster.redis
    port = redis.port
    assert redis.cli("set", "harness:k", "v") == "OK"
    time.sleep(1.2)  # appendfsync everysec
    redis.kill()
    assert not redis.ping(timeout=0.3)
    redis.start()
    assert redis.port == port and redis.ping()
    assert redis.cli("get", "harness:k") == "v"
    assert redis.cli("config", "get", "appendonly").split() == ["appendonly", "yes"]


def test_harness_redis_pause_stops_answers_until_resume(cluster):
    redis = cluster.redis
    redis.pause()
    try:
        assert not redis.ping(timeout=0.3), "Redis answered while paused"
    finally:
        redis.resume()
    wait_for(redis.ping, timeout=2, what="PONG after resume")


def test_harness_protobuf_wire_round_trip():
    msg = pb_encode([(1, "text"), (2, -7), (3, ["a", "b"]), (4, {1: 5, 2: b"\x00"}),
                     (5, Fixed32(0xDEADBEEF)), (6, Fixed64(-1)), (7, True)])
    d = pb_decode(msg)
    assert d[1] == [b"text"] and pb_int64(d[2][0]) == -7 and d[3] == [b"a", b"b"], d
    assert pb_decode(d[4][0]) == {1: [5], 2: [b"\x00"]}, d
    assert d[5] == [0xDEADBEEF] and pb_int64(d[6][0]) == -1 and d[7] == [1], d
    assert pb_varint(300) == b"\xac\x02" and len(pb_varint(-1)) == 10
    for bad in (b"\x0a\x05ab", b"\x08", b"\x0b"):
        try:
            pb_decode(bad)
            raise AssertionError(f"decoded malformed {bad!r}")
        except ValueError:
            pass
