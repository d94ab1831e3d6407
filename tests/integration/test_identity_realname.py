"""The population registry, real-name binding, /v1/me, dependents and the access log against real
PostgreSQL, Redis and the gateway: GB 11643 check characters (X included, in either case), the one
"does not match" answer for unknown numbers and wrong names, one number per account (409), the
per-account and per-number look-up limits (429), the dependent rules (children under 14 by the
Shanghai calendar, older parents, at most 4, no duplicates, Idempotency-Key replays), access-log
pages, `cityhall audit verify` catching an edited or deleted row and concurrent appends keeping one
chain, `cityhall seed` twice, `cityhall import registry` all or nothing, and that no raw ID number or
phone number reaches a log line, a Redis key or value, or a clear-text column. Run by tests/run.py.

Registry residents of these tests come from CSV files loaded with `cityhall import registry`, in
Beijing's region 110101, which the synthetic Guangdong population of `cityhall seed` never uses."""

import base64
import datetime
import json
import os
import random
import re
import subprocess

import harness
from harness import wait_for

CLUSTER = {"threads": 2}
TIMEOUT = 240

PB = "application/x-protobuf"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
NO_MATCH = "the ID number and name do not match the registry"
REGION = "110101"
DEMO_PHONES = ("19900000001", "19900000002", "19900000003")

# Every raw ID number and phone number a test used: none may appear in a log line, Redis or a column.
IDS = set()
PHONES = set()
_rng = random.SystemRandom()


# --------------------------------------------------------------------------- registry residents

check_char = harness.id_check_char
china_today = harness.china_today
years_before = harness.years_before


def new_id(birth, sex="M", want_x=False):
    """A fresh valid GB 11643 number in region 110101 (odd sequence: male, even: female)."""
    return harness.new_id_number(REGION, birth, sex, used=IDS, check="X" if want_x else "0123456789")


def new_name():
    return harness.new_name(_rng.choice((2, 3)))


def person(age_years=35, sex=None, want_x=False, birth=None, phone=False):
    """A resident to import: {id, name, sex, birth, phone}."""
    sex = sex or _rng.choice("MF")
    if birth is None:
        birth = years_before(china_today(), age_years) - datetime.timedelta(days=_rng.randrange(1, 300))
    return {"id": new_id(birth, sex, want_x), "name": new_name(), "sex": sex, "birth": birth,
            "phone": harness.new_phone(PHONES) if phone else ""}


def csv_line(p, household=""):
    return f"{p['id']},{p['name']},{p['sex']},{p['birth']:%Y-%m-%d},{REGION},北京市东城区东华门街道1号,{household},{p['phone']}"


HEADER = harness.REGISTRY_HEADER


def import_csv(cluster, lines):
    return harness.import_registry(cluster.gateway, lines, header=None, check=False)


def residents(cluster, *people):
    """Imports people into the registry (asserting success) and returns them."""
    r = harness.import_registry(cluster.gateway, [csv_line(p) for p in people])
    assert f"import: {len(people)} rows" in r.stdout, r.stdout
    return people


# --------------------------------------------------------------------------- citizens (B's SMS login)

def login(cluster, phone=None):
    """An SMS login through the development outbox: the TokenResponse with "phone" and "token"."""
    phone = phone or harness.new_phone(PHONES)
    PHONES.add(phone)
    return harness.sms_login(cluster.gateway, phone)


def call(cluster, who, path, method="GET", body=None, headers=None, http="h2c"):
    h = {"Authorization": f"Bearer {who['token']}"}
    h.update(headers or {})
    return cluster.gateway.request(path, method=method, json=body, headers=h, http=http)


def bind(cluster, who, id_number, name, **kw):
    return call(cluster, who, "/v1/me/real-name", "POST", {"id_number": id_number, "name": name}, **kw)


def add_dependent(cluster, who, p, relation, key=None, name=None, family=True):
    """Adds `p` as who's dependent; `family`: first registers both in one household (the family link it needs)."""
    if family:
        harness.same_household(cluster.gateway, who["citizen_id"], p["id"])
    headers = {"Idempotency-Key": key} if key else None
    return call(cluster, who, "/v1/me/dependents", "POST",
                {"id_number": p["id"], "name": name or p["name"], "relation": relation}, headers=headers)


def verified(cluster, age_years=40, sex=None):
    """A logged-in citizen bound to a fresh registry resident; returns (citizen, resident)."""
    p = person(age_years, sex)
    residents(cluster, p)
    who = login(cluster)
    r = bind(cluster, who, p["id"], p["name"])
    assert r.status == 200, r
    return who, p


def masked_id(id_number):
    return id_number[:4] + "*" * 10 + id_number[14:]


def masked_phone(phone):
    return phone[:3] + "****" + phone[7:]


def masked_name(name):
    return name[0] + "*" * (len(name) - 1)


def assert_error(resp, status, code, message=None):
    return harness.assert_error(resp, status, code, message, hidden=IDS | PHONES)


def account_key(who):
    return f"id:lookup:account:{who['citizen_id']}"


def target_key(cluster, id_number):
    return f"id:lookup:target:{harness.id_hmac(cluster.gateway, id_number)}"


def lift(cluster, key):
    """Ends a limit's window: the key expires by itself, as it would when its time is up."""
    cluster.redis.cli("PEXPIRE", key, 1)
    wait_for(lambda: cluster.redis.cli("EXISTS", key) == "0", timeout=5, what=f"{key} to expire")


def audit_append(cluster, citizen_id, n=1, actor="staff-0001", purpose="counter service"):
    """Appends entries the way ch_audit_query does (access_log_append), as staff reads would."""
    sql = ";".join(f"SELECT access_log_append('{citizen_id}', 'staff', '{actor}', 'police-hukou', NULL, "
                   f"'registry.read', '{purpose} {i}')" for i in range(n))
    cluster.pg.psql(sql)


def audit_verify(cluster):
    return cluster.gateway.run("audit", "verify")


# --------------------------------------------------------------------------- real-name binding

def test_real_name_binds_a_registry_match_and_answers_masked_fields(cluster):
    p = person(33, "F")
    residents(cluster, p)
    who = login(cluster)
    assert who["real_name_verified"] is False
    r = bind(cluster, who, p["id"], p["name"])
    assert r.status == 200, r
    assert r.json() == {"real_name_verified": True, "masked_id_number": masked_id(p["id"]),
                        "masked_name": masked_name(p["name"])}, r
    row = cluster.pg.psql(f"SELECT r.name, c.real_name_verified_at IS NOT NULL FROM citizens c "
                          f"JOIN registry_residents r ON r.resident_id = c.registry_id "
                          f"WHERE c.citizen_id = '{who['citizen_id']}'")
    assert row == f"{p['name']}|t", row
    # the next login says so too
    again = login(cluster, who["phone"])
    assert again["citizen_id"] == who["citizen_id"] and again["real_name_verified"] is True, again


def test_real_name_speaks_protobuf_and_works_over_h2_and_http1(cluster):
    p = person(50)
    residents(cluster, p)
    who = login(cluster)
    body = harness.pb_encode({1: p["id"], 2: p["name"]})
    r = cluster.gateway.request("/v1/me/real-name", method="POST", data=body,
                                headers={"Authorization": f"Bearer {who['token']}", "Content-Type": PB,
                                         "Accept": PB})
    assert r.status == 200 and r.headers.get("content-type", "").startswith(PB), r
    msg = harness.pb_decode(r.body)
    assert msg == {1: [1], 2: [masked_id(p["id"]).encode()], 3: [masked_name(p["name"]).encode()]}, msg
    for http in ("h2", "h1"):
        r = bind(cluster, who, p["id"], p["name"], http=http)
        assert r.status == 200 and r.json()["masked_id_number"] == masked_id(p["id"]), r


def test_real_name_accepts_check_character_x_in_either_case(cluster):
    upper, lower = person(45, want_x=True), person(28, want_x=True)
    residents(cluster, upper, lower)
    assert upper["id"].endswith("X") and lower["id"].endswith("X")
    a, b = login(cluster), login(cluster)
    r = bind(cluster, a, upper["id"], upper["name"])
    assert r.status == 200 and r.json()["masked_id_number"].endswith("X"), r
    # a lower-case x is read as X: people type it either way
    r = bind(cluster, b, lower["id"][:17] + "x", lower["name"])
    assert r.status == 200, r
    assert r.json()["masked_id_number"] == masked_id(lower["id"]), r


def test_real_name_wrong_check_character_is_422_naming_the_reason(cluster):
    p = person(60, want_x=False)
    x = person(61, want_x=True)
    residents(cluster, p, x)
    who = login(cluster)
    wrong = [p["id"][:17] + str((int(p["id"][17]) + 1) % 10), p["id"][:17] + "X", p["id"][:17] + "x",
             x["id"][:17] + "0", x["id"][:17] + "9"]
    for bad in wrong:
        r = bind(cluster, who, bad, p["name"])
        err = assert_error(r, 422, "FAILED_PRECONDITION", "wrong check character")
        assert bad not in err["message"] and bad.upper() not in err["message"], err
    # refused before the registry: nothing was counted, so the right number still binds
    assert cluster.redis.cli("EXISTS", account_key(who)) == "0"
    assert bind(cluster, who, p["id"], p["name"]).status == 200


def test_real_name_malformed_numbers_are_refused_and_not_counted(cluster):
    who = login(cluster)
    today = china_today()
    tomorrow = today + datetime.timedelta(days=1)
    future = f"{REGION}{tomorrow:%Y%m%d}123"
    cases = {
        "11010119900101123": "must be 18 characters",
        "1101011990010112345": "must be 18 characters",
        "11010119900101123A": "must be 17 digits followed by a digit or X",
        "1101011990O101123X": "must be 17 digits followed by a digit or X",
        "91010119900101123" + check_char("91010119900101123"): "invalid region code",
        "11010119901301123" + check_char("11010119901301123"): "invalid birth date",
        "11010119230229123" + check_char("11010119230229123"): "invalid birth date",
        future + check_char(future): "birth date is in the future",
    }
    for bad, reason in cases.items():
        r = bind(cluster, who, bad, "张三")
        err = assert_error(r, 422, "FAILED_PRECONDITION", reason)
        assert err["message"].startswith("id_number: "), err
    assert_error(bind(cluster, who, "", "张三"), 400, "INVALID_ARGUMENT", "id_number")
    p = person()
    assert_error(bind(cluster, who, p["id"], ""), 400, "INVALID_ARGUMENT", "name")
    assert_error(bind(cluster, who, p["id"], "   "), 400, "INVALID_ARGUMENT", "name")
    assert_error(bind(cluster, who, p["id"], "张" * 30), 400, "INVALID_ARGUMENT", "name")
    r = call(cluster, who, "/v1/me/real-name", "POST", {"id_number": p["id"], "name": "张三", "x": 1})
    assert_error(r, 400, "INVALID_ARGUMENT")
    assert cluster.redis.cli("EXISTS", account_key(who)) == "0", "malformed input must not count as a look-up"
    assert cluster.pg.psql(f"SELECT registry_id IS NULL FROM citizens WHERE citizen_id = '{who['citizen_id']}'") == "t"


def test_wrong_name_and_unknown_number_get_the_same_answer(cluster):
    p = person(38)
    residents(cluster, p)
    unknown = new_id(datetime.date(1980, 5, 5))
    who = login(cluster)
    wrong_name = bind(cluster, who, p["id"], p["name"] + "华")
    not_there = bind(cluster, who, unknown, p["name"])
    for r in (wrong_name, not_there):
        err = assert_error(r, 422, "FAILED_PRECONDITION")
        assert err["message"] == NO_MATCH, err
    strip = lambda r: {k: v for k, v in r.json()["error"].items() if k != "request_id"}  # noqa: E731
    assert strip(wrong_name) == strip(not_there)
    assert cluster.pg.psql(f"SELECT registry_id IS NULL FROM citizens WHERE citizen_id = '{who['citizen_id']}'") == "t"


def test_a_number_bound_to_another_account_is_409_and_the_same_pair_again_is_200(cluster):
    p, q = person(30), person(31)
    residents(cluster, p, q)
    a, b = login(cluster), login(cluster)
    first = bind(cluster, a, p["id"], p["name"])
    assert first.status == 200, first
    # the same pair on the same account: idempotent
    again = bind(cluster, a, p["id"], p["name"])
    assert again.status == 200 and again.json() == first.json(), again
    # the same person on another account
    assert_error(bind(cluster, b, p["id"], p["name"]), 409, "ALREADY_EXISTS", "bound to another account")
    assert cluster.pg.psql(f"SELECT registry_id IS NULL, real_name_verified_at IS NULL FROM citizens "
                           f"WHERE citizen_id = '{b['citizen_id']}'") == "t|t"
    # another person on an account that already has one
    assert_error(bind(cluster, a, q["id"], q["name"]), 409, "ALREADY_EXISTS", "already bound to another identity")
    assert bind(cluster, b, q["id"], q["name"]).status == 200


def test_concurrent_binds_of_one_number_leave_exactly_one_account_bound(cluster):
    p = person(42)
    residents(cluster, p)
    people = [login(cluster) for _ in range(4)]
    calls = [harness.curl_async(cluster.gateway.url("/v1/me/real-name"), method="POST",
                                json={"id_number": p["id"], "name": p["name"]},
                                headers={"Authorization": f"Bearer {w['token']}"}) for w in people]
    statuses = sorted(c.wait().status for c in calls)
    assert statuses == [200, 409, 409, 409], statuses
    assert cluster.pg.psql(f"SELECT count(*) FROM citizens c JOIN registry_residents r ON r.resident_id = c.registry_id "
                           f"WHERE r.id_hmac = decode('{harness.id_hmac(cluster.gateway, p['id'])}', 'hex')") == "1"


def test_sixth_look_up_from_one_account_within_the_hour_is_429_until_the_window_ends(cluster):
    p = person(47)
    residents(cluster, p)
    who = login(cluster)
    for _ in range(5):
        assert_error(bind(cluster, who, p["id"], p["name"] + "某"), 422, "FAILED_PRECONDITION", NO_MATCH)
    ttl = int(cluster.redis.cli("TTL", account_key(who)))
    assert 3500 <= ttl <= 3600, ttl
    # the right pair too: the limit answers before the registry does
    err = assert_error(bind(cluster, who, p["id"], p["name"]), 429, "RESOURCE_EXHAUSTED", "this account")
    assert "minutes" in err["message"], err
    assert cluster.pg.psql(f"SELECT registry_id IS NULL FROM citizens WHERE citizen_id = '{who['citizen_id']}'") == "t"
    lift(cluster, account_key(who))
    assert bind(cluster, who, p["id"], p["name"]).status == 200


def test_eleventh_look_up_of_one_number_across_accounts_within_a_day_is_429(cluster):
    target, other = person(52), person(53)
    residents(cluster, target, other)
    a, b, c = login(cluster), login(cluster), login(cluster)
    for who in (a, b):
        for _ in range(5):
            assert_error(bind(cluster, who, target["id"], "某某"), 422, "FAILED_PRECONDITION", NO_MATCH)
    ttl = int(cluster.redis.cli("TTL", target_key(cluster, target["id"])))
    assert 86000 <= ttl <= 86400, ttl
    assert cluster.redis.cli("GET", target_key(cluster, target["id"])) == "10"
    assert_error(bind(cluster, c, target["id"], target["name"]), 429, "RESOURCE_EXHAUSTED", "this ID number")
    # an account over its own limit does not use up the number's attempts
    assert_error(bind(cluster, a, other["id"], other["name"]), 429, "RESOURCE_EXHAUSTED", "this account")
    assert cluster.redis.cli("EXISTS", target_key(cluster, other["id"])) == "0"
    # another number from the third account is fine
    assert bind(cluster, c, other["id"], other["name"]).status == 200
    lift(cluster, target_key(cluster, target["id"]))
    d = login(cluster)
    assert bind(cluster, d, target["id"], target["name"]).status == 200


def test_real_name_routes_need_a_citizen_token(cluster):
    r = cluster.gateway.request("/v1/me/real-name", method="POST", json={"id_number": "x", "name": "y"})
    assert_error(r, 401, "UNAUTHENTICATED")
    for path in ("/v1/me", "/v1/me/dependents", "/v1/me/access-log"):
        assert_error(cluster.gateway.request(path), 401, "UNAUTHENTICATED")
        r = cluster.gateway.request(path, headers={"Authorization": "Bearer not.a.token"})
        assert_error(r, 401, "UNAUTHENTICATED")


# --------------------------------------------------------------------------- /v1/me

def test_me_before_and_after_real_name_shows_only_masked_fields(cluster):
    who = login(cluster)
    r = call(cluster, who, "/v1/me")
    assert r.status == 200, r
    me = r.json()
    assert set(me) == {"citizen_id", "masked_phone", "real_name_verified", "masked_name", "masked_id_number",
                       "dependents", "created_at"}, me
    assert me["citizen_id"] == who["citizen_id"] and me["masked_phone"] == masked_phone(who["phone"]), me
    assert me["real_name_verified"] is False and me["masked_name"] == "" and me["masked_id_number"] == "", me
    assert me["dependents"] == [] and RFC3339.match(me["created_at"]), me
    created = datetime.datetime.fromisoformat(me["created_at"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 300, me

    p = person(36, "M")
    residents(cluster, p)
    assert bind(cluster, who, p["id"], p["name"]).status == 200
    me = call(cluster, who, "/v1/me").json()
    assert me["real_name_verified"] is True, me
    assert me["masked_name"] == masked_name(p["name"]) and me["masked_id_number"] == masked_id(p["id"]), me
    assert who["phone"] not in json.dumps(me, ensure_ascii=False) and p["id"] not in json.dumps(me), me
    # protobuf: the same message
    r = call(cluster, who, "/v1/me", headers={"Accept": PB})
    assert r.status == 200 and r.headers.get("content-type", "").startswith(PB), r
    msg = harness.pb_decode(r.body)
    assert msg[1] == [who["citizen_id"].encode()] and msg[2] == [masked_phone(who["phone"]).encode()], msg
    assert msg[3] == [1] and msg[5] == [masked_id(p["id"]).encode()], msg


def test_me_of_one_citizen_never_shows_another_citizens_data(cluster):
    a, pa = verified(cluster, 40)
    b, pb = verified(cluster, 41)
    child = person(5)
    residents(cluster, child)
    assert add_dependent(cluster, a, child, "child").status == 201
    mb = call(cluster, b, "/v1/me").json()
    assert mb["citizen_id"] == b["citizen_id"] and mb["dependents"] == [], mb
    assert mb["masked_id_number"] == masked_id(pb["id"]), mb
    assert call(cluster, b, "/v1/me/dependents").json() == {"dependents": []}


# --------------------------------------------------------------------------- dependents

def assert_dependent(d, p, relation):
    assert set(d) == {"dependent_id", "relation", "masked_name", "masked_id_number", "added_at"}, d
    assert re.match(r"^\d+$", d["dependent_id"]), d
    assert d["relation"] == relation and d["masked_name"] == masked_name(p["name"]), d
    assert d["masked_id_number"] == masked_id(p["id"]) and RFC3339.match(d["added_at"]), d


def test_a_child_under_14_is_added_and_listed_masked(cluster):
    who, _ = verified(cluster, 35)
    baby = person(birth=china_today() - datetime.timedelta(days=20))
    kid = person(9)
    residents(cluster, baby, kid)
    r = add_dependent(cluster, who, baby, "child")
    assert r.status == 201, r
    assert_dependent(r.json(), baby, "child")
    r2 = add_dependent(cluster, who, kid, "child")
    assert r2.status == 201, r2
    listed = call(cluster, who, "/v1/me/dependents").json()["dependents"]
    assert [d["dependent_id"] for d in listed] == [r.json()["dependent_id"], r2.json()["dependent_id"]], listed
    assert listed[0] == r.json(), (listed, r.json())
    assert_dependent(listed[1], kid, "child")
    me = call(cluster, who, "/v1/me").json()
    assert me["dependents"] == listed, me


def test_a_child_dependent_must_be_under_14_by_the_shanghai_calendar(cluster):
    who, _ = verified(cluster, 45)
    today = china_today()
    turns_14_today = person(birth=years_before(today, 14))
    turns_14_tomorrow = person(birth=years_before(today, 14) + datetime.timedelta(days=1))
    adult = person(20)
    residents(cluster, turns_14_today, turns_14_tomorrow, adult)
    for p in (turns_14_today, adult):
        assert_error(add_dependent(cluster, who, p, "child"), 422, "FAILED_PRECONDITION", "under 14")
    r = add_dependent(cluster, who, turns_14_tomorrow, "child")
    assert r.status == 201, r
    assert cluster.pg.psql(f"SELECT count(*) FROM dependents WHERE guardian_id = '{who['citizen_id']}'") == "1"


def test_a_parent_dependent_must_be_older_than_the_guardian(cluster):
    who, me = verified(cluster, 40)
    younger = person(30)
    older = person(70, "F")
    residents(cluster, younger, older)
    assert_error(add_dependent(cluster, who, younger, "parent"), 422, "FAILED_PRECONDITION", "older than you")
    r = add_dependent(cluster, who, older, "parent")
    assert r.status == 201, r
    assert_dependent(r.json(), older, "parent")
    # a child must also be younger than the guardian
    kid = person(10)
    residents(cluster, kid)
    assert add_dependent(cluster, who, kid, "child").status == 201


def test_a_fifth_dependent_is_refused(cluster):
    who, _ = verified(cluster, 45)
    kids = [person(a) for a in (1, 3, 5, 7, 9)]
    residents(cluster, *kids)
    for k in kids[:4]:
        assert add_dependent(cluster, who, k, "child").status == 201
    lift(cluster, account_key(who))  # a real-name bind and four adds used up the hour's five look-ups
    assert_error(add_dependent(cluster, who, kids[4], "child"), 422, "FAILED_PRECONDITION", "at most 4")
    assert cluster.pg.psql(f"SELECT count(*) FROM dependents WHERE guardian_id = '{who['citizen_id']}'") == "4"


def test_adding_the_same_dependent_twice_is_409(cluster):
    who, _ = verified(cluster, 38)
    kid = person(4)
    residents(cluster, kid)
    assert add_dependent(cluster, who, kid, "child").status == 201
    assert_error(add_dependent(cluster, who, kid, "child"), 409, "ALREADY_EXISTS", "already one of your dependents")
    # another guardian (the other parent) may add the same child
    other, _ = verified(cluster, 39)
    assert add_dependent(cluster, other, kid, "child").status == 201


def test_dependent_rules_for_the_guardian_and_the_registry_match(cluster):
    unverified = login(cluster)
    kid = person(6)
    residents(cluster, kid)
    assert_error(add_dependent(cluster, unverified, kid, "child"), 422, "FAILED_PRECONDITION",
                 "verify your real name")
    who, me = verified(cluster, 80)
    assert_error(add_dependent(cluster, who, me, "parent"), 422, "FAILED_PRECONDITION", "your own dependent")
    assert_error(add_dependent(cluster, who, kid, "child", name=kid["name"] + "某"), 422, "FAILED_PRECONDITION",
                 NO_MATCH)
    r = call(cluster, who, "/v1/me/dependents", "POST", {"id_number": kid["id"], "name": kid["name"],
                                                        "relation": "cousin"})
    assert_error(r, 400, "INVALID_ARGUMENT", "relation")
    bad = kid["id"][:17] + ("0" if kid["id"][17] != "0" else "1")
    assert_error(add_dependent(cluster, who, dict(kid, id=bad), "child"), 422, "FAILED_PRECONDITION",
                 "wrong check character")
    assert cluster.pg.psql(f"SELECT count(*) FROM dependents WHERE guardian_id IN "
                           f"('{who['citizen_id']}', '{unverified['citizen_id']}')") == "0"


def test_a_dependent_needs_a_family_link_in_the_governments_records(cluster):
    """Knowing a child's ID number and name is not enough: one household in the registry, or a birth medical
    certificate naming the guardian as mother or father (or, for a parent, naming the guardian as the child)."""
    who, me = verified(cluster, 36, "F")
    kid, stranger, old = person(5), person(7), person(70)
    residents(cluster, kid, stranger, old)
    assert_error(add_dependent(cluster, who, stranger, "child", family=False), 422, "FAILED_PRECONDITION",
                 "household")
    assert_error(add_dependent(cluster, who, old, "parent", family=False), 422, "FAILED_PRECONDITION", "household")
    assert cluster.pg.psql(f"SELECT count(*) FROM dependents WHERE guardian_id = '{who['citizen_id']}'") == "0"
    # the hospital's birth record of the child names her as the mother
    gw = cluster.gateway
    cluster.pg.psql("INSERT INTO birth_records (cert_no, child_name, child_sex, child_birth_date, hospital, "
                    "mother_id_hmac, child_id_hmac) VALUES "
                    f"('Q{random.randint(10**8, 10**9 - 1)}', '{kid['name']}', '{kid['sex']}', "
                    f"'{kid['birth']:%Y-%m-%d}', '广州市妇女儿童医疗中心', "
                    f"decode('{harness.id_hmac(gw, me['id'])}', 'hex'), decode('{harness.id_hmac(gw, kid['id'])}', 'hex'))")
    assert add_dependent(cluster, who, kid, "child", family=False).status == 201
    # one household in the registry
    assert add_dependent(cluster, who, old, "parent").status == 201


def test_a_dependent_retry_with_the_same_key_replays_and_another_body_is_422(cluster):
    who, _ = verified(cluster, 42)
    kid, other = person(2), person(3)
    residents(cluster, kid, other)
    key = "dep-" + os.urandom(6).hex()
    first = add_dependent(cluster, who, kid, "child", key=key)
    assert first.status == 201, first
    again = add_dependent(cluster, who, kid, "child", key=key)
    assert again.status == 201 and again.json() == first.json(), (first, again)
    assert again.headers.get("idempotent-replayed") == "true", again.headers
    assert cluster.pg.psql(f"SELECT count(*) FROM dependents WHERE guardian_id = '{who['citizen_id']}'") == "1"
    # the replay is answered before the registry: the look-up was counted once
    assert cluster.redis.cli("GET", account_key(who)) == "2"  # the real-name bind, then the first add
    r = add_dependent(cluster, who, other, "child", key=key)
    assert_error(r, 422, "FAILED_PRECONDITION", "Idempotency-Key")
    # a refused add does not claim its key: after fixing the request the same key works
    key2 = "dep-" + os.urandom(6).hex()
    assert_error(add_dependent(cluster, who, other, "parent", key=key2), 422, "FAILED_PRECONDITION")
    assert add_dependent(cluster, who, other, "child", key=key2).status == 201
    listed = call(cluster, who, "/v1/me/dependents").json()["dependents"]
    assert [d["masked_id_number"] for d in listed] == [masked_id(kid["id"]), masked_id(other["id"])], listed


# --------------------------------------------------------------------------- the access log

def test_access_log_pages_newest_first_with_opaque_tokens(cluster):
    who = login(cluster)
    other = login(cluster)
    audit_append(cluster, other["citizen_id"], 3, actor="staff-other")
    audit_append(cluster, who["citizen_id"], 45)
    seen, token, pages = [], None, 0
    while True:
        path = "/v1/me/access-log" + (f"?page_token={token}" if token else "")
        r = call(cluster, who, path)
        assert r.status == 200, r
        page = r.json()
        assert set(page) == {"entries", "next_page_token"}, page
        pages += 1
        seen += page["entries"]
        token = page["next_page_token"]
        if not token:
            break
        assert re.match(r"^[A-Za-z0-9_-]+$", token), token
    assert pages == 3 and len(seen) == 45, (pages, len(seen))
    ids = [int(e["entry_id"]) for e in seen]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 45, ids
    e = seen[0]
    assert set(e) == {"entry_id", "at", "actor_role", "actor", "actor_department", "on_behalf_of", "action",
                      "purpose"}, e
    assert (e["actor_role"], e["actor"], e["actor_department"], e["on_behalf_of"], e["action"], e["purpose"]) == \
        ("staff", "staff-0001", "police-hukou", "", "registry.read", "counter service 44"), e
    assert RFC3339.match(e["at"]), e
    assert all(x["actor"] == "staff-0001" for x in seen), "another citizen's entries leaked into the page"

    r = call(cluster, who, "/v1/me/access-log?page_size=7")
    assert r.status == 200 and len(r.json()["entries"]) == 7 and r.json()["next_page_token"], r
    r = call(cluster, who, "/v1/me/access-log?page_size=500")
    assert r.status == 200 and len(r.json()["entries"]) == 45 and r.json()["next_page_token"] == "", r
    audit_append(cluster, who["citizen_id"], 70)
    r = call(cluster, who, "/v1/me/access-log?page_size=500")
    assert r.status == 200 and len(r.json()["entries"]) == 100 and r.json()["next_page_token"], "capped at 100"
    assert len(call(cluster, who, "/v1/me/access-log?page_size=0").json()["entries"]) == 20, "0 means the default"

    for bad in ("garbage!", "AAAA", base64.urlsafe_b64encode(b"al1:-5").decode().rstrip("="),
                base64.urlsafe_b64encode(b"xx:12").decode().rstrip("=")):
        assert_error(call(cluster, who, f"/v1/me/access-log?page_token={bad}"), 400, "INVALID_ARGUMENT", "page_token")
    for bad in ("abc", "-1", "1.5", "99999999999"):
        assert_error(call(cluster, who, f"/v1/me/access-log?page_size={bad}"), 400, "INVALID_ARGUMENT", "page_size")
    # a token of another citizen's list only moves a cursor in one's own entries
    r = call(cluster, other, "/v1/me/access-log?page_size=2")
    assert [x["actor"] for x in r.json()["entries"]] == ["staff-other", "staff-other"], r


def test_an_empty_access_log_is_an_empty_page(cluster):
    who = login(cluster)
    r = call(cluster, who, "/v1/me/access-log")
    assert r.status == 200 and r.json() == {"entries": [], "next_page_token": ""}, r


def test_audit_verify_passes_then_names_an_edited_row_and_a_deleted_row(cluster):
    a, b = login(cluster), login(cluster)
    audit_append(cluster, a["citizen_id"], 5)
    audit_append(cluster, b["citizen_id"], 5)
    r = audit_verify(cluster)
    assert r.returncode == 0 and r.stdout.startswith("audit verify: OK"), r.stdout + r.stderr

    victim = cluster.pg.psql(f"SELECT entry_id FROM access_log WHERE citizen_id = '{a['citizen_id']}' "
                             f"ORDER BY entry_id OFFSET 2 LIMIT 1")
    original = cluster.pg.psql(f"SELECT purpose FROM access_log WHERE entry_id = {victim}")
    cluster.pg.psql(f"UPDATE access_log SET purpose = 'x' WHERE entry_id = {victim}")
    r = audit_verify(cluster)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"entry {victim} " in r.stdout and "does not match its contents" in r.stdout, r.stdout
    cluster.pg.psql(f"UPDATE access_log SET purpose = '{original}' WHERE entry_id = {victim}")
    assert audit_verify(cluster).returncode == 0

    # deleting an entry breaks the next one's link
    cols = "entry_id, citizen_id, at, actor_role, actor, actor_dept, on_behalf_of, action, purpose, prev_hash, hash"
    rows = cluster.pg.psql(f"SELECT entry_id FROM access_log WHERE citizen_id = '{b['citizen_id']}' ORDER BY entry_id")
    gone, after = rows.split("\n")[1:3]
    cluster.pg.psql(f"CREATE TABLE saved_entry AS SELECT {cols} FROM access_log WHERE entry_id = {gone}; "
                    f"DELETE FROM access_log WHERE entry_id = {gone}")
    r = audit_verify(cluster)
    assert r.returncode == 1 and f"entry {after} " in r.stdout and "prev_hash" in r.stdout, r.stdout
    cluster.pg.psql(f"INSERT INTO access_log ({cols}) SELECT {cols} FROM saved_entry; DROP TABLE saved_entry")
    r = audit_verify(cluster)
    assert r.returncode == 0, r.stdout


def test_concurrent_appends_for_one_citizen_keep_one_chain(cluster):
    who = login(cluster)
    procs = []
    for i in range(6):
        sql = ";".join(f"SELECT access_log_append('{who['citizen_id']}', 'kiosk', 'kiosk-{i}', NULL, NULL, "
                       f"'kiosk.read', 'p{j}')" for j in range(15))
        procs.append(subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p",
                                       str(cluster.pg.port), "-U", "postgres", "-d", "cityhall", "-c", sql],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    # 90 entries, each pointing at a different predecessor: the chain never forked
    row = cluster.pg.psql(f"SELECT count(*), count(DISTINCT prev_hash), count(*) FILTER (WHERE prev_hash IS NULL) "
                          f"FROM access_log WHERE citizen_id = '{who['citizen_id']}'")
    assert row == "90|89|1", row
    r = audit_verify(cluster)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- seed and import

def test_seed_twice_is_idempotent_and_the_demo_accounts_work(cluster):
    r = cluster.gateway.run("seed", "--citizens", "200", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SYNTHETIC" in r.stdout, r.stdout
    for phone in DEMO_PHONES:
        assert phone in r.stdout, r.stdout
    counts = "SELECT (SELECT count(*) FROM registry_residents), (SELECT count(*) FROM citizens), " \
             "(SELECT count(*) FROM dependents)"
    first = cluster.pg.psql(counts)
    r2 = cluster.gateway.run("seed", "--citizens", "200", timeout=300)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "nothing to load" in r2.stdout, r2.stdout
    assert cluster.pg.psql(counts) == first
    # a larger N adds only the residents after the first 200 (the generator is prefix-stable)
    r3 = cluster.gateway.run("seed", "--citizens", "250", timeout=300)
    assert r3.returncode == 0 and "50 added" in r3.stdout, r3.stdout + r3.stderr
    n = int(first.split("|")[0])
    assert cluster.pg.psql("SELECT count(*) FROM registry_residents") == str(n + 50)
    # both runs print the same people
    table = lambda out: [ln for ln in out.splitlines() if re.match(r"^(199\d{8}|-)\s", ln)]  # noqa: E731
    assert table(r.stdout) == table(r2.stdout) and len(table(r.stdout)) == 7, r.stdout
    assert cluster.pg.psql("SELECT count(*) FROM registry_residents WHERE household_id LIKE 'DEMO-%'") == "7"
    # every generated number is a valid GB 11643 number (decrypting is the gateway's job: check the masks)
    assert cluster.pg.psql("SELECT count(*) FROM registry_residents WHERE id_masked !~ '^[1-8][0-9]{3}\\*{10}[0-9]{3}[0-9X]$'") == "0"

    # the parent of elderly dependents logs in real-name verified and sees them
    who = login(cluster, "19900000002")
    assert who["real_name_verified"] is True, who
    me = call(cluster, who, "/v1/me").json()
    assert me["real_name_verified"] is True and len(me["dependents"]) == 2, me
    assert {d["relation"] for d in me["dependents"]} == {"parent"}, me
    # the newcomer binds the printed number and name
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("19900000003")][0]
    fields = line.split()
    id_number, name = fields[3], fields[1]
    assert re.match(r"^\d{17}[\dX]$", id_number) and check_char(id_number[:17]) == id_number[17], line
    IDS.add(id_number)
    newcomer = login(cluster, "19900000003")
    assert newcomer["real_name_verified"] is False, newcomer
    r = bind(cluster, newcomer, id_number, name)
    assert r.status == 200 and r.json()["masked_id_number"] == masked_id(id_number), r
    # the newborn can be added as a child of its mother
    mother = login(cluster, "19900000001")
    baby = [ln for ln in r2.stdout.splitlines() if "the newborn (try" in ln][0].split()
    IDS.add(baby[3])
    r = add_dependent(cluster, mother, {"id": baby[3], "name": baby[1]}, "child")
    assert r.status == 201, r
    for line in table(r2.stdout):
        if re.match(r"^(199\d{8}|-)\s", line):
            IDS.add(line.split()[3])
    PHONES.update(DEMO_PHONES)


def test_import_with_a_bad_row_imports_nothing_and_names_the_lines(cluster):
    good = [person(30), person(40, want_x=True), person(7)]
    bad_check = person(50)
    bad_check_id = bad_check["id"][:17] + ("1" if bad_check["id"][17] != "1" else "2")
    before = cluster.pg.psql("SELECT count(*) FROM registry_residents")
    lines = [HEADER, csv_line(good[0]), csv_line(dict(bad_check, id=bad_check_id)), csv_line(good[1]),
             f"{good[2]['id']},{good[2]['name']},F,{good[2]['birth']:%Y-%m-%d},{REGION},,," if good[2]["sex"] == "M"
             else f"{good[2]['id']},{good[2]['name']},M,{good[2]['birth']:%Y-%m-%d},{REGION},,,",
             f"{good[0]['id']},,M,,,,,", "too,few,fields", f"{good[1]['id']},名字,,1999-01-01,,,,",
             f"{good[1]['id'][:17]}x,名字,,,12345,,,12345"]
    r = import_csv(cluster, lines)
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert "line 3: id_number: wrong check character" in err, err
    assert "line 5: sex: does not agree with the ID number" in err, err
    assert "line 6: name: required" in err, err
    assert "line 7: must have 8 fields" in err, err
    assert "line 8: birth_date: does not agree with the ID number" in err, err
    assert "line 9: region: must be 6 digits" in err, err
    assert "nothing imported" in err, err
    assert "line 2:" not in err and "line 4:" not in err, err
    for raw in [p["id"] for p in good] + [bad_check_id]:
        assert raw not in r.stdout + r.stderr, "an import error echoed a number"
    assert cluster.pg.psql("SELECT count(*) FROM registry_residents") == before

    # the same person twice in one file is refused whole too
    r = import_csv(cluster, [HEADER, csv_line(good[0]), csv_line(good[1]), csv_line(good[0])])
    assert r.returncode == 1 and "line 4: id_number: the same as line 2" in r.stderr, r.stderr
    assert cluster.pg.psql("SELECT count(*) FROM registry_residents") == before

    # the good rows alone import; importing them again updates (a corrected address), never duplicates
    r = import_csv(cluster, [HEADER] + [csv_line(p) for p in good])
    assert r.returncode == 0 and "3 residents added, 0 updated" in r.stdout, r.stdout + r.stderr
    r = import_csv(cluster, ["\ufeff" + HEADER] + [csv_line(p, household="H-1") for p in good])
    assert r.returncode == 0 and "0 residents added, 3 updated" in r.stdout, r.stdout + r.stderr
    assert cluster.pg.psql("SELECT count(*) FROM registry_residents") == str(int(before) + 3)
    assert cluster.pg.psql(f"SELECT count(*) FROM registry_residents WHERE household_id = 'H-1'") == "3"
    # quoted fields with commas and quotes are CSV, not errors
    q = person(25)
    r = import_csv(cluster, [HEADER, f'{q["id"]},"{q["name"]}",{q["sex"]},,,"北京市, ""东城区""",,'])
    assert r.returncode == 0, r.stderr
    assert cluster.pg.psql(f"SELECT address FROM registry_residents WHERE id_hmac = "
                           f"decode('{harness.id_hmac(cluster.gateway, q['id'])}', 'hex')") == '北京市, "东城区"'
    assert import_csv(cluster, ["id,name", "1,2"]).returncode == 1


# --------------------------------------------------------------------------- personal data never leaks (last)

def test_no_raw_id_number_or_phone_in_logs_redis_or_any_clear_text_column(cluster):
    assert IDS and PHONES, "the tests above should have used numbers"
    raws = sorted(IDS | PHONES | {i[:17] + "x" for i in IDS if i.endswith("X")})

    log = cluster.gateway.log_text()
    assert log, "expected a gateway log"
    for raw in raws:
        assert raw not in log, f"a raw number in the gateway log"

    keys = [k for k in cluster.redis.cli("--scan").split() if k]
    assert any(k.startswith("id:lookup:") for k in keys), keys
    text = cluster.redis.dump()
    for raw in raws:
        assert raw not in text, "a raw number in Redis"

    # every text-like column of every table (and bytea ones, as bytes: only ciphertext and hashes there)
    cols = cluster.pg.psql("SELECT table_name, column_name, data_type FROM information_schema.columns "
                           "WHERE table_schema = 'public' AND data_type IN ('text', 'character varying', "
                           "'character', 'json', 'jsonb', 'ARRAY', 'bytea')").split("\n")
    assert len(cols) > 10, cols
    patterns = "ARRAY[" + ",".join(f"'%{r}%'" for r in raws) + "]"
    for line in cols:
        table, column, kind = line.split("|")
        expr = f"encode(\"{column}\", 'escape')" if kind == "bytea" else f"\"{column}\"::text"
        n = cluster.pg.psql(f"SELECT count(*) FROM \"{table}\" WHERE {expr} LIKE ANY ({patterns})")
        assert n == "0", f"a raw number in {table}.{column}"
