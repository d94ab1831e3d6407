"""Idempotency-Key on a creating route (POST /v1/system/probes, admin only), against real PostgreSQL:
the key is claimed in the write's own transaction, so a retry replays the first answer and never
writes twice, whatever the encoding, and a concurrent duplicate loses cleanly."""

import harness
from harness import curl_async, pb_decode, pb_encode

PB = "application/x-protobuf"


def probe(gw, key=None, note="after deploy", http="h2c", **kw):
    headers = {"Authorization": f"Bearer {harness.admin_token(gw)}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    headers.update(kw.pop("headers", {}))
    return gw.request("/v1/system/probes", method="POST", http=http, json={"note": note}, headers=headers, **kw)


def rows(cluster, note):
    return int(cluster.pg.psql(f"SELECT count(*) FROM system_probes WHERE note = '{note}'"))


def test_probe_is_created_after_commit_with_201_and_its_row(cluster):
    r = probe(cluster.gateway, note="plain-create")
    assert r.status == 201, r
    body = r.json()
    assert set(body) == {"probe_id", "note", "created_at"} and body["note"] == "plain-create", body
    assert cluster.pg.psql(f"SELECT note FROM system_probes WHERE probe_id = '{body['probe_id']}'") == "plain-create"


def test_without_a_key_each_request_creates_its_own_row(cluster):
    a = probe(cluster.gateway, note="no-key").json()
    b = probe(cluster.gateway, note="no-key").json()
    assert a["probe_id"] != b["probe_id"]
    assert rows(cluster, "no-key") == 2


def test_same_key_same_body_replays_the_first_answer_and_writes_once(cluster):
    first = probe(cluster.gateway, key="retry-1", note="retried")
    again = probe(cluster.gateway, key="retry-1", note="retried", http="h1")
    assert first.status == again.status == 201, (first, again)
    assert again.json() == first.json(), (first.json(), again.json())
    assert again.headers.get("idempotent-replayed") == "true", again.headers
    assert rows(cluster, "retried") == 1


def test_same_key_with_another_body_is_422_and_writes_nothing(cluster):
    assert probe(cluster.gateway, key="retry-2", note="body-a").status == 201
    r = probe(cluster.gateway, key="retry-2", note="body-b")
    assert r.status == 422, r
    err = r.json()["error"]
    assert err["code"] == "FAILED_PRECONDITION" and "Idempotency-Key" in err["message"], err
    assert rows(cluster, "body-b") == 0


def test_the_same_request_in_protobuf_replays_the_json_one(cluster):
    first = probe(cluster.gateway, key="retry-3", note="enc")
    assert first.status == 201, first
    r = cluster.gateway.request("/v1/system/probes", method="POST", data=pb_encode({1: "enc"}),
                                headers={"Content-Type": PB, "Accept": PB, "Idempotency-Key": "retry-3",
                                         "Authorization": f"Bearer {harness.admin_token(cluster.gateway)}"})
    assert r.status == 201 and r.headers["content-type"] == PB, r
    msg = pb_decode(r.body)
    assert msg[1] == [first.json()["probe_id"].encode()], msg
    assert rows(cluster, "enc") == 1


def test_concurrent_requests_with_one_key_write_once_and_agree(cluster):
    auth = f"Bearer {harness.admin_token(cluster.gateway)}"
    calls = [curl_async(cluster.gateway.url("/v1/system/probes"), method="POST", json={"note": "race"},
                        headers={"Idempotency-Key": "race-key", "Authorization": auth}) for _ in range(12)]
    answers = [c.wait() for c in calls]
    ids = {a.json()["probe_id"] for a in answers if a.status == 201}
    others = [a for a in answers if a.status != 201]
    assert len(ids) == 1, answers
    assert all(a.status == 409 for a in others), others  # only "first still in flight" may differ
    assert rows(cluster, "race") == 1


def test_keys_are_scoped_so_another_scope_does_not_replay(cluster):
    # the key is scoped to the caller and bound to the route and body by its hash
    assert probe(cluster.gateway, key="k-scope", note="scope-a").status == 201
    r = cluster.gateway.request("/v1/system/echo", method="POST", json={"text": "x"},
                                headers={"Idempotency-Key": "k-scope"})
    assert r.status == 200, r  # echo is not a creating route: the key is not consulted there


def test_a_malformed_key_is_400_and_writes_nothing(cluster):
    r = probe(cluster.gateway, key="x" * 129, note="bad-key")
    assert r.status == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT", r
    assert rows(cluster, "bad-key") == 0


def test_postgres_down_answers_503_and_a_retry_after_recovery_writes_once(cluster):
    harness.admin_token(cluster.gateway)  # logged in while PostgreSQL is up
    cluster.pg.stop("immediate")
    try:
        r = probe(cluster.gateway, key="outage-1", note="outage")
        assert r.status == 503 and "retry-after" in r.headers, r
    finally:
        cluster.pg.start()
    harness.wait_for(lambda: probe(cluster.gateway, key="outage-1", note="outage").status == 201, timeout=10,
                     what="the write to succeed after PostgreSQL returns")
    # a second retry (maybe served by the other thread, whose connections may still be coming back)
    harness.wait_for(lambda: probe(cluster.gateway, key="outage-1", note="outage").status == 201, timeout=10,
                     what="the replay on any thread")
    assert rows(cluster, "outage") == 1
