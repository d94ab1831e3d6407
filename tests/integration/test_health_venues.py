"""Venues (场所码), check-ins, confirmed cases and appeals against real PostgreSQL, Redis and the gateway:
staff register venues whose QR text is a signed token that verifies with the published JWKS; a check-in answers
with the citizen's current code only once its row is committed, by group commit (many parallel check-ins, each
stored exactly once, a retry with an Idempotency-Key stored once); unknown venues are 404; a confirmed case marks
the residents who overlapped with it at a venue as close contacts (red) and leaves one who was there a day apart
green, with a contact query that runs on the (venue_id, at) index; appeals are decided by two staff members (one
alone can never change a color), the citizen sees the state of their own appeals and no one else's, and staff
views are in the citizen's access log; `cityhall seed` prints demo venues and can run twice. Run by tests/run.py.

Registry residents come from CSV files loaded with `cityhall import registry` (region 120101, which the
synthetic population of `cityhall seed` never uses); citizens log in by SMS code through the development outbox;
staff accounts and the department client are made with `cityhall staff add` / `cityhall client add`, and TOTP
codes are computed here (RFC 6238)."""

import base64
import datetime
import json
import random
import re
import time
import uuid

import harness
from harness import wait_for

CLUSTER = {"threads": 2}
TIMEOUT = 240

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
REGION = "120101"
FOUR_EYES = "four-eyes: a second staff member must decide"

_rng = random.SystemRandom()
IDS = set()      # every raw ID number used here: none may appear in an answer
PHONES = set()


# --------------------------------------------------------------------------- people

def person(age=35):
    sex = _rng.choice("MF")
    birth = datetime.date.today() - datetime.timedelta(days=365 * age + _rng.randrange(1, 300))
    name = _rng.choice("赵钱孙李周吴郑王冯陈") + "".join(_rng.choice("伟芳娜敏静丽强磊军洋") for _ in range(2))
    return {"id": harness.new_id_number(REGION, birth, sex, used=IDS), "name": name, "sex": sex, "birth": birth}


def import_residents(cluster, *people):
    harness.import_registry(cluster.gateway, [
        (p["id"], p["name"], p["sex"], p["birth"], REGION, "天津市和平区南京路1号", "", "") for p in people])
    for p in people:
        p["resident_id"] = harness.resident_id(cluster.gateway, p["id"])
    return people


def psql(cluster, sql):
    return cluster.pg.psql(sql)


def login(cluster):
    """A new citizen account by SMS login: the TokenResponse with "phone" and "token"."""
    return harness.sms_login(cluster.gateway, harness.new_phone(PHONES))


def citizen(cluster, p=None):
    """A logged-in citizen bound to a fresh registry resident: {..., "person"}."""
    p = p or import_residents(cluster, person())[0]
    who = login(cluster)
    harness.bind_real_name(cluster.gateway, who["token"], p["id"], p["name"])
    who["person"] = p
    return who


def call(cluster, who, path, method="GET", body=None, headers=None, **kw):
    h = {"Authorization": f"Bearer {who['token']}"}
    h.update(headers or {})
    return cluster.gateway.request(path, method=method, json=body, headers=h, **kw)


def assert_error(resp, status, code, message=None):
    return harness.assert_error(resp, status, code, message, hidden=IDS)


# --------------------------------------------------------------------------- staff and the health authority

def staff(cluster, dept="health", roles=None):
    """A new staff account, logged in: {"username", "staff_id", "token", ...}."""
    return harness.staff_token(cluster.gateway, dept, roles=roles)


def dept(cluster):
    """A health-authority client's dept token: {"client_id", "token", ...}."""
    return harness.client_token(cluster.gateway, "health")


# --------------------------------------------------------------------------- venues, codes, tokens

def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def jws_parts(token):
    h, p, s = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p)), b64url_decode(s)


def verify_with_jwks(cluster, token):
    """Verifies a compact ES256 JWS with the published JWKS using python3-cryptography (not cityhall's code)."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils
    except ImportError:
        raise harness.Skip("python3-cryptography is not installed (apt-get install python3-cryptography)")
    header, claims, sig = jws_parts(token)
    r = cluster.gateway.request("/v1/health/keys")
    assert r.status == 200, r
    keys = {k["kid"]: k for k in r.json()["keys"]}
    assert header["alg"] == "ES256" and header["kid"] in keys, (header, list(keys))
    k = keys[header["kid"]]
    pub = ec.EllipticCurvePublicNumbers(int.from_bytes(b64url_decode(k["x"]), "big"),
                                        int.from_bytes(b64url_decode(k["y"]), "big"), ec.SECP256R1()).public_key()
    assert len(sig) == 64
    der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    signing_input = token.rsplit(".", 1)[0].encode()
    pub.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature
    forged = token.rsplit(".", 1)[0][:-2] + ("AA" if not token.rsplit(".", 1)[0].endswith("AA") else "BB")
    try:
        pub.verify(der, forged.encode(), ec.ECDSA(hashes.SHA256()))
        raise AssertionError("a changed venue token verified")
    except InvalidSignature:
        pass
    return header, claims


def new_venue(cluster, who=None, name=None, region="120101"):
    who = who or shared(cluster, "staff", lambda: staff(cluster))
    body = {"name": name or f"测试场所{_rng.randrange(10**6)}", "region": region, "address": "天津市和平区南京路189号"}
    r = call(cluster, who, "/v1/venues", "POST", body)
    assert r.status == 201, r
    return r.json()


shared = harness.shared


def code_of(cluster, who):
    r = call(cluster, who, "/v1/health/code")
    assert r.status == 200, r
    return r.json()


def checkin(cluster, who, venue_id, body=None, headers=None):
    return call(cluster, who, f"/v1/venues/{venue_id}/checkins", "POST", body or {}, headers=headers)


def rows(cluster, sql):
    out = psql(cluster, sql)
    return [line.split("|") for line in out.splitlines() if line]


# --------------------------------------------------------------------------- venues

def test_staff_register_a_venue_whose_qr_text_is_a_signed_token_and_citizens_may_not(cluster):
    s = staff(cluster)
    r = call(cluster, s, "/v1/venues", "POST", {"name": "  和平大悦城  ", "region": "120101",
                                                 "address": "天津市和平区南京路189号"})
    assert r.status == 201, r
    v = r.json()
    assert UUID.match(v["venue_id"]) and v["name"] == "和平大悦城" and v["region"] == "120101", v
    assert v["address"] == "天津市和平区南京路189号", v
    header, claims = verify_with_jwks(cluster, v["qr_text"])
    assert header["typ"] == "venue+jwt", header
    assert claims["iss"] == "cityhall" and claims["sub"] == v["venue_id"] and claims["rg"] == "120101", claims
    assert claims["nm"] == "和平大悦城" and "exp" not in claims, claims
    row = rows(cluster, f"SELECT name, region, address, created_by FROM venues WHERE venue_id = '{v['venue_id']}'")
    assert row == [["和平大悦城", "120101", "天津市和平区南京路189号", s["staff_id"]]], row

    who = citizen(cluster)
    assert_error(call(cluster, who, "/v1/venues", "POST", {"name": "x", "region": "120101", "address": "y"}),
                 403, "PERMISSION_DENIED")
    for body, field in (({"name": "", "region": "120101", "address": "a"}, "name"),
                        ({"name": "n" * 101, "region": "120101", "address": "a"}, "name"),
                        ({"name": "n\u0007", "region": "120101", "address": "a"}, "name"),
                        ({"name": "n", "region": "12010", "address": "a"}, "region"),
                        ({"name": "n", "region": "920101", "address": "a"}, "region"),
                        ({"name": "n", "region": "12010a", "address": "a"}, "region"),
                        ({"name": "n", "region": "120101", "address": ""}, "address"),
                        ({"name": "n", "region": "120101", "address": "地" * 201}, "address")):
        err = assert_error(call(cluster, s, "/v1/venues", "POST", body), 400, "INVALID_ARGUMENT")
        assert err["message"].startswith(field + ":"), (body, err)
    # a name of 100 CJK characters (300 bytes) is within the limit: characters are counted, not bytes
    r = call(cluster, s, "/v1/venues", "POST", {"name": "店" * 100, "region": "120101", "address": "a"})
    assert r.status == 201, r


def test_venue_registration_with_an_idempotency_key_creates_one_venue(cluster):
    s = staff(cluster)
    body = {"name": "南开大学图书馆", "region": "120104", "address": "天津市南开区卫津路94号"}
    key = "venue-" + uuid.uuid4().hex
    first = call(cluster, s, "/v1/venues", "POST", body, headers={"Idempotency-Key": key})
    again = call(cluster, s, "/v1/venues", "POST", body, headers={"Idempotency-Key": key})
    assert first.status == again.status == 201, (first, again)
    assert again.json() == first.json() and again.headers.get("idempotent-replayed") == "true", (first, again)
    assert psql(cluster, "SELECT count(*) FROM venues WHERE name = '南开大学图书馆'") == "1"


# --------------------------------------------------------------------------- check-ins

def test_checkin_answers_with_the_current_code_after_the_row_is_committed(cluster):
    who = citizen(cluster)
    v = new_venue(cluster)
    before = time.time()
    r = checkin(cluster, who, v["venue_id"])
    assert r.status == 201, r
    body = r.json()
    assert UUID.match(body["checkin_id"]) and body["checkin_id"][14] == "7", body  # time-ordered (UUIDv7)
    assert RFC3339.match(body["at"]), body
    at = datetime.datetime.fromisoformat(body["at"].replace("Z", "+00:00")).timestamp()
    assert before - 2 <= at <= time.time() + 2, (before, body["at"])
    code = body["code"]
    assert code["color"] == "green" and code["token"].count(".") == 2, code
    assert code["masked_name"] == who["person"]["name"][0] + "*" * (len(who["person"]["name"]) - 1), code
    _, claims, _ = jws_parts(code["token"])
    assert claims["col"] == "green" and claims["sub"] == code["code_id"], claims
    # acknowledged only after the commit: the row is there as soon as the answer is
    row = rows(cluster, "SELECT venue_id, resident_id, (extract(epoch FROM at) * 1000000)::bigint FROM checkins "
                        f"WHERE checkin_id = '{body['checkin_id']}'")
    assert row == [[v["venue_id"], str(who["person"]["resident_id"]), row[0][2]]], row
    assert abs(int(row[0][2]) / 1e6 - at) < 1e-3, (row, at)


def test_checkin_for_a_dependent_records_the_dependent_and_answers_with_their_code(cluster):
    parent, child = import_residents(cluster, person(40), person(8))
    who = citizen(cluster, parent)
    harness.same_household(cluster.gateway, who["citizen_id"], child["id"])
    r = call(cluster, who, "/v1/me/dependents", "POST", {"id_number": child["id"], "name": child["name"],
                                                          "relation": "child"})
    assert r.status in (200, 201), r
    v = new_venue(cluster)
    r = checkin(cluster, who, v["venue_id"], {"dependent_id": str(child["resident_id"])})
    assert r.status == 201, r
    body = r.json()
    assert body["code"]["masked_name"].startswith(child["name"][0]), body
    assert psql(cluster, f"SELECT resident_id FROM checkins WHERE checkin_id = '{body['checkin_id']}'") == \
        str(child["resident_id"])
    # someone else's resident is not a dependent: 404, nothing written
    stranger = import_residents(cluster, person(9))[0]
    n = psql(cluster, "SELECT count(*) FROM checkins")
    assert_error(checkin(cluster, who, v["venue_id"], {"dependent_id": str(stranger["resident_id"])}), 404,
                 "NOT_FOUND")
    assert psql(cluster, "SELECT count(*) FROM checkins") == n


def test_fifty_parallel_checkins_are_all_acknowledged_and_each_stored_exactly_once(cluster):
    people = [citizen(cluster) for _ in range(5)]
    v = new_venue(cluster)
    calls = []
    for i in range(50):
        who = people[i % len(people)]
        calls.append(harness.curl_async(cluster.gateway.url(f"/v1/venues/{v['venue_id']}/checkins"), method="POST",
                                        headers={"Authorization": f"Bearer {who['token']}"}, json={}, timeout=20))
    answers = [c.wait() for c in calls]
    assert all(a.status == 201 for a in answers), [a for a in answers if a.status != 201][:3]
    ids = [a.json()["checkin_id"] for a in answers]
    assert len(set(ids)) == 50, ids
    stored = rows(cluster, f"SELECT checkin_id, count(*) OVER (PARTITION BY checkin_id) FROM checkins "
                           f"WHERE venue_id = '{v['venue_id']}'")
    assert sorted(r[0] for r in stored) == sorted(ids) and all(r[1] == "1" for r in stored), stored
    # and each row belongs to the citizen whose request it answered
    owner = {r[0]: r[1] for r in rows(cluster, f"SELECT checkin_id, resident_id FROM checkins "
                                               f"WHERE venue_id = '{v['venue_id']}'")}
    for i, a in enumerate(answers):
        assert owner[a.json()["checkin_id"]] == str(people[i % len(people)]["person"]["resident_id"])


def test_a_checkin_retried_with_its_idempotency_key_is_stored_once_and_answered_alike(cluster):
    who = citizen(cluster)
    v = new_venue(cluster)
    key = "scan-" + uuid.uuid4().hex
    first = checkin(cluster, who, v["venue_id"], headers={"Idempotency-Key": key})
    again = checkin(cluster, who, v["venue_id"], headers={"Idempotency-Key": key})
    assert first.status == again.status == 201, (first, again)
    assert again.json() == first.json() and again.headers.get("idempotent-replayed") == "true", (first, again)
    assert psql(cluster, f"SELECT count(*) FROM checkins WHERE venue_id = '{v['venue_id']}'") == "1"
    # the same key for another venue is another request: 422, nothing written
    other = new_venue(cluster)
    assert_error(checkin(cluster, who, other["venue_id"], headers={"Idempotency-Key": key}), 422,
                 "FAILED_PRECONDITION")
    assert psql(cluster, f"SELECT count(*) FROM checkins WHERE venue_id = '{other['venue_id']}'") == "0"

    # retries racing each other (same key, in flight at once) and keyless scans in the same batches
    key2 = "scan-" + uuid.uuid4().hex
    calls = [harness.curl_async(cluster.gateway.url(f"/v1/venues/{v['venue_id']}/checkins"), method="POST",
                                headers={"Authorization": f"Bearer {who['token']}",
                                         **({"Idempotency-Key": key2} if i % 2 == 0 else {})},
                                json={}, timeout=20) for i in range(20)]
    answers = [c.wait() for c in calls]
    assert all(a.status == 201 for a in answers), [a for a in answers if a.status != 201][:3]
    keyed = [a.json() for i, a in enumerate(answers) if i % 2 == 0]
    assert all(k == keyed[0] for k in keyed), keyed
    assert psql(cluster, f"SELECT count(*) FROM checkins WHERE venue_id = '{v['venue_id']}'") == str(1 + 1 + 10)
    assert psql(cluster, f"SELECT count(*) FROM checkins WHERE checkin_id = '{keyed[0]['checkin_id']}'") == "1"


def test_checkin_at_an_unknown_venue_is_404_and_writes_nothing(cluster):
    who = citizen(cluster)
    n = psql(cluster, "SELECT count(*) FROM checkins")
    for venue in (str(uuid.uuid4()), "not-a-venue", "5E1F0000-0000-4000-8000-00000000000Z"):
        assert_error(checkin(cluster, who, venue), 404, "NOT_FOUND", "no such venue")
    assert psql(cluster, "SELECT count(*) FROM checkins") == n
    # an account without a real name has no code to show: 422
    v = new_venue(cluster)
    assert_error(checkin(cluster, login(cluster), v["venue_id"]), 422, "FAILED_PRECONDITION")
    assert psql(cluster, "SELECT count(*) FROM checkins") == n
    # staff and departments do not scan venue codes
    assert_error(checkin(cluster, shared(cluster, "staff", lambda: staff(cluster)), v["venue_id"]), 403,
                 "PERMISSION_DENIED")


# --------------------------------------------------------------------------- confirmed cases

def backdate(cluster, checkin_id, hours):
    psql(cluster, f"UPDATE checkins SET at = at - interval '{hours} hours' WHERE checkin_id = '{checkin_id}'")


def confirm(cluster, d, p, at=None, headers=None):
    body = {"id_number": p["id"]}
    if at is not None:
        body["confirmed_at"] = at
    return call(cluster, d, "/v1/health/confirmed-cases", "POST", body, headers=headers)


def reasons(code):
    return [r["code"] for r in code["reasons"]]


def test_a_confirmed_case_turns_who_overlapped_at_a_venue_red_and_not_who_came_a_day_apart(cluster):
    case, near, later, elsewhere, second = (citizen(cluster) for _ in range(5))
    v, w = new_venue(cluster), new_venue(cluster)
    c = checkin(cluster, case, v["venue_id"]).json()
    backdate(cluster, c["checkin_id"], 30)                       # the case was at V 30 hours ago
    n = checkin(cluster, near, v["venue_id"]).json()
    backdate(cluster, n["checkin_id"], 29)                       # an hour after the case: overlap
    l1 = checkin(cluster, later, v["venue_id"]).json()            # now: a day and more after the case
    l2 = checkin(cluster, later, w["venue_id"]).json()
    backdate(cluster, l2["checkin_id"], 30)                      # at the same time, but at another venue
    e = checkin(cluster, elsewhere, w["venue_id"]).json()
    backdate(cluster, e["checkin_id"], 30)
    n2 = checkin(cluster, near, w["venue_id"]).json()
    backdate(cluster, n2["checkin_id"], 20)                      # the contact, later, at W ...
    s2 = checkin(cluster, second, w["venue_id"]).json()
    backdate(cluster, s2["checkin_id"], 21)                      # ... with someone the case never met: one remove
    assert l1 and e

    d = dept(cluster)
    r = confirm(cluster, d, case["person"])
    assert r.status == 200, r
    assert r.json() == {"contacts": 1}, r.json()
    assert psql(cluster, f"SELECT count(*) FROM confirmed_cases WHERE resident_id = {case['person']['resident_id']}"
                ) == "1"
    marks = rows(cluster, "SELECT resident_id, kind FROM contact_marks ORDER BY resident_id")
    assert [str(near["person"]["resident_id"]), "close"] in marks, marks
    assert not any(m[0] in (str(later["person"]["resident_id"]), str(elsewhere["person"]["resident_id"]))
                   for m in marks), marks

    red = wait_for(lambda: (lambda c: c if c["color"] == "red" else None)(code_of(cluster, near)), timeout=10,
                   what="the close contact's code turning red")
    assert "CLOSE_CONTACT" in reasons(red), red
    case_code = wait_for(lambda: (lambda c: c if c["color"] == "red" else None)(code_of(cluster, case)), timeout=10,
                         what="the case's code turning red")
    assert "POSITIVE_TEST" in reasons(case_code), case_code
    yellow = wait_for(lambda: (lambda c: c if c["color"] == "yellow" else None)(code_of(cluster, second)), timeout=10,
                      what="the contact at one remove turning yellow")
    assert "SECONDARY_CONTACT" in reasons(yellow), yellow
    assert rows(cluster, f"SELECT kind FROM contact_marks WHERE resident_id = {second['person']['resident_id']}") == \
        [["secondary"]]
    assert code_of(cluster, later)["color"] == "green"
    assert code_of(cluster, elsewhere)["color"] == "green"

    # reported again, at the same time or later: nobody is marked twice, the answer is the same
    at = psql(cluster, "SELECT to_char(confirmed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM "
                       f"confirmed_cases WHERE resident_id = {case['person']['resident_id']}")
    for again in (at, None):
        r = confirm(cluster, d, case["person"], at=again)
        assert r.status == 200 and r.json() == {"contacts": 1}, r
    assert psql(cluster, f"SELECT count(*) FROM confirmed_cases WHERE resident_id = {case['person']['resident_id']}"
                ) == "2"
    assert psql(cluster, f"SELECT count(*) FROM contact_marks WHERE resident_id = {near['person']['resident_id']} "
                         "AND kind = 'close'") == "1"


def test_confirmed_case_input_is_checked_and_only_departments_report_cases(cluster):
    d = dept(cluster)
    who = citizen(cluster)
    assert_error(call(cluster, who, "/v1/health/confirmed-cases", "POST", {"id_number": who["person"]["id"]}), 403,
                 "PERMISSION_DENIED")
    bad = who["person"]["id"][:17] + ("0" if who["person"]["id"][17] != "0" else "1")
    assert_error(confirm(cluster, d, {"id": bad}), 400, "INVALID_ARGUMENT", "id_number")
    assert_error(confirm(cluster, d, {"id": "12345"}), 400, "INVALID_ARGUMENT", "id_number")
    future = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert_error(confirm(cluster, d, who["person"], at=future), 400, "INVALID_ARGUMENT", "confirmed_at")
    unknown = person()
    assert_error(confirm(cluster, d, unknown), 404, "NOT_FOUND")
    # an Idempotency-Key retry answers the first result
    key = "case-" + uuid.uuid4().hex
    first = confirm(cluster, d, who["person"], headers={"Idempotency-Key": key})
    again = confirm(cluster, d, who["person"], headers={"Idempotency-Key": key})
    assert first.status == again.status == 200 and first.json() == again.json(), (first, again)
    assert again.headers.get("idempotent-replayed") == "true", again.headers


def test_the_contact_query_runs_on_the_venue_time_index(cluster):
    # a realistic table: 60 000 check-ins at 600 venues over 14 days, so that the planner has a choice
    psql(cluster, "INSERT INTO checkins (checkin_id, venue_id, resident_id, at) "
                  "SELECT gen_random_uuid(), ('00000000-0000-4000-8000-' || lpad((g % 600)::text, 12, '0'))::uuid, "
                  "       900000000 + g % 5000, now() - (g % 20160) * interval '1 minute' "
                  "FROM generate_series(1, 60000) g; ANALYZE checkins;")
    plan = psql(cluster, "EXPLAIN SELECT * FROM hc_case_contacts(900000007, now(), interval '2 hours')")
    assert "checkins_venue_at" in plan, plan
    assert "Seq Scan" not in plan, plan
    # and it finds what it should: the synthetic resident 900000007's check-ins have neighbours
    n = int(psql(cluster, "SELECT count(*) FROM hc_case_contacts(900000007, now(), interval '2 hours')"))
    assert n > 0, n
    psql(cluster, "DELETE FROM checkins WHERE resident_id >= 900000000; ANALYZE checkins;")


# --------------------------------------------------------------------------- appeals

def make_red(cluster, who):
    """Reports the citizen as a confirmed case (a positive test): their code turns red."""
    r = confirm(cluster, shared(cluster, "dept", lambda: dept(cluster)), who["person"])
    assert r.status == 200, r
    return wait_for(lambda: (lambda c: c if c["color"] == "red" else None)(code_of(cluster, who)), timeout=10,
                    what="the code turning red")


def appeal(cluster, who, reason="我已核酸检测阴性，申请复核", **extra):
    return call(cluster, who, "/v1/health/appeals", "POST", dict({"reason": reason}, **extra))


def access_actors(cluster, who):
    r = call(cluster, who, "/v1/me/access-log")
    assert r.status == 200, r
    return [(e.get("actor"), e.get("action")) for e in r.json()["entries"]]


def test_one_staff_member_alone_cannot_change_a_color_and_two_can(cluster):
    who = citizen(cluster)
    make_red(cluster, who)
    r = appeal(cluster, who)
    assert r.status == 201, r
    a = r.json()
    assert UUID.match(a["appeal_id"]) and a["state"] == "submitted" and a["color_at_appeal"] == "red", a

    first, second = staff(cluster), staff(cluster)
    r = call(cluster, first, f"/v1/staff/health/appeals/{a['appeal_id']}/proposal", "POST",
             {"decision": "approve", "color": "green", "note": "两次阴性"})
    assert r.status == 200, r
    assert r.json()["state"] == "proposed" and r.json()["proposed_by"] == first["staff_id"], r.json()
    assert r.json()["proposed_decision"] == "approve" and r.json()["proposed_color"] == "green", r.json()

    # the proposer cannot confirm their own proposal, whatever they say
    for approve in (True, False):
        assert_error(call(cluster, first, f"/v1/staff/health/appeals/{a['appeal_id']}/approval", "POST",
                          {"approve": approve}), 403, "PERMISSION_DENIED", FOUR_EYES)
    time.sleep(0.5)
    assert code_of(cluster, who)["color"] == "red"
    assert psql(cluster, f"SELECT state FROM appeals WHERE appeal_id = '{a['appeal_id']}'") == "proposed"
    assert psql(cluster, f"SELECT count(*) FROM health_overrides WHERE appeal_id = '{a['appeal_id']}'") == "0"
    # and the table refuses it too, whatever the application does
    out = psql(cluster, f"DO $$ BEGIN UPDATE appeals SET state = 'approved', decided_by = proposed_by, "
                        f"decided_at = now() WHERE appeal_id = '{a['appeal_id']}'; "
                        "EXCEPTION WHEN check_violation THEN RAISE NOTICE 'refused'; END $$; "
                        f"SELECT state FROM appeals WHERE appeal_id = '{a['appeal_id']}'")
    assert out.strip().endswith("proposed"), out

    r = call(cluster, second, f"/v1/staff/health/appeals/{a['appeal_id']}/approval", "POST",
             {"approve": True, "note": "同意"})
    assert r.status == 200, r
    done = r.json()
    assert done["state"] == "approved" and done["decided_by"] == second["staff_id"], done
    assert done["proposed_by"] == first["staff_id"] and RFC3339.match(done["decided_at"]), done
    row = rows(cluster, "SELECT color, round(extract(epoch FROM expires_at - decided_at) / 86400) FROM "
                        f"health_overrides WHERE appeal_id = '{a['appeal_id']}'")
    assert row == [["green", "7"]], row
    green = wait_for(lambda: (lambda c: c if c["color"] == "green" else None)(code_of(cluster, who)), timeout=10,
                     what="the override turning the code green")
    assert "APPEAL_OVERRIDE" in reasons(green), green
    # both staff members are in the citizen's access log
    actors = access_actors(cluster, who)
    assert (first["staff_id"], "healthcode.appeal.propose") in actors, actors
    assert (second["staff_id"], "healthcode.appeal.approve") in actors, actors
    # a decided appeal takes no further decision
    assert_error(call(cluster, first, f"/v1/staff/health/appeals/{a['appeal_id']}/approval", "POST",
                      {"approve": True}), 422, "FAILED_PRECONDITION")


def test_a_declined_proposal_goes_back_and_a_confirmed_rejection_changes_nothing(cluster):
    who = citizen(cluster)
    make_red(cluster, who)
    a = appeal(cluster, who).json()
    s1, s2, s3 = staff(cluster), staff(cluster), staff(cluster)
    path = f"/v1/staff/health/appeals/{a['appeal_id']}"
    assert call(cluster, s1, path + "/proposal", "POST", {"decision": "approve"}).status == 200
    r = call(cluster, s2, path + "/approval", "POST", {"approve": False, "note": "证据不足"})
    assert r.status == 200 and r.json()["state"] == "submitted" and r.json()["proposed_by"] == "", r
    # a second proposal on a proposed appeal, and a decision without a proposal: refused
    assert_error(call(cluster, s3, path + "/approval", "POST", {"approve": True}), 422, "FAILED_PRECONDITION")
    assert call(cluster, s2, path + "/proposal", "POST", {"decision": "reject", "note": "证据不足"}).status == 200
    assert_error(call(cluster, s1, path + "/proposal", "POST", {"decision": "approve"}), 422, "FAILED_PRECONDITION")
    r = call(cluster, s3, path + "/approval", "POST", {"approve": True})
    assert r.status == 200 and r.json()["state"] == "rejected", r
    assert psql(cluster, f"SELECT count(*) FROM health_overrides WHERE appeal_id = '{a['appeal_id']}'") == "0"
    assert code_of(cluster, who)["color"] == "red"
    # bad input
    b = appeal(cluster, who).json()   # a new appeal is possible once the last one is decided
    path = f"/v1/staff/health/appeals/{b['appeal_id']}"
    assert_error(call(cluster, s1, path + "/proposal", "POST", {"decision": "maybe"}), 400, "INVALID_ARGUMENT",
                 "decision")
    assert_error(call(cluster, s1, path + "/proposal", "POST", {"decision": "approve", "color": "red"}), 400,
                 "INVALID_ARGUMENT", "color")
    assert_error(call(cluster, s1, path + "/proposal", "POST", {"decision": "reject", "color": "green"}), 400,
                 "INVALID_ARGUMENT", "color")
    assert_error(call(cluster, s1, f"/v1/staff/health/appeals/{uuid.uuid4()}/proposal", "POST",
                      {"decision": "reject"}), 404, "NOT_FOUND")
    assert_error(call(cluster, s1, f"/v1/staff/health/appeals/{uuid.uuid4()}/approval", "POST",
                      {"approve": True}), 404, "NOT_FOUND")
    assert_error(call(cluster, who, path + "/proposal", "POST", {"decision": "approve"}), 403, "PERMISSION_DENIED")


def test_citizens_see_their_own_appeals_and_no_one_elses(cluster):
    who, other = citizen(cluster), citizen(cluster)
    # a green code has nothing to appeal
    assert_error(appeal(cluster, who), 422, "FAILED_PRECONDITION", "yellow or red")
    make_red(cluster, who)
    assert_error(appeal(cluster, who, reason=""), 400, "INVALID_ARGUMENT", "reason")
    assert_error(appeal(cluster, who, reason="x" * 1001), 400, "INVALID_ARGUMENT", "reason")
    a = appeal(cluster, who).json()
    assert_error(appeal(cluster, who, reason="再次申请"), 409, "ALREADY_EXISTS")

    r = call(cluster, who, "/v1/health/appeals")
    assert r.status == 200, r
    mine = r.json()["appeals"]
    assert [x["appeal_id"] for x in mine] == [a["appeal_id"]] and mine[0]["state"] == "submitted", mine
    r = call(cluster, who, f"/v1/health/appeals/{a['appeal_id']}")
    assert r.status == 200 and r.json()["appeal_id"] == a["appeal_id"], r

    assert call(cluster, other, "/v1/health/appeals").json()["appeals"] == []
    assert_error(call(cluster, other, f"/v1/health/appeals/{a['appeal_id']}"), 404, "NOT_FOUND", "no such appeal")
    assert_error(call(cluster, other, f"/v1/health/appeals/{uuid.uuid4()}"), 404, "NOT_FOUND", "no such appeal")
    assert_error(call(cluster, other, "/v1/health/appeals/nope"), 404, "NOT_FOUND")

    # the state moves as staff work it
    s1 = staff(cluster)
    call(cluster, s1, f"/v1/staff/health/appeals/{a['appeal_id']}/proposal", "POST", {"decision": "reject"})
    assert call(cluster, who, f"/v1/health/appeals/{a['appeal_id']}").json()["state"] == "proposed"


def test_the_staff_queue_pages_open_appeals_and_each_view_is_in_the_citizens_access_log(cluster):
    people = [citizen(cluster) for _ in range(3)]
    ids = []
    for who in people:
        make_red(cluster, who)
        ids.append(appeal(cluster, who).json()["appeal_id"])
    s = staff(cluster)
    seen, token = [], ""
    while True:
        r = call(cluster, s, "/v1/staff/health/appeals?page_size=2" + (f"&page_token={token}" if token else ""))
        assert r.status == 200, r
        page = r.json()
        assert len(page["appeals"]) <= 2, page
        for x in page["appeals"]:
            assert x["state"] in ("submitted", "proposed") and "*" in x["masked_name"], x
        seen += [x["appeal_id"] for x in page["appeals"]]
        token = page["next_page_token"]
        if not token:
            break
    assert all(i in seen for i in ids) and len(seen) == len(set(seen)), (ids, seen)
    for who in people:
        assert (s["staff_id"], "healthcode.appeal.read") in access_actors(cluster, who)
    assert_error(call(cluster, s, "/v1/staff/health/appeals?page_token=garbage"), 400, "INVALID_ARGUMENT")
    assert_error(call(cluster, people[0], "/v1/staff/health/appeals"), 403, "PERMISSION_DENIED")


# --------------------------------------------------------------------------- demo data

def test_seed_prints_the_demo_venues_and_can_run_twice(cluster):
    outs = []
    for _ in range(2):
        r = cluster.gateway.run("seed", "--citizens", "0", timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        outs.append(r.stdout)
    ids = re.findall(r"^  (5e1f0000-[0-9a-f-]{27})  ", outs[1], re.M)
    assert len(ids) == 4, outs[1]
    n = psql(cluster, "SELECT count(*) FROM venues WHERE venue_id IN (" + ",".join(f"'{i}'" for i in ids) + ")")
    assert n == "4", n
    tokens = re.findall(r"qr_text: (\S+)", outs[1])
    assert len(tokens) == 4, outs[1]
    _, claims = verify_with_jwks(cluster, tokens[0])
    assert claims["sub"] == ids[0], claims
    assert f"/v1/venues/{ids[0]}/checkins" in outs[1] and "/v1/health/verify" in outs[1], outs[1]
    # a demo venue takes check-ins
    r = checkin(cluster, citizen(cluster), ids[0])
    assert r.status == 201, r
