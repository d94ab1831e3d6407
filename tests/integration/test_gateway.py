"""The gateway foundation against real PostgreSQL and Redis: the system routes over h2, h2c and
HTTP/1.1, both encodings, the error contract, limits, operations routes, dependency failures,
graceful shutdown, migrations and the access log. Run by tests/run.py."""

import datetime
import os
import re
import subprocess
import time
import uuid

import harness
from harness import Cluster, curl_async, pb_decode, pb_encode, pb_int64, wait_for

MAX_BODY = 4096
PG_TIMEOUT_MS = 3000
CLUSTER = {"threads": 2, "env": {"CITYHALL_MAX_BODY_BYTES": MAX_BODY,
                                  "CITYHALL_PG_TIMEOUT_MS": PG_TIMEOUT_MS}}

PB = "application/x-protobuf"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
INT64 = re.compile(r"^-?\d+$")


# --------------------------------------------------------------------------- helpers

def parse_rfc3339(s):
    assert isinstance(s, str) and RFC3339.match(s), f"not an RFC 3339 timestamp: {s!r}"
    main, _, frac = s.partition(".")
    if frac:
        digits = re.match(r"\d+", frac).group(0)
        zone = frac[len(digits):]
        main = main + "." + digits[:6].ljust(6, "0") + zone
    return datetime.datetime.fromisoformat(main.replace("Z", "+00:00"))


def assert_info_json(resp, threads=2):
    """The /v1/system/info JSON body: every field present with the contract's type."""
    assert resp.status == 200, resp
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    body = resp.json()
    assert set(body) == {"version", "db_time", "redis_pong", "redis_rtt_us", "db_rtt_us", "thread"}, body
    assert isinstance(body["version"], str) and body["version"], body
    db_time = parse_rfc3339(body["db_time"])
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - db_time).total_seconds()) < 60, f"db_time {body['db_time']} is not now ({now})"
    assert body["redis_pong"] == "PONG", body
    for k in ("redis_rtt_us", "db_rtt_us"):
        assert isinstance(body[k], str) and INT64.match(body[k]), f"{k} must be an int64 as a string: {body}"
        assert 0 <= int(body[k]) < 60_000_000, body
    assert isinstance(body["thread"], int) and not isinstance(body["thread"], bool), body
    assert 0 <= body["thread"] < threads, body
    return body


assert_error = harness.assert_error


def info(gw, http="h2c", timeout=10, **kw):
    return gw.request("/v1/system/info", http=http, timeout=timeout, **kw)


def echo(gw, http="h2c", **kw):
    return gw.request("/v1/system/echo", method="POST", http=http, **kw)


# --------------------------------------------------------------------------- system routes

def test_system_info_over_h2_tls_reports_db_time_and_redis_pong(cluster):
    r = info(cluster.gateway, http="h2")  # curl() fails unless ALPN negotiated h2
    assert r.http_version == "2"
    assert_info_json(r)


def test_system_info_over_h2c_reports_db_time_and_redis_pong(cluster):
    r = info(cluster.gateway, http="h2c")
    assert r.http_version == "2"
    assert_info_json(r)


def test_system_info_over_http1_reports_db_time_and_redis_pong(cluster):
    r = info(cluster.gateway, http="h1")
    assert r.http_version == "1.1"
    assert_info_json(r)
    r = info(cluster.gateway, http="h1", tls=True)  # HTTP/1.1 over TLS (ALPN http/1.1)
    assert r.http_version == "1.1"
    assert_info_json(r)


def test_system_info_answers_binary_protobuf_when_accepted(cluster):
    for http in ("h2c", "h2", "h1"):
        r = info(cluster.gateway, http=http, headers={"Accept": PB})
        assert r.status == 200, r
        assert r.headers.get("content-type", "").startswith(PB), r
        msg = pb_decode(r.body)
        assert set(msg) <= {1, 2, 3, 4, 5, 6}, msg
        assert msg[1][0].decode() != "", msg
        ts = pb_decode(msg[2][0])
        seconds = pb_int64(ts.get(1, [0])[0])
        nanos = ts.get(2, [0])[0]
        assert abs(seconds - time.time()) < 60, f"db_time.seconds {seconds} is not now"
        assert 0 <= nanos < 1_000_000_000, ts
        assert msg[3] == [b"PONG"], msg
        for f in (4, 5):
            assert 0 <= pb_int64(msg.get(f, [0])[0]) < 60_000_000, msg
        assert msg.get(6, [0])[0] < 2, msg


def test_system_ping_answers_status_ok(cluster):
    for http in ("h2c", "h2", "h1"):
        r = cluster.gateway.request("/v1/system/ping", http=http)
        assert r.status == 200, r
        assert r.json() == {"status": "ok"}, r
    r = cluster.gateway.request("/v1/system/ping", headers={"Accept": PB})
    assert r.status == 200 and r.headers.get("content-type", "").startswith(PB), r
    assert pb_decode(r.body) == {1: [b"ok"]}, r


def test_many_concurrent_streams_on_one_connection_all_succeed(cluster):
    r = subprocess.run(["h2load", "-n", "400", "-c", "2", "-m", "50", "-t", "1",
                        cluster.gateway.url("/v1/system/info")],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert re.search(r"400 succeeded, 0 failed, 0 errored", out), out
    assert re.search(r"status codes: 400 2xx", out), out


# --------------------------------------------------------------------------- echo: decode, validate, encode

def test_echo_json_round_trip_with_number_as_string_and_idempotency_key(cluster):
    sent = {"text": "hello 市民", "number": 42, "tags": ["a", "b c"]}
    for http in ("h2c", "h2", "h1"):
        r = echo(cluster.gateway, http=http, json=sent, headers={"Idempotency-Key": "key-" + http})
        assert r.status == 200, r
        assert r.headers.get("content-type", "").startswith("application/json"), r
        assert r.json() == {"text": "hello 市民", "number": "42", "tags": ["a", "b c"],
                            "idempotency_key": "key-" + http}, r


def test_echo_without_idempotency_key_echoes_empty_string(cluster):
    r = echo(cluster.gateway, json={"text": "t", "number": 1, "tags": []})
    assert r.status == 200, r
    body = r.json()
    assert body.get("text") == "t" and body.get("number") == "1", body
    assert body.get("idempotency_key") == "", body


def test_echo_keeps_int64_precision_beyond_2_pow_53(cluster):
    r = echo(cluster.gateway, data='{"text":"big","number":9007199254740993,"tags":["x"]}')
    assert r.status == 200, r
    assert r.json()["number"] == "9007199254740993", r
    r = echo(cluster.gateway, json={"text": "neg", "number": -9223372036854775808, "tags": []})
    assert r.status == 200, r
    assert r.json()["number"] == "-9223372036854775808", r


def test_echo_accepts_and_answers_binary_protobuf(cluster):
    body = pb_encode([(1, "pb 文本"), (2, -7), (3, ["x", "y"])])
    for http in ("h2c", "h2", "h1"):
        r = echo(cluster.gateway, http=http, data=body,
                 headers={"Content-Type": PB, "Accept": PB, "Idempotency-Key": "pb-key"})
        assert r.status == 200, r
        assert r.headers.get("content-type", "").startswith(PB), r
        msg = pb_decode(r.body)
        assert msg.get(1) == ["pb 文本".encode()], msg
        assert pb_int64(msg.get(2, [0])[0]) == -7, msg
        assert msg.get(3) == [b"x", b"y"], msg
        assert msg.get(4) == [b"pb-key"], f"idempotency_key not echoed: {msg}"


def test_echo_malformed_json_is_400_invalid_argument(cluster):
    for http in ("h2c", "h1"):
        r = echo(cluster.gateway, http=http, data='{"text": "x",')
        assert_error(r, 400, "INVALID_ARGUMENT")


def test_echo_malformed_protobuf_is_400_invalid_argument(cluster):
    # field 1, length-delimited, claims 100 bytes but carries 2
    r = echo(cluster.gateway, data=b"\x0a\x64ab", headers={"Content-Type": PB})
    assert r.status == 400, r


def test_echo_unknown_field_is_400_naming_the_field(cluster):
    r = echo(cluster.gateway, json={"text": "x", "colour": "blue"})
    err = assert_error(r, 400, "INVALID_ARGUMENT")
    assert "colour" in err["message"], err


def test_echo_wrong_type_is_400_naming_the_field(cluster):
    r = echo(cluster.gateway, json={"text": "x", "number": True})
    err = assert_error(r, 400, "INVALID_ARGUMENT")
    assert "number" in err["message"], err
    r = echo(cluster.gateway, json={"text": "x", "tags": "not-a-list"})
    err = assert_error(r, 400, "INVALID_ARGUMENT")
    assert "tags" in err["message"], err


def _oversized(n):
    return '{"text":"' + "x" * n + '","number":1,"tags":[]}'


def test_body_over_max_body_bytes_is_413_over_http1_and_http2(cluster):
    data = _oversized(2 * MAX_BODY)
    for http, tls in (("h1", False), ("h1", True), ("h2c", False), ("h2", True)):
        try:
            r = echo(cluster.gateway, http=http, tls=tls, data=data)
        except harness.CurlError as e:
            raise AssertionError(f"{http} (tls={tls}): no HTTP response, expected 413: {e}")
        assert_error(r, 413, "PAYLOAD_TOO_LARGE")
    # a valid body just under the limit still passes (echo caps text at 1000 bytes: fill tags)
    tags = []
    while True:
        data = '{"text":"under","number":1,"tags":[' + ",".join(f'"{t}"' for t in tags + ["t" * 100]) + "]}"
        if len(data) > MAX_BODY - 10:
            break
        tags.append("t" * 100)
    data = '{"text":"under","number":1,"tags":[' + ",".join(f'"{t}"' for t in tags) + "]}"
    assert MAX_BODY - 200 < len(data) <= MAX_BODY, len(data)
    r = echo(cluster.gateway, data=data)
    assert r.status == 200 and r.json()["tags"] == tags, r


def test_body_far_over_max_body_bytes_is_413_not_a_stream_reset(cluster):
    data = _oversized(256 * 1024)  # 64 x the limit
    for http, tls in (("h2c", False), ("h2", True), ("h1", False)):
        try:
            r = echo(cluster.gateway, http=http, tls=tls, data=data, timeout=20)
        except harness.CurlError as e:
            raise AssertionError(f"{http} (tls={tls}): no HTTP response, expected 413: {e}")
        assert_error(r, 413, "PAYLOAD_TOO_LARGE")


# --------------------------------------------------------------------------- routing and request ids

def test_unknown_path_is_404_not_found_error(cluster):
    for path in ("/v1/nope", "/v1/system/info/extra", "/"):
        for http in ("h2c", "h1"):
            assert_error(cluster.gateway.request(path, http=http), 404, "NOT_FOUND")


def test_known_path_with_wrong_method_is_405_with_allow(cluster):
    cases = [("DELETE", "/v1/system/ping", "GET"), ("POST", "/v1/system/info", "GET"),
             ("GET", "/v1/system/echo", "POST")]
    for method, path, allowed in cases:
        r = cluster.gateway.request(path, method=method, data="{}" if method == "POST" else None)
        assert_error(r, 405)
        allow = [m.strip().upper() for m in r.headers.get("allow", "").split(",") if m.strip()]
        assert allowed in allow, f"{method} {path}: allow header {r.headers.get('allow')!r}"


def test_every_response_carries_a_request_id(cluster):
    gw = cluster.gateway
    seen = set()
    responses = [gw.request("/v1/system/ping"), gw.request("/v1/system/ping", http="h1"),
                 gw.request("/v1/nope"), gw.request("/v1/system/ping", method="DELETE"),
                 echo(gw, data="{"), gw.request("/healthz"), gw.request("/metrics"),
                 echo(gw, data=_oversized(2 * MAX_BODY))]
    for r in responses:
        rid = r.headers.get("x-request-id")
        assert rid, f"no x-request-id on {r!r}"
        seen.add(rid)
    assert len(seen) == len(responses), f"request ids are not unique: {sorted(seen)}"


def test_request_id_from_the_client_is_echoed_in_header_and_error_body(cluster):
    for http in ("h2c", "h2", "h1"):
        r = cluster.gateway.request("/v1/system/ping", http=http, headers={"x-request-id": "abc-123"})
        assert r.status == 200 and r.headers.get("x-request-id") == "abc-123", r
        r = cluster.gateway.request("/v1/nope", http=http, headers={"x-request-id": "abc-123"})
        err = assert_error(r, 404, "NOT_FOUND")
        assert err["request_id"] == "abc-123", err


# --------------------------------------------------------------------------- operations routes

def test_healthz_is_200(cluster):
    for http in ("h2c", "h2", "h1"):
        r = cluster.gateway.request("/healthz", http=http)
        assert r.status == 200, r


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*')


def parse_metrics(text):
    """[(name, {label: value}, float)] for every sample; AssertionError on a malformed line."""
    samples = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = {}
        if m.group(2):
            rest = m.group(2).strip()
            pos = 0
            while pos < len(rest):
                lm = LABEL.match(rest, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
        samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def ping_count(samples):
    return sum(v for n, l, v in samples
               if n == "cityhall_requests_total" and "/v1/system/ping" in l.get("route", "")
               and l.get("status") == "200")


def test_metrics_are_prometheus_text_with_route_and_status_labels(cluster):
    gw = cluster.gateway
    assert gw.request("/v1/system/ping").status == 200
    r = gw.request("/metrics")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/plain"), r
    samples = parse_metrics(r.text)
    totals = [(l, v) for n, l, v in samples if n == "cityhall_requests_total"]
    assert totals, f"no cityhall_requests_total samples:\n{r.text[:2000]}"
    assert all("route" in l and "status" in l for l, _ in totals), totals
    before = ping_count(samples)
    assert before >= 1, f"no cityhall_requests_total for /v1/system/ping status 200:\n{r.text[:2000]}"
    buckets = [(l, v) for n, l, v in samples if n == "cityhall_request_duration_seconds_bucket"]
    assert buckets and all("le" in l for l, _ in buckets), f"no duration buckets:\n{r.text[:2000]}"
    assert any(l["le"] == "+Inf" for l, _ in buckets), buckets
    for _ in range(3):
        assert gw.request("/v1/system/ping", http="h1").status == 200
    after = ping_count(parse_metrics(gw.request("/metrics").text))
    assert after >= before + 3, f"ping counter went from {before} to {after} after 3 more pings"
    # only on the internal listener: the public TLS one answers as for a path it does not have
    public = gw.request("/metrics", http="h2")
    unknown = gw.request("/no-such-path", http="h2")
    assert public.status == 404 and public.json()["error"]["message"] == unknown.json()["error"]["message"], public


def test_access_log_has_request_id_route_status_duration_and_bytes(cluster):
    gw = cluster.gateway
    rid = "acc-" + uuid.uuid4().hex
    r = gw.request("/v1/system/ping", headers={"x-request-id": rid})
    assert r.status == 200, r

    def line():
        hits = [j for j in gw.log_json() if j.get("type") == "access" and j.get("request_id") == rid]
        return hits

    hits = wait_for(line, timeout=5, what=f"an access log line with request_id {rid}")
    assert len(hits) == 1, hits
    a = hits[0]
    assert "/v1/system/ping" in str(a.get("route")), a
    assert str(a.get("status")) == "200", a
    dur = [k for k in a if k.startswith("duration")]
    assert dur and isinstance(a[dur[0]], (int, float)) and a[dur[0]] >= 0, f"no numeric duration: {a}"
    nbytes = [k for k in a if "bytes" in k]
    assert nbytes and all(isinstance(a[k], int) and a[k] >= 0 for k in nbytes), f"no byte counts: {a}"
    assert any(a[k] >= len(r.body) for k in nbytes), f"byte counts smaller than the body: {a}"


def test_migrate_again_applies_nothing_and_records_every_file(cluster):
    pg, gw = cluster.pg, cluster.gateway
    files = sorted(f for f in os.listdir(os.path.join(harness.ROOT, "sql", "migrations"))
                   if f.endswith(".sql"))
    assert files, "no sql/migrations/*.sql"
    before = int(pg.psql("select count(*) from schema_migrations"))
    r = gw.run("migrate")
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"second migrate exited {r.returncode}: {out}"
    assert re.search(r"\b0 applied|nothing (to apply|was applied|applied)|no (new |pending )?migrations?"
                     r"|up[ -]to[ -]date", out, re.I), f"migrate does not say nothing was applied: {out!r}"
    assert int(pg.psql("select count(*) from schema_migrations")) == before
    assert before == len(files), f"{before} rows in schema_migrations for {len(files)} files"
    rows = pg.psql("select row_to_json(m)::text from schema_migrations m").splitlines()
    for f in files:
        stem, version = f[:-4], f.split("_", 1)[0]
        assert any(f in row or re.search(rf'"{re.escape(stem)}"', row) or
                   re.search(rf'[:\s]"?0*{int(version)}"?[,}}]', row) for row in rows), \
            f"{f} is not recorded in schema_migrations: {rows}"


# --------------------------------------------------------------------------- dependency failures

def test_readyz_follows_redis_kill_and_restart(cluster):
    gw, redis = cluster.gateway, cluster.redis
    r = gw.request("/readyz")
    assert r.status == 200, r
    def not_ready():
        r = gw.request("/readyz", timeout=5)
        return r if r.status == 503 else None

    redis.kill()
    try:
        r = wait_for(not_ready, timeout=5, what="/readyz 503 after Redis was killed")
        assert_error(r, 503, "UNAVAILABLE")
    finally:
        redis.start()
    wait_for(lambda: gw.request("/readyz", timeout=5).status == 200, timeout=5,
             what="/readyz 200 after Redis came back")
    assert_info_json(info(gw))


def test_postgres_restart_under_the_gateway_503_then_recovers_without_restart(cluster):
    gw, pg = cluster.gateway, cluster.pg
    assert_info_json(info(gw))
    pid = gw.pid
    pg.stop("immediate")
    try:
        for i in range(3):
            t0 = time.monotonic()
            r = info(gw, timeout=PG_TIMEOUT_MS / 1000 + 5)
            elapsed = time.monotonic() - t0
            err = assert_error(r, 503, "UNAVAILABLE")
            assert r.headers.get("retry-after", "").strip().isdigit(), f"no retry-after: {r.headers}"
            assert elapsed < PG_TIMEOUT_MS / 1000 / 2, \
                f"request {i} took {elapsed:.2f}s with PostgreSQL down (pg timeout {PG_TIMEOUT_MS} ms)"
            assert "select" not in err["message"].lower(), f"SQL in an error message: {err}"
    finally:
        pg.start()
    t0 = time.monotonic()
    wait_for(lambda: all(info(gw, timeout=5).status == 200 for _ in range(6)), timeout=6,
             interval=0.1, what="6 consecutive 200s from /v1/system/info after PostgreSQL restarted")
    assert time.monotonic() - t0 < 6
    assert gw.running and gw.pid == pid, "the gateway restarted"
    assert_info_json(info(gw))


# --------------------------------------------------------------------------- shutdown (private cluster)

def test_sigterm_finishes_inflight_requests_exits_0_and_refuses_new_connections():
    env = {"CITYHALL_PG_TIMEOUT_MS": 10000, "CITYHALL_SHUTDOWN_TIMEOUT_MS": 20000}
    with Cluster(threads=2, env=env) as c:
        gw, pg = c.gateway, c.pg
        for _ in range(4):  # every loop thread has its database connection up
            assert_info_json(info(gw))
        pg.pause()
        try:
            calls = [curl_async(gw.url("/v1/system/info", tls=tls), http=http, timeout=30)
                     for http, tls in (("h2c", False), ("h2c", False), ("h1", False), ("h1", False),
                                       ("h2", True), ("h2", True))]
            time.sleep(1.0)
            done = [c.args for c in calls if c.proc.poll() is not None]
            assert not done, f"requests finished while PostgreSQL was stopped: {done}"
            gw.terminate()
            time.sleep(0.5)
            assert gw.running, f"the gateway exited with requests in flight (rc {gw.proc.returncode})"
            try:
                r = gw.request("/healthz", timeout=3)
                raise AssertionError(f"a new connection was accepted during shutdown: {r!r}")
            except harness.CurlError as e:
                assert e.rc == 7, f"expected connection refused (curl 7) during shutdown: {e}"
        finally:
            pg.resume()
        for call in calls:
            r = call.wait()
            assert_info_json(r)
        rc = gw.wait(timeout=15)
        assert rc == 0, f"gateway exit status {rc}"
        try:
            r = gw.request("/healthz", timeout=3)
            raise AssertionError(f"a connection was accepted after exit: {r!r}")
        except harness.CurlError as e:
            assert e.rc == 7, e
