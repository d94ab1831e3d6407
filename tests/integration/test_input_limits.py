"""Hostile input against real write routes, over HTTP/1.1 and HTTP/2, against real PostgreSQL, Redis and the
gateway: bodies over the limit (413 on both protocols), JSON nested 10 000 deep, 100 000-element arrays, huge
strings in every field type, page_size far over the cap, invalid UTF-8 (JSON, protobuf, query), duplicate JSON keys
and numbers out of range. Each must answer a clear 4xx in the error shape of DESIGN.md (the field named where there
is one, no echo of the input), write no row, and leave the gateway's resident memory flat when repeated. Run by
tests/run.py.

The routes: POST /v1/system/echo (public, writes nothing), /v1/health/declarations (a real-named citizen),
/v1/onething/applications (a citizen) and /v1/health/test-results (a health-authority client, which takes bodies up
to 8 MiB)."""

import json
import re
import uuid

import harness

# glibc keeps what large requests freed in per-thread arenas and lets RSS swing by ~100 MB between identical rounds;
# one arena that gives freed memory back at once makes RSS a measure of what is still allocated (a leak shows).
CLUSTER = {"threads": 2, "env": {
    "GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536"}}
TIMEOUT = 240

MAX_BODY = 1 << 20  # the gateway's default max_body_bytes
BULK_MAX_BODY = 8 << 20  # /v1/health/test-results
REGION = "530102"  # Yunnan: no other suite imports residents there
PROTOCOLS = (("h1", False), ("h2c", False), ("h2", True))
# Rows that a refused request must not have created.
TABLES = ("declarations", "test_results", "applications", "application_items", "outbox", "idempotency_keys",
          "system_probes", "health_codes", "hc_recompute_queue")


# --------------------------------------------------------------------------- people and tokens

def make_citizen(cluster):
    """A citizen logged in by SMS and bound to a resident imported for the purpose: {"token", "id_number"}."""
    number = harness.new_id_number(REGION, sex="F")
    harness.import_registry(cluster.gateway, [
        (number, "李边界", "F", harness.id_birth_date(number), REGION, "云南省昆明市五华区1号", "", "")])
    token = harness.sms_login(cluster.gateway, harness.new_phone())["token"]
    harness.bind_real_name(cluster.gateway, token, number, "李边界")
    return {"token": token, "id_number": number}


def routes(cluster):
    """[(path, token or None, content-type default)] of the write routes under test."""
    who = harness.shared(cluster, "citizen", lambda: make_citizen(cluster))
    dept = harness.shared(cluster, "dept", lambda: harness.client_token(cluster.gateway, "health"))
    return [("/v1/system/echo", None), ("/v1/health/declarations", who["token"]),
            ("/v1/onething/applications", who["token"]), ("/v1/health/test-results", dept["token"])]


def post(cluster, path, token, data, http="h2c", tls=False, content_type="application/json", timeout=30,
         headers=None):
    h = {"Content-Type": content_type, "Idempotency-Key": "lim-" + uuid.uuid4().hex}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    try:
        return cluster.gateway.request(path, method="POST", http=http, tls=tls, data=data, headers=h,
                                       timeout=timeout)
    except harness.CurlError as e:
        raise AssertionError(f"POST {path} over {http}: no HTTP response: {e}")


def assert_error(resp, status, code, field=None):
    """The error shape of DESIGN.md, a short body that echoes no input, and the field named when given."""
    assert len(resp.body) < 2048, f"a {len(resp.body)}-byte error body (is the input echoed?): {resp.body[:200]!r}"
    err = harness.assert_error(resp, status, code)
    if field is not None:
        assert field in err["message"] or any(d.get("field", "").startswith(field) for d in err.get("details", [])), \
            f"the error does not name {field!r}: {err}"
    return err


def counts(cluster):
    sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in TABLES)
    return dict(line.split("|") for line in cluster.pg.psql(sql).splitlines())


def rss_kib(cluster):
    with open(f"/proc/{cluster.gateway.pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


# --------------------------------------------------------------------------- bodies

def deep(depth):
    return "[" * depth + "]" * depth


def nested_bodies():
    """Bodies nesting 10 000 deep: at the root, as a field's value, and inside a string-looking position."""
    return [deep(10000), '{"text":' + deep(10000) + "}", '{"a":' * 10000 + "1" + "}" * 10000,
            '{"fields":[' + '{"name":' * 10000 + '"x"' + "}" * 10000 + "]}"]


def big_arrays():
    """{path: [(body, field)]}: 100 000 elements in every repeated field of each route."""
    n = 100000
    strings = "[" + ",".join(['"a"'] * n) + "]"
    return {
        "/v1/system/echo": [('{"tags":' + strings + "}", "tags")],
        "/v1/health/declarations": [('{"symptoms":' + strings + "}", "symptoms"),
                                    ('{"visited_regions":' + "[" + ",".join(['"530102"'] * n) + "]}",
                                     "visited_regions")],
        "/v1/onething/applications": [
            ('{"bundle_code":"birth","consent":true,"fields":[' + ",".join(["{}"] * n) + "]}", "fields")],
        "/v1/health/test-results": [
            ('{"results":[' + ",".join(['{"id_number":"x","result":"negative","lab":"l"}'] * n) + "]}", "results")],
    }


def huge_field_bodies(size):
    """{path: [(body, field)]}: one field at a time holds `size` bytes, whatever its type (strings, numbers as
    digits, bools, timestamps, enums-as-strings, nested messages)."""
    s = "x" * size
    digits = "9" * size
    return {
        "/v1/system/echo": [({"text": s}, "text"), ('{"number":' + digits + "}", "number"),
                            ({"number": digits}, "number"), ({"tags": [s]}, "tags[0]")],
        "/v1/health/declarations": [({"symptoms": [s]}, "symptoms[0]"), ('{"temperature_c":' + digits + "}",
                                                                         "temperature_c"),
                                    ({"temperature_c": digits}, "temperature_c"),
                                    ({"visited_regions": [s]}, "visited_regions[0]"),
                                    ({"contact_with_confirmed": s}, "contact_with_confirmed"),
                                    ({"dependent_id": s}, "dependent_id")],
        "/v1/onething/applications": [({"bundle_code": s, "consent": True}, "bundle_code"),
                                      ({"bundle_code": "birth", "consent": True, "fields": [{"name": s, "value": "v"}]},
                                       "fields[0]"),
                                      ({"bundle_code": "birth", "consent": True,
                                        "fields": [{"name": "child_name", "value": s}]}, "fields[0]"),
                                      ({"bundle_code": "birth", "consent": s}, "consent")],
        "/v1/health/test-results": [
            ({"results": [{"id_number": s, "result": "negative", "lab": "l", "sample_time": "2026-01-01T00:00:00Z"}]},
             "results[0]"),
            ({"results": [{"id_number": "x", "result": s, "lab": "l", "sample_time": "2026-01-01T00:00:00Z"}]},
             "results[0]"),
            ({"results": [{"id_number": "x", "result": "negative", "lab": s, "sample_time": "2026-01-01T00:00:00Z"}]},
             "results[0]"),
            ({"results": [{"id_number": "x", "result": "negative", "lab": "l", "sample_time": s}]},
             "results[0].sample_time")],
    }


def encode(body):
    return body if isinstance(body, (str, bytes)) else json.dumps(body)


# --------------------------------------------------------------------------- tests

def test_bodies_over_the_limit_are_413_over_http1_and_http2_on_every_write_route_and_write_nothing(cluster):
    before = counts(cluster)
    for path, token in routes(cluster):
        limit = BULK_MAX_BODY if path == "/v1/health/test-results" else MAX_BODY
        data = '{"text":"' + "x" * (limit + 1) + '"}'
        for http, tls in PROTOCOLS:
            r = post(cluster, path, token, data, http=http, tls=tls, timeout=60)
            err = assert_error(r, 413, "PAYLOAD_TOO_LARGE")
            assert str(limit) in err["message"], err
    assert counts(cluster) == before


def test_json_nested_10000_deep_is_400_on_every_write_route(cluster):
    before = counts(cluster)
    for path, token in routes(cluster):
        for data in nested_bodies():
            for http, tls in PROTOCOLS:
                err = assert_error(post(cluster, path, token, data, http=http, tls=tls), 400, "INVALID_ARGUMENT")
                assert "deep" in err["message"], err
    assert counts(cluster) == before


def test_100000_element_arrays_are_400_naming_the_field(cluster):
    before = counts(cluster)
    for path, token in routes(cluster):
        for data, field in big_arrays()[path]:
            for http, tls in PROTOCOLS:
                assert_error(post(cluster, path, token, data, http=http, tls=tls), 400, "INVALID_ARGUMENT", field)
    assert counts(cluster) == before


def test_a_huge_value_in_any_field_is_400_naming_the_field(cluster):
    before = counts(cluster)
    for path, token in routes(cluster):
        for body, field in huge_field_bodies(MAX_BODY - 1024)[path]:
            for http, tls in PROTOCOLS:
                r = post(cluster, path, token, encode(body), http=http, tls=tls)
                assert_error(r, 400, "INVALID_ARGUMENT", field)
    assert counts(cluster) == before


def test_numbers_out_of_range_are_400_naming_the_field(cluster):
    cases = {
        "/v1/system/echo": [('{"number":9223372036854775808}', "number"), ('{"number":"-9223372036854775809"}', "number"),
                            ('{"number":1e400}', "number"), ('{"number":1.5}', "number"),
                            ('{"number":"0x10"}', "number")],
        "/v1/health/declarations": [('{"temperature_c":1e400}', "temperature_c"),
                                    ('{"temperature_c":"NaN"}', "temperature_c"),
                                    ('{"temperature_c":"Infinity"}', "temperature_c"),
                                    ('{"temperature_c":-1e308}', "temperature_c")],
        "/v1/health/test-results": [
            ('{"results":[{"id_number":"x","result":"negative","lab":"l","sample_time":"99999-01-01T00:00:00Z"}]}',
             "sample_time"),
            ('{"results":[{"id_number":"x","result":"negative","lab":"l","sample_time":{"seconds":1e30}}]}',
             "sample_time")],
    }
    before = counts(cluster)
    for path, token in routes(cluster):
        for data, field in cases.get(path, []):
            for http, tls in PROTOCOLS:
                assert_error(post(cluster, path, token, data, http=http, tls=tls), 400, "INVALID_ARGUMENT", field)
    assert counts(cluster) == before


def test_duplicate_json_keys_are_400_naming_the_field(cluster):
    cases = {
        "/v1/system/echo": [('{"text":"a","text":"b"}', "text"), ('{"text":"a","number":1,"number":2}', "number")],
        "/v1/health/declarations": [('{"temperature_c":36.5,"temperature_c":39.5}', "temperature_c"),
                                    ('{"temperature_c":36.5,"temperatureC":39.5}', "temperature")],
        "/v1/onething/applications": [
            '{"bundle_code":"birth","consent":true,"fields":[{"name":"a","value":"b","value":"c"}]}'],
        "/v1/health/test-results": [
            '{"results":[{"id_number":"x","result":"negative","result":"positive","lab":"l"}]}'],
    }
    fields = {"/v1/onething/applications": "fields[0].value", "/v1/health/test-results": "results[0].result"}
    before = counts(cluster)
    for path, token in routes(cluster):
        for case in cases[path]:
            data, field = case if isinstance(case, tuple) else (case, fields[path])
            for http, tls in PROTOCOLS:
                err = assert_error(post(cluster, path, token, data, http=http, tls=tls), 400, "INVALID_ARGUMENT", field)
                assert "duplicate" in err["message"], err
    assert counts(cluster) == before


def test_invalid_utf8_is_400_in_json_and_in_protobuf(cluster):
    bad = b"\xc3\x28\xff\xed\xa0\x80"  # a broken pair, a byte never valid, an encoded surrogate
    before = counts(cluster)
    json_cases = {
        "/v1/system/echo": b'{"text":"a' + bad + b'"}',
        "/v1/health/declarations": b'{"symptoms":["' + bad + b'"]}',
        "/v1/onething/applications": b'{"bundle_code":"birth","consent":true,"fields":[{"name":"child_name",'
                                     b'"value":"' + bad + b'"}]}',
        "/v1/health/test-results": b'{"results":[{"id_number":"x","result":"negative","lab":"' + bad + b'"}]}',
    }
    # the same strings in binary protobuf, which protobuf-c does not check
    pb_cases = {
        "/v1/system/echo": (harness.pb_encode({1: b"a" + bad}), "text"),
        "/v1/health/declarations": (harness.pb_encode({1: [bad]}), "symptoms[0]"),
        "/v1/onething/applications": (harness.pb_encode({1: b"birth", 2: [{1: b"child_name", 2: bad}], 3: 1}),
                                      "fields[0].value"),
        "/v1/health/test-results": (harness.pb_encode({1: [{1: b"x", 3: b"negative", 4: bad}]}), "results[0].lab"),
    }
    for path, token in routes(cluster):
        for http, tls in PROTOCOLS:
            err = assert_error(post(cluster, path, token, json_cases[path], http=http, tls=tls), 400,
                               "INVALID_ARGUMENT")
            assert "UTF-8" in err["message"] or "invalid" in err["message"], err
            data, field = pb_cases[path]
            r = post(cluster, path, token, data, http=http, tls=tls, content_type="application/x-protobuf",
                     headers={"Accept": "application/json"})
            err = assert_error(r, 400, "INVALID_ARGUMENT", field)
            assert "UTF-8" in err["message"], err
    assert counts(cluster) == before
    # in a query string and a path parameter: a 4xx, never a 500
    who = harness.shared(cluster, "citizen", lambda: make_citizen(cluster))
    auth = {"Authorization": f"Bearer {who['token']}"}
    for path in ("/v1/onething/applications?page_size=%C3%28", "/v1/onething/applications/%FF%FE",
                 "/v1/health/appeals/%ED%A0%80", "/v1/me/access-log?page_token=%FF"):
        r = cluster.gateway.request(path, headers=auth)
        assert 400 <= r.status < 500, r
        assert_error(r, r.status, r.json()["error"]["code"])


def test_page_size_far_over_the_cap_is_capped_and_a_non_number_is_400(cluster):
    who = harness.shared(cluster, "citizen", lambda: make_citizen(cluster))
    auth = {"Authorization": f"Bearer {who['token']}"}
    lists = ("/v1/onething/applications", "/v1/me/access-log", "/v1/health/appeals")
    for path in lists:
        r = cluster.gateway.request(f"{path}?page_size=1000000", headers=auth)
        assert r.status == 200, (path, r)
        for bad in ("99999999999999999999999999", "-5", "abc", "1e3", "%20%31"):
            r = cluster.gateway.request(f"{path}?page_size={bad}", headers=auth)
            assert_error(r, 400, "INVALID_ARGUMENT", "page_size")


def test_repeated_abuse_leaves_the_gateway_memory_flat_and_nothing_written(cluster):
    rts = routes(cluster)
    before = counts(cluster)
    arrays = big_arrays()
    huge = huge_field_bodies(MAX_BODY // 2)
    nested = nested_bodies()[1]

    def round_of_abuse():
        for path, token in rts:
            limit = BULK_MAX_BODY if path == "/v1/health/test-results" else MAX_BODY
            calls = [harness.curl_async(cluster.gateway.url(path), method="POST", http="h2c", data=d,
                                        headers={"Authorization": f"Bearer {token}"} if token else None, timeout=30)
                     for d in ['{"text":"' + "x" * (limit + 1) + '"}', nested, arrays[path][0][0],
                               encode(huge[path][0][0])]]
            for c in calls:
                assert 400 <= c.wait().status < 500

    round_of_abuse()  # warm-up: pools, caches and connections reach their working size
    round_of_abuse()
    start = rss_kib(cluster)
    samples = []
    for _ in range(6):
        round_of_abuse()
        samples.append(rss_kib(cluster))
    # a round sends ~20 MB of bodies: keeping any one of them per request would add tens of MB a round
    assert max(samples) - start < 24 * 1024, f"the gateway's RSS grew from {start} KiB: {samples}"
    assert counts(cluster) == before
    assert cluster.gateway.request("/healthz").status == 200
