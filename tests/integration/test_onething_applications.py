"""One-thing applications (一件事) against real PostgreSQL, Redis and the gateway: the catalog (version 1 shipped
by migration 0008 as services/onething/catalog/catalog-v1.json, new versions by `cityhall catalog load`, an
application keeping its version), the department datasets (`cityhall seed` deriving them from the synthetic
registry, `cityhall import dataset` all or nothing), the bundle list, the prefilled form (values, provenance,
masked numbers, access-log entries), submission (every field error at once, consent, the automatic pre-check
returning an application with findings, items blocked on their dependencies, outbox rows, deadlines, one
transaction, Idempotency-Key replays), the citizen's views (lists, 404 for another citizen's application),
supplements (only the asked fields, the clock resumes), withdrawal, rating, notifications and counter delegation.
Run by tests/run.py.

The demo newborn family comes from `cityhall seed` (identity's seed.c, then onething's datasets.c). Other people
are imported with `cityhall import registry` in Beijing's region 110101, which the synthetic Guangdong population
never uses, and log in by SMS code through the development outbox."""

import copy
import datetime
import json
import os
import random
import re
import tempfile
import uuid

import harness
from harness import wait_for

CLUSTER = {"threads": 2}
TIMEOUT = 240

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
CATALOG_FILE = os.path.join(harness.ROOT, "services", "onething", "catalog", "catalog-v1.json")
REGION = "110101"
BIRTH_ITEMS = ["BIRTH_CERT", "HUKOU_REG", "MED_INS", "SOCIAL_CARD", "VACCINE_CERT", "MATERNITY"]
DISPATCHED_AT_ONCE = {"BIRTH_CERT", "VACCINE_CERT", "MATERNITY"}

IDS = set()      # every raw ID number a test used: none may reach an error body
PHONES = set()
_rng = random.SystemRandom()
shared = harness.shared


# --------------------------------------------------------------------------- people and CSV files

china_today = harness.china_today
years_before = harness.years_before


def new_phone():
    return harness.new_phone(PHONES)


def person(age_years=35, sex="F"):
    birth = years_before(china_today(), age_years) - datetime.timedelta(days=_rng.randrange(1, 300))
    return {"id": harness.new_id_number(REGION, birth, sex, used=IDS), "name": harness.new_name(), "sex": sex,
            "birth": birth}


def write_csv(cluster, lines):
    fd, path = tempfile.mkstemp(prefix="ds-", suffix=".csv", dir=cluster.tmpdir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def import_registry(cluster, *people):
    harness.import_registry(cluster.gateway, [
        (p["id"], p["name"], p["sex"], p["birth"], REGION, "北京市东城区东华门街道1号", "", "") for p in people])
    return people


def import_dataset(cluster, name, lines):
    return cluster.gateway.run("import", "dataset", name, write_csv(cluster, lines))


# --------------------------------------------------------------------------- HTTP, logins

def keyed_hash(cluster, domain, value):
    return harness.keyed_hash(cluster.gateway, domain, value)


def unseal(cluster, hex_text):
    """Opens an AES-256-GCM value sealed with the data key (nonce || ciphertext || tag)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    raw = bytes.fromhex(hex_text)
    return AESGCM(harness.data_key(cluster.gateway)[0]).decrypt(raw[:12], raw[12:], None).decode()


def login(cluster, phone=None):
    """SMS login (limits of earlier logins lifted): the TokenResponse with "phone" and "token"."""
    phone = phone or new_phone()
    PHONES.add(phone)
    return harness.sms_login(cluster.gateway, phone)


def call(cluster, who, path, method="GET", body=None, headers=None, http="h2c"):
    h = {"Authorization": f"Bearer {who['token'] if isinstance(who, dict) else who}"}
    h.update(headers or {})
    return cluster.gateway.request(path, method=method, json=body, headers=h, http=http)


def assert_error(resp, status, code, message=None):
    return harness.assert_error(resp, status, code, message, hidden=IDS)


def psql(cluster, sql):
    return cluster.pg.psql(sql)


def count(cluster, table, where="true"):
    return int(psql(cluster, f"SELECT count(*) FROM {table} WHERE {where}"))


# --------------------------------------------------------------------------- the demo family, citizens, staff

def seeded(cluster):
    """`cityhall seed --citizens 300` once per cluster; its stdout (identity's demo table, then onething's)."""
    def run():
        r = cluster.gateway.run("seed", "--citizens", "300", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        for line in r.stdout.splitlines():
            if re.match(r"^(199\d{8}|-)\s", line):
                IDS.add(line.split()[3])
        return r.stdout
    return shared(cluster, "seed", run)


def demo_person(cluster, name):
    """{"name", "id"} of a demo person, from the seed's table (names are unique there)."""
    for line in seeded(cluster).splitlines():
        f = line.split()
        if re.match(r"^(199\d{8}|-)$", f[0] if f else "") and f[1] == name:
            return {"name": f[1], "id": f[3], "born": f[4]}
    raise AssertionError(f"{name} not in the seed's output")


def mother(cluster):
    seeded(cluster)
    return shared(cluster, "mother", lambda: login(cluster, "19900000001"))


def verified(cluster, p):
    """A new account bound to registry resident p (imported first)."""
    import_registry(cluster, p)
    who = login(cluster)
    harness.bind_real_name(cluster.gateway, who["token"], p["id"], p["name"])
    return dict(who, person=p)


def other_citizen(cluster):
    return shared(cluster, "other", lambda: verified(cluster, person(30, "F")))


def staff_token(cluster, dept="police-hukou"):
    return harness.staff_token(cluster.gateway, dept)


# --------------------------------------------------------------------------- forms and submissions

def form(cluster, who, bundle="birth"):
    r = call(cluster, who, f"/v1/onething/bundles/{bundle}/form")
    assert r.status == 200, r
    return r.json()


EXTRA = {"social_card.bank": "工商银行", "maternity.bank_account": "6222020200112233445",
         "vaccine.clinic": "天河区天园街社区卫生服务中心"}


def birth_fields(cluster, **changes):
    """The demo mother's birth form as prefilled (masked numbers kept), the fields she must type, and changes."""
    values = {f["name"]: f["value"] for f in form(cluster, mother(cluster))["fields"] if f["value"]}
    values.update(EXTRA)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            values.pop(k, None)
        else:
            values[k] = v
    return [{"name": k, "value": v} for k, v in values.items()]


def submit(cluster, who, fields, bundle="birth", key=None, consent=True):
    headers = {"Idempotency-Key": key} if key else None
    return call(cluster, who, "/v1/onething/applications", "POST",
                {"bundle_code": bundle, "fields": fields, "consent": consent}, headers=headers)


def submitted(cluster, who=None, **changes):
    r = submit(cluster, who or mother(cluster), birth_fields(cluster, **changes))
    assert r.status == 201, r
    return r.json()


def items_by_code(app):
    return {i["item_code"]: i for i in app["items"]}


def app_row(cluster, app_id, cols):
    return psql(cluster, f"SELECT {cols} FROM applications WHERE application_id = '{app_id}'").split("|")


def wait_item_state(cluster, item_id, states):
    return wait_for(lambda: psql(cluster, f"SELECT state FROM application_items WHERE item_id = '{item_id}'")
                    in states, timeout=10, what=f"item {item_id} in {states}")


# --------------------------------------------------------------------------- catalog and datasets

def test_migration_installs_the_shipped_catalog_file_as_active_version_1(cluster):
    with open(CATALOG_FILE, encoding="utf-8") as f:
        shipped = json.load(f)
    stored = json.loads(psql(cluster, "SELECT catalog FROM catalog_versions WHERE version = 1"))
    assert stored == shipped, "sql/migrations/0008_onething.sql and catalog-v1.json differ"
    assert psql(cluster, "SELECT string_agg(version::text, ',') FROM catalog_versions WHERE active") in ("1",) or \
        int(psql(cluster, "SELECT count(*) FROM catalog_versions WHERE active")) == 1


def test_seed_derives_consistent_datasets_from_the_registry_and_a_second_seed_adds_nothing(cluster):
    out = seeded(cluster)
    assert "19900000001" in out and "birth (出生一件事)" in out, out
    counts = "SELECT (SELECT count(*) FROM birth_records), (SELECT count(*) FROM marriages), " \
             "(SELECT count(*) FROM social_insurance), (SELECT count(*) FROM businesses)"
    first = psql(cluster, counts)
    assert all(int(n) > 0 for n in first.split("|")), first
    # every derived row names registry residents of the right sex; a child is younger than its mother
    assert count(cluster, "birth_records b", "NOT EXISTS (SELECT 1 FROM registry_residents r "
                                            "WHERE r.id_hmac = b.mother_id_hmac AND r.sex = 'F' "
                                            "AND r.birth_date < b.child_birth_date)") == 0
    assert count(cluster, "marriages m", "NOT EXISTS (SELECT 1 FROM registry_residents r "
                                        "WHERE r.id_hmac = m.husband_id_hmac AND r.sex = 'M') OR NOT EXISTS "
                                        "(SELECT 1 FROM registry_residents r WHERE r.id_hmac = m.wife_id_hmac "
                                        "AND r.sex = 'F')") == 0
    assert count(cluster, "birth_records b", "NOT EXISTS (SELECT 1 FROM registry_residents r "
                                            "WHERE r.id_hmac = b.child_id_hmac AND r.name = b.child_name "
                                            "AND r.birth_date = b.child_birth_date)") == 0
    # the demo newborn's record names its parents
    mum, dad = demo_person(cluster, "陈晓敏"), demo_person(cluster, "黄志明")
    row = psql(cluster, "SELECT child_name, encode(mother_id_hmac, 'hex'), encode(father_id_hmac, 'hex') "
                        "FROM birth_records WHERE child_name = '黄梓睿'").split("|")
    assert row == ["黄梓睿", keyed_hash(cluster, "id", mum["id"]), keyed_hash(cluster, "id", dad["id"])], row
    # business registry codes carry a valid GB 32100 check character
    assert count(cluster, "businesses", "uscc !~ '^91[0-9]{6}MA'") == 0
    r = cluster.gateway.run("seed", "--citizens", "300", timeout=300)
    assert r.returncode == 0 and "nothing to derive" in r.stdout, r.stdout + r.stderr
    assert psql(cluster, counts) == first


def test_import_dataset_is_all_or_nothing_names_lines_and_never_echoes_a_number(cluster):
    a, b = person(40, "F"), person(42, "M")
    header = "id_number,employer,insured_since,status"
    bad_check = a["id"][:17] + ("1" if a["id"][17] != "1" else "2")
    lines = [header, f"{a['id']},某公司,2010-01-01,active", f"{bad_check},某公司,2010-01-01,active",
             f"{b['id']},,2030-01-01,active", f"{b['id']},某公司,2011-02-02,working", "too,few"]
    r = import_dataset(cluster, "social_insurance", lines)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "line 3: id_number: wrong check character" in r.stderr, r.stderr
    assert "line 4: insured_since: must not be in the future" in r.stderr, r.stderr
    assert "line 5: status: must be active, suspended or retired" in r.stderr, r.stderr
    assert "line 6: wrong number of fields" in r.stderr and "nothing imported" in r.stderr, r.stderr
    assert "line 2:" not in r.stderr, r.stderr
    for raw in (a["id"], b["id"], bad_check):
        assert raw not in r.stdout + r.stderr, "an import message echoed an ID number"
    assert count(cluster, "social_insurance", f"id_hmac = decode('{keyed_hash(cluster, 'id', a['id'])}', 'hex')") == 0
    # a key twice in one file is refused whole
    r = import_dataset(cluster, "social_insurance", [header, f"{a['id']},甲公司,2010-01-01,active",
                                                      f"{a['id']},乙公司,2012-01-01,active"])
    assert r.returncode == 1 and "line 3: id_number: the same as line 2" in r.stderr, r.stderr
    # good rows import; importing a corrected row again updates it
    r = import_dataset(cluster, "social_insurance", [header, f"{a['id']},甲公司,2010-01-01,active"])
    assert r.returncode == 0 and "1 added, 0 updated" in r.stdout, r.stdout + r.stderr
    r = import_dataset(cluster, "social_insurance", [header, f"{a['id']},丙公司,2010-01-01,active"])
    assert r.returncode == 0 and "0 added, 1 updated" in r.stdout, r.stdout + r.stderr
    assert psql(cluster, "SELECT employer FROM social_insurance WHERE id_hmac = "
                         f"decode('{keyed_hash(cluster, 'id', a['id'])}', 'hex')") == "丙公司"
    # the other datasets check their own rules (USCC check character, sexes of a couple)
    r = import_dataset(cluster, "businesses", ["uscc,name,legal_rep_id_number,registered_on,address,status",
                                               f"91110101MA00000000,某公司,{a['id']},2020-01-01,北京,"])
    assert r.returncode == 1 and "line 2: uscc: not a unified social credit code" in r.stderr, r.stderr
    r = import_dataset(cluster, "marriages", ["cert_no,husband_id_number,wife_id_number,registered_on,dissolved_on",
                                              f"J110101-2015-1,{a['id']},{b['id']},2015-05-01,"])
    assert r.returncode == 1 and "line 2: husband_id_number: must be a man's ID number" in r.stderr, r.stderr
    r = import_dataset(cluster, "nonsense", [header])
    assert r.returncode == 2 and "birth_records" in r.stderr, r.stderr
    r = import_dataset(cluster, "marriages", [header])
    assert r.returncode == 1 and "the header must be" in r.stderr, r.stderr


# --------------------------------------------------------------------------- bundles and the form

def test_bundles_list_the_catalog_with_each_dependency_graph_for_citizens_and_staff(cluster):
    for who in (mother(cluster), staff_token(cluster)):
        r = call(cluster, who, "/v1/onething/bundles")
        assert r.status == 200, r
        bundles = {b["code"]: b for b in r.json()["bundles"]}
        assert set(bundles) >= {"birth", "business_opening", "retirement"}, bundles.keys()
        birth = bundles["birth"]
        assert birth["name"] == "出生一件事" and birth["catalog_version"] >= 1, birth
        items = {i["item_code"]: i for i in birth["items"]}
        assert list(items) == BIRTH_ITEMS, items.keys()
        assert items["HUKOU_REG"]["depends_on"] == ["BIRTH_CERT"]
        assert items["MED_INS"]["depends_on"] == ["HUKOU_REG"] and items["SOCIAL_CARD"]["depends_on"] == ["HUKOU_REG"]
        assert items["VACCINE_CERT"]["depends_on"] == [] and items["MATERNITY"]["depends_on"] == []
        assert items["HUKOU_REG"]["department"] == "police-hukou" and items["MED_INS"]["department"] == \
            "medical-insurance", items
        assert all(0 < i["promised_days"] <= i["legal_days"] for i in items.values()), items
        biz = {i["item_code"]: i for i in bundles["business_opening"]["items"]}
        assert all(biz[c]["depends_on"] == ["BIZ_REG"] for c in ("SEAL", "TAX_REG", "SI_ACCOUNT", "BANK_APPT")), biz


def test_the_birth_form_is_prefilled_with_provenance_masked_numbers_and_logged_reads(cluster):
    who = mother(cluster)
    mum, dad = demo_person(cluster, "陈晓敏"), demo_person(cluster, "黄志明")
    before = {e["entry_id"] for e in call(cluster, who, "/v1/me/access-log").json()["entries"]}
    f = form(cluster, who)
    assert f["bundle_code"] == "birth" and f["consent_text"], f
    fields = {x["name"]: x for x in f["fields"]}
    assert fields["child.name"]["value"] == "黄梓睿" and fields["child.name"]["source"] == "birth_records"
    assert fields["child.sex"]["value"] == "M" and fields["child.sex"]["options"] == ["M", "F"]
    assert re.match(r"^[A-Z]\d{9}$", fields["child.birth_cert_no"]["value"]), fields["child.birth_cert_no"]
    assert fields["mother.name"]["value"] == "陈晓敏" and fields["father.name"]["value"] == "黄志明"
    # numbers of people are shown masked; the full ones never leave the server in a form
    assert fields["mother.id_number"]["value"] == mum["id"][:4] + "*" * 10 + mum["id"][14:], fields["mother.id_number"]
    assert fields["father.id_number"]["value"] == dad["id"][:4] + "*" * 10 + dad["id"][14:]
    assert fields["applicant.phone"]["value"] == "199****0001" and fields["applicant.phone"]["source"] == "account"
    assert mum["id"] not in json.dumps(f, ensure_ascii=False) and dad["id"] not in json.dumps(f, ensure_ascii=False)
    assert fields["parents.marriage_cert_no"]["value"] == "J440106-2019-00000001"
    assert fields["parents.marriage_cert_no"]["source"] == "marriages"
    assert fields["hukou.follow"]["value"] == "mother" and fields["hukou.follow"]["source"] == "registry"
    assert fields["maternity.employer"]["source"] == "social_insurance" and fields["maternity.employer"]["value"]
    for x in f["fields"]:
        if x["value"]:
            assert x["source"] and RFC3339.match(x.get("as_of", "")), x
        else:
            assert x["source"] == "" and "as_of" not in x, x
        assert x["items"] and set(x["items"]) <= set(BIRTH_ITEMS), x
    assert fields["maternity.bank_account"]["value"] == "" and fields["maternity.bank_account"]["required"]
    # each department dataset read for the form is in the citizen's own access log
    entries = [e for e in call(cluster, who, "/v1/me/access-log").json()["entries"] if e["entry_id"] not in before]
    actions = sorted(e["action"] for e in entries)
    assert actions == ["dataset.read:birth_records", "dataset.read:marriages", "dataset.read:registry",
                       "dataset.read:social_insurance"], entries
    assert all(e["purpose"] == "one-thing form prefill: birth" and e["actor_role"] == "citizen" for e in entries)


def test_a_citizen_without_a_real_name_gets_an_empty_form_and_cannot_submit(cluster):
    who = login(cluster)
    f = form(cluster, who)
    assert all(x["value"] == "" or x["source"] == "account" for x in f["fields"]), f
    fields = birth_fields(cluster, applicant__phone=who["phone"], mother__id_number=demo_person(cluster, "陈晓敏")["id"],
                          father__id_number=demo_person(cluster, "黄志明")["id"])
    r = submit(cluster, who, fields)
    assert_error(r, 422, "FAILED_PRECONDITION", "verify your real name")
    assert count(cluster, "applications", f"citizen_id = '{who['citizen_id']}'") == 0


def test_unknown_bundles_are_404_and_the_form_is_for_citizens(cluster):
    who = mother(cluster)
    assert_error(call(cluster, who, "/v1/onething/bundles/no_such/form"), 404, "NOT_FOUND", "no such bundle")
    assert_error(submit(cluster, who, [], bundle="no_such"), 404, "NOT_FOUND", "no such bundle")
    assert_error(submit(cluster, who, [], bundle=""), 400, "INVALID_ARGUMENT", "bundle_code")
    staff = staff_token(cluster)
    assert_error(call(cluster, staff, "/v1/onething/bundles/birth/form"), 403, "PERMISSION_DENIED")
    assert_error(call(cluster, staff, "/v1/onething/applications"), 403, "PERMISSION_DENIED")
    assert_error(cluster.gateway.request("/v1/onething/bundles"), 401, "UNAUTHENTICATED")


# --------------------------------------------------------------------------- submission

def test_a_birth_submission_is_accepted_with_dependent_items_blocked_and_one_outbox_row_per_dispatched_item(cluster):
    who = mother(cluster)
    mum, dad = demo_person(cluster, "陈晓敏"), demo_person(cluster, "黄志明")
    before = {e["entry_id"] for e in call(cluster, who, "/v1/me/access-log").json()["entries"]}
    r = submit(cluster, who, birth_fields(cluster))
    assert r.status == 201, r
    app = r.json()
    assert UUID.match(app["application_id"]) and app["state"] == "accepted" and app["precheck"] == "passed", app
    assert app["bundle_code"] == "birth" and app["catalog_version"] >= 1 and app["errors"] == []
    assert app["items_total"] == 6 and app["items_done"] == 0 and RFC3339.match(app["submitted_at"]), app
    items = items_by_code(app)
    assert list(items) == BIRTH_ITEMS
    for code, it in items.items():
        assert UUID.match(it["item_id"]) and it["name"] and it["department"], it
        if code in DISPATCHED_AT_ONCE:
            assert it["state"] == "dispatched" and RFC3339.match(it["due_at"]), it
            assert it["due_at"] > app["submitted_at"], it
        else:
            # HUKOU_REG waits for BIRTH_CERT, MED_INS and SOCIAL_CARD for HUKOU_REG: no clock, no delivery yet
            assert it["state"] == "blocked_on_dependency" and "due_at" not in it, it
    app_id = app["application_id"]
    rows = psql(cluster, "SELECT i.item_code, i.state, array_to_string(i.depends_on, ','), i.due_at IS NOT NULL, "
                         "i.dispatch_key = i.item_id::text, (SELECT count(*) FROM outbox o WHERE o.item_id = i.item_id "
                         "AND o.kind = 'dispatch') FROM application_items i "
                         f"WHERE i.application_id = '{app_id}' ORDER BY i.position").splitlines()
    by = {r.split("|")[0]: r.split("|")[1:] for r in rows}
    assert by["HUKOU_REG"] == ["blocked_on_dependency", "BIRTH_CERT", "f", "t", "0"], by
    assert by["MED_INS"][:3] == ["blocked_on_dependency", "HUKOU_REG", "f"] and by["MED_INS"][4] == "0", by
    for code in DISPATCHED_AT_ONCE:
        assert by[code][2:] == ["t", "t", "1"], (code, by[code])
    # the sealed form values hold the full numbers the masked placeholders stood for
    values = json.loads(unseal(cluster, app_row(cluster, app_id, "encode(fields_enc, 'hex')")[0]))
    assert values["mother.id_number"] == mum["id"] and values["father.id_number"] == dad["id"], values
    assert values["applicant.phone"] == "19900000001" and values["maternity.bank_account"] == EXTRA[
        "maternity.bank_account"]
    assert app_row(cluster, app_id, "consent_at IS NOT NULL, acted_by IS NULL, accepted_at = submitted_at") == \
        ["t", "t", "t"]
    # the pre-check's reads are recorded with the submission and reach the access log's chain within a second or so
    def logged():
        entries = [e for e in call(cluster, who, "/v1/me/access-log").json()["entries"] if e["entry_id"] not in before
                   and e["purpose"] == "one-thing application: birth"]
        return {e["action"] for e in entries} >= {"dataset.read:birth_records", "dataset.read:registry"} and entries
    entries = wait_for(logged, timeout=10, what="the pre-check's access-log entries")
    assert all(e["actor_role"] == "citizen" and e["actor"] == who["citizen_id"] for e in entries), entries
    notes = call(cluster, who, "/v1/me/notifications").json()["notifications"]
    assert any(n["application_id"] == app_id and n["kind"] == "application_accepted" for n in notes), notes
    # the citizen's view is the same application
    got = call(cluster, who, f"/v1/onething/applications/{app_id}").json()
    assert got["application_id"] == app_id and [i["item_id"] for i in got["items"]] == \
        [i["item_id"] for i in app["items"]], got
    assert items_by_code(got)["HUKOU_REG"]["state"] == "blocked_on_dependency"


def test_every_invalid_field_is_reported_at_once_and_nothing_is_written(cluster):
    who = mother(cluster)
    n = count(cluster, "applications")
    bad_id = demo_person(cluster, "陈晓敏")["id"][:17] + "0"
    if bad_id == demo_person(cluster, "陈晓敏")["id"]:
        bad_id = bad_id[:17] + "1"
    IDS.add(bad_id)
    fields = birth_fields(cluster, child__sex="X", child__birth_date="2026-02-30", mother__id_number=bad_id,
                          applicant__phone="12345", maternity__bank_account="12ab", child__name=None)
    fields += [{"name": "pet.name", "value": "旺财"}, {"name": "child.hospital", "value": "again"}]
    r = submit(cluster, who, fields)
    err = assert_error(r, 400, "INVALID_ARGUMENT")
    msg = err["message"]
    for expected in ("child.name: required", "child.sex: is not one of the options",
                     "child.birth_date: must be a date YYYY-MM-DD", "mother.id_number: wrong check character",
                     "applicant.phone: must be an 11-digit mainland mobile number",
                     "maternity.bank_account: does not have the expected format", "pet.name: not a field of this form",
                     "child.hospital: given more than once"):
        assert expected in msg, msg
    assert msg.startswith("8 fields are invalid"), msg
    assert count(cluster, "applications") == n


def test_a_masked_number_stands_only_for_the_prefilled_one(cluster):
    who = mother(cluster)
    r = submit(cluster, who, birth_fields(cluster, father__id_number="4401**********0000"))
    assert_error(r, 400, "INVALID_ARGUMENT", "father.id_number: a masked number stands only for the prefilled one")
    # a citizen with nothing prefilled cannot use masks at all
    other = other_citizen(cluster)
    r = submit(cluster, other, birth_fields(cluster, applicant__phone="199****0001"))
    assert_error(r, 400, "INVALID_ARGUMENT", "applicant.phone: a masked number")


def test_consent_is_required(cluster):
    r = submit(cluster, mother(cluster), birth_fields(cluster), consent=False)
    assert_error(r, 422, "FAILED_PRECONDITION", "consent")


def test_a_failed_precheck_returns_the_application_at_once_with_its_findings(cluster):
    who = mother(cluster)
    r = submit(cluster, who, birth_fields(cluster, child__birth_cert_no="Z999999999"))
    assert r.status == 201, r
    app = r.json()
    assert app["state"] == "rejected" and app["items"] == [] and app["items_total"] == 0, app
    assert app["errors"] == [{"field": "child.birth_cert_no",
                              "reason": "no hospital birth record has this certificate number"}], app
    assert app["precheck"].startswith("returned: child.birth_cert_no"), app
    assert count(cluster, "application_items", f"application_id = '{app['application_id']}'") == 0
    got = call(cluster, who, f"/v1/onething/applications/{app['application_id']}").json()
    assert got["state"] == "rejected" and got["errors"] == app["errors"], got
    # every mismatch with the hospital record and the registry is named
    stranger = person(33, "M")
    import_registry(cluster, stranger)
    r = submit(cluster, who, birth_fields(cluster, child__name="黄梓轩", father__id_number=stranger["id"],
                                          father__name="王某某", child__birth_date="2026-01-01"))
    app = r.json()
    assert r.status == 201 and app["state"] == "rejected", r
    found = {(e["field"], e["reason"]) for e in app["errors"]}
    assert found == {("child.name", "does not match the hospital birth record"),
                     ("child.birth_date", "does not match the hospital birth record"),
                     ("father.id_number", "is not the father in the hospital birth record"),
                     ("father.name", "does not match the registry for this ID number"),
                     ("parents.marriage_cert_no", "does not match a marriage registration of the parents")}, found
    # the applicant must be a parent
    r = submit(cluster, other_citizen(cluster),
               birth_fields(cluster, applicant__phone=new_phone(),
                            mother__id_number=demo_person(cluster, "陈晓敏")["id"],
                            father__id_number=demo_person(cluster, "黄志明")["id"]))
    assert r.status == 201 and r.json()["state"] == "rejected", r
    assert {"field": "applicant", "reason": "the applicant must be the child's mother or father"} in r.json()["errors"]


def test_the_same_idempotency_key_twice_makes_one_application_and_another_body_is_422(cluster):
    who = mother(cluster)
    key = "birth-" + uuid.uuid4().hex
    fields = birth_fields(cluster)
    n = count(cluster, "applications", f"citizen_id = '{who['citizen_id']}'")
    first = submit(cluster, who, fields, key=key)
    assert first.status == 201, first
    again = submit(cluster, who, fields, key=key)
    assert again.status == 201 and again.headers.get("idempotent-replayed") == "true", again
    assert again.json() == first.json()
    assert count(cluster, "applications", f"citizen_id = '{who['citizen_id']}'") == n + 1
    assert count(cluster, "outbox o JOIN application_items i USING (item_id)",
                 f"i.application_id = '{first.json()['application_id']}'") == 3
    other = submit(cluster, who, birth_fields(cluster, vaccine__clinic="另一个社区卫生服务中心"), key=key)
    assert_error(other, 422, "FAILED_PRECONDITION", "Idempotency-Key")
    assert count(cluster, "applications", f"citizen_id = '{who['citizen_id']}'") == n + 1


def test_concurrent_retries_with_one_key_make_one_application(cluster):
    who = mother(cluster)
    key = "race-" + uuid.uuid4().hex
    fields = birth_fields(cluster)
    n = count(cluster, "applications", f"citizen_id = '{who['citizen_id']}'")
    calls = [harness.curl_async(cluster.gateway.url("/v1/onething/applications", tls=False), method="POST",
                                http="h2c", headers={"Authorization": f"Bearer {who['token']}", "Idempotency-Key": key},
                                json={"bundle_code": "birth", "fields": fields, "consent": True})
             for _ in range(6)]
    answers = [c.wait() for c in calls]
    assert all(a.status == 201 for a in answers), answers
    assert len({a.json()["application_id"] for a in answers}) == 1, [a.text for a in answers]
    assert count(cluster, "applications", f"citizen_id = '{who['citizen_id']}'") == n + 1


# --------------------------------------------------------------------------- the citizen's views

def test_another_citizens_application_is_404_exactly_like_an_unknown_one(cluster):
    app = submitted(cluster)
    other = other_citizen(cluster)
    base = f"/v1/onething/applications/{app['application_id']}"
    unknown = f"/v1/onething/applications/{uuid.uuid4()}"
    for suffix, method, body in (("", "GET", None), ("/supplements", "POST", {"fields": [{"name": "x", "value": "y"}]}),
                                 ("/withdrawal", "POST", None), ("/rating", "POST", {"stars": 5})):
        theirs = call(cluster, other, base + suffix, method, body)
        nobody = call(cluster, other, unknown + suffix, method, body)
        assert_error(theirs, 404, "NOT_FOUND")
        strip = lambda r: {k: v for k, v in r.json()["error"].items() if k != "request_id"}  # noqa: E731
        assert strip(theirs) == strip(nobody), (theirs.text, nobody.text)
        assert theirs.text.replace(theirs.json()["error"]["request_id"], "") == \
            nobody.text.replace(nobody.json()["error"]["request_id"], "")
    assert_error(call(cluster, other, "/v1/onething/applications/not-a-uuid"), 404, "NOT_FOUND")
    assert app["application_id"] not in call(cluster, other, "/v1/onething/applications").text
    assert app_row(cluster, app["application_id"], "state")[0] in ("accepted", "in_progress")


def test_the_list_pages_newest_first_with_opaque_tokens(cluster):
    who = verified(cluster, person(29, "F"))
    ids = []
    for _ in range(3):
        r = submit(cluster, who, birth_fields(cluster, applicant__phone=who["phone"],
                                              mother__id_number=demo_person(cluster, "陈晓敏")["id"],
                                              father__id_number=demo_person(cluster, "黄志明")["id"]))
        assert r.status == 201, r
        ids.append(r.json()["application_id"])
    seen, token = [], ""
    while True:
        r = call(cluster, who, f"/v1/onething/applications?page_size=2&page_token={token}")
        assert r.status == 200, r
        page = r.json()
        assert len(page["applications"]) <= 2
        seen += [a["application_id"] for a in page["applications"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == ids[::-1], (seen, ids)
    assert_error(call(cluster, who, "/v1/onething/applications?page_token=bm9wZQ"), 400, "INVALID_ARGUMENT")
    assert_error(call(cluster, who, "/v1/onething/applications?page_size=abc"), 400, "INVALID_ARGUMENT")


def test_notifications_are_the_citizens_own_newest_first(cluster):
    who = verified(cluster, person(31, "F"))
    assert call(cluster, who, "/v1/me/notifications").json() == {"notifications": [], "next_page_token": ""}
    for _ in range(2):
        submit(cluster, who, birth_fields(cluster, applicant__phone=who["phone"],
                                          mother__id_number=demo_person(cluster, "陈晓敏")["id"],
                                          father__id_number=demo_person(cluster, "黄志明")["id"]))
    r = call(cluster, who, "/v1/me/notifications?page_size=1")
    page = r.json()
    assert r.status == 200 and len(page["notifications"]) == 1 and page["next_page_token"], page
    n = page["notifications"][0]
    assert n["kind"] == "application_returned" and "出生一件事" in n["text"] and n["read"] is False, n
    rest = call(cluster, who, f"/v1/me/notifications?page_token={page['next_page_token']}").json()
    assert len(rest["notifications"]) == 1 and int(rest["notifications"][0]["notification_id"]) < \
        int(n["notification_id"]), rest


# --------------------------------------------------------------------------- supplements, withdrawal, rating

def ask_supplement(cluster, item_id, fields, paused_hours=1):
    """What a department's request does to an item (dispatch engineer's ot_decide): fields asked, clock paused."""
    wait_item_state(cluster, item_id, ("in_review",))
    arr = "{" + ",".join(fields) + "}"
    psql(cluster, f"UPDATE application_items SET state = 'supplement_requested', supplement_fields = '{arr}', "
                  f"reason = '请补充', paused_at = now() - interval '{paused_hours} hours' WHERE item_id = '{item_id}'")
    psql(cluster, "UPDATE applications SET state = 'in_progress' WHERE application_id = "
                  f"(SELECT application_id FROM application_items WHERE item_id = '{item_id}')")


def test_a_supplement_takes_only_the_asked_fields_and_puts_only_that_item_back_with_the_clock_resumed(cluster):
    who = mother(cluster)
    app = submitted(cluster)
    app_id = app["application_id"]
    items = items_by_code(app)
    path = f"/v1/onething/applications/{app_id}/supplements"
    # nothing asked yet
    assert_error(call(cluster, who, path, "POST", {"fields": [{"name": "maternity.bank_account",
                                                               "value": "6222020200999988887"}]}),
                 422, "FAILED_PRECONDITION", "no item")
    ask_supplement(cluster, items["MATERNITY"]["item_id"], ["maternity.bank_account", "maternity.employer"])
    wait_item_state(cluster, items["VACCINE_CERT"]["item_id"], ("in_review",))
    r = call(cluster, who, f"/v1/onething/applications/{app_id}")
    mat = items_by_code(r.json())["MATERNITY"]
    assert mat["state"] == "supplement_requested" and mat["supplement_fields"] == ["maternity.bank_account",
                                                                                   "maternity.employer"], mat
    before = json.loads(unseal(cluster, app_row(cluster, app_id, "encode(fields_enc, 'hex')")[0]))
    # a field that was not asked for is named; a half answer is refused; nothing changes
    r = call(cluster, who, path, "POST", {"fields": [{"name": "maternity.bank_account", "value": "6222020200999988887"},
                                                     {"name": "child.name", "value": "黄小明"}]})
    err = assert_error(r, 400, "INVALID_ARGUMENT", "child.name: was not asked for")
    assert "maternity.employer: also asked for by MATERNITY" in err["message"], err
    r = call(cluster, who, path, "POST", {"fields": [{"name": "maternity.bank_account", "value": "12"},
                                                     {"name": "maternity.employer", "value": "新单位"}]})
    assert_error(r, 400, "INVALID_ARGUMENT", "maternity.bank_account: does not have the expected format")
    assert json.loads(unseal(cluster, app_row(cluster, app_id, "encode(fields_enc, 'hex')")[0])) == before
    # the asked fields: only they change, only that item goes back to review, the paused hour is counted
    r = call(cluster, who, path, "POST", {"fields": [{"name": "maternity.bank_account", "value": "6222020200999988887"},
                                                     {"name": "maternity.employer", "value": "广州新单位科技有限公司"}]},
             headers={"Idempotency-Key": "sup-" + app_id})
    assert r.status == 200, r
    got = items_by_code(r.json())
    assert got["MATERNITY"]["state"] == "in_review" and got["MATERNITY"]["supplement_fields"] == [], got["MATERNITY"]
    assert got["VACCINE_CERT"]["state"] == "in_review" and got["HUKOU_REG"]["state"] == "blocked_on_dependency"
    after = json.loads(unseal(cluster, app_row(cluster, app_id, "encode(fields_enc, 'hex')")[0]))
    assert after["maternity.bank_account"] == "6222020200999988887" and after["maternity.employer"] == \
        "广州新单位科技有限公司"
    assert {k: v for k, v in after.items() if not k.startswith("maternity.")} == \
        {k: v for k, v in before.items() if not k.startswith("maternity.")}
    row = psql(cluster, "SELECT state, paused_at IS NULL, paused_seconds BETWEEN 3590 AND 3700, "
                        "array_length(supplement_fields, 1) IS NULL FROM application_items "
                        f"WHERE item_id = '{items['MATERNITY']['item_id']}'").split("|")
    assert row == ["in_review", "t", "t", "t"], row
    assert app_row(cluster, app_id, "revision")[0] == "1"
    # a retry with the same key replays; a new supplement finds nothing asked
    again = call(cluster, who, path, "POST",
                 {"fields": [{"name": "maternity.bank_account", "value": "6222020200999988887"},
                             {"name": "maternity.employer", "value": "广州新单位科技有限公司"}]},
                 headers={"Idempotency-Key": "sup-" + app_id})
    assert again.status == 200 and again.headers.get("idempotent-replayed") == "true", again
    assert app_row(cluster, app_id, "revision")[0] == "1"


def test_withdrawal_ends_every_open_item_until_one_is_approved(cluster):
    who = mother(cluster)
    app = submitted(cluster)
    app_id = app["application_id"]
    r = call(cluster, who, f"/v1/onething/applications/{app_id}/withdrawal", "POST")
    assert r.status == 200, r
    got = r.json()
    assert got["state"] == "withdrawn" and {i["state"] for i in got["items"]} == {"withdrawn"}, got
    assert count(cluster, "outbox o JOIN application_items i USING (item_id)",
                 f"i.application_id = '{app_id}' AND o.state = 'pending'") == 0
    assert app_row(cluster, app_id, "finished_at IS NOT NULL")[0] == "t"
    notes = call(cluster, who, "/v1/me/notifications").json()["notifications"]
    assert any(n["application_id"] == app_id and n["kind"] == "application_withdrawn" for n in notes), notes
    assert_error(call(cluster, who, f"/v1/onething/applications/{app_id}/withdrawal", "POST"), 422,
                 "FAILED_PRECONDITION", "already finished or withdrawn")
    # once an item is issued the application can no longer be withdrawn, and nothing changes
    app2 = submitted(cluster)
    vaccine = items_by_code(app2)["VACCINE_CERT"]["item_id"]
    wait_item_state(cluster, vaccine, ("in_review",))
    psql(cluster, f"UPDATE application_items SET state = 'issued' WHERE item_id = '{vaccine}'")
    r = call(cluster, who, f"/v1/onething/applications/{app2['application_id']}/withdrawal", "POST")
    assert_error(r, 422, "FAILED_PRECONDITION", "an item was already approved")
    assert app_row(cluster, app2["application_id"], "state")[0] in ("accepted", "in_progress")
    assert count(cluster, "application_items", f"application_id = '{app2['application_id']}' AND state = 'withdrawn'") \
        == 0
    # a returned application is final already
    rejected = submitted(cluster, child__birth_cert_no="Z999999998")
    assert_error(call(cluster, who, f"/v1/onething/applications/{rejected['application_id']}/withdrawal", "POST"),
                 422, "FAILED_PRECONDITION")


def test_rating_is_once_and_only_for_a_finished_application(cluster):
    who = mother(cluster)
    app = submitted(cluster)
    path = f"/v1/onething/applications/{app['application_id']}/rating"
    assert_error(call(cluster, who, path, "POST", {"stars": 5}), 422, "FAILED_PRECONDITION", "only a finished")
    assert_error(call(cluster, who, path, "POST", {"stars": 6}), 400, "INVALID_ARGUMENT", "stars")
    assert_error(call(cluster, who, path, "POST", {"stars": 0}), 400, "INVALID_ARGUMENT", "stars")
    assert call(cluster, who, f"/v1/onething/applications/{app['application_id']}/withdrawal", "POST").status == 200
    r = call(cluster, who, path, "POST", {"stars": 4, "comment": "材料一次提交，很方便"})
    assert r.status == 200 and r.json()["rating"] == 4 and r.json()["state"] == "withdrawn", r
    assert app_row(cluster, app["application_id"], "rating, rating_comment") == ["4", "材料一次提交，很方便"]
    assert_error(call(cluster, who, path, "POST", {"stars": 1}), 409, "ALREADY_EXISTS", "already rated")
    assert app_row(cluster, app["application_id"], "rating")[0] == "4"
    rejected = submitted(cluster, child__birth_cert_no="Z999999997")
    r = call(cluster, who, f"/v1/onething/applications/{rejected['application_id']}/rating", "POST", {"stars": 2})
    assert r.status == 200 and r.json()["rating"] == 2, r


# --------------------------------------------------------------------------- the other bundles

def test_business_opening_checks_the_legal_representative_and_the_company_name(cluster):
    boss = verified(cluster, person(45, "M"))
    rep, name = boss["person"]["id"], boss["person"]["name"]
    fields = [{"name": "company.name", "value": f"北京测试{uuid.uuid4().hex[:6]}科技有限公司"},
              {"name": "company.type", "value": "limited_company"}, {"name": "company.address", "value": "北京市东城区1号"},
              {"name": "company.registered_capital", "value": "100"},
              {"name": "company.business_scope", "value": "软件开发"}, {"name": "legal_rep.name", "value": name},
              {"name": "legal_rep.id_number", "value": rep}, {"name": "applicant.phone", "value": boss["phone"]},
              {"name": "seal.count", "value": "2"}, {"name": "tax.invoice", "value": "true"},
              {"name": "si.employees", "value": "3"}, {"name": "bank.name", "value": "招商银行"},
              {"name": "bank.appointment_date", "value": f"{china_today() + datetime.timedelta(days=3)}"}]
    r = submit(cluster, boss, fields, bundle="business_opening")
    assert r.status == 201 and r.json()["state"] == "accepted", r
    items = items_by_code(r.json())
    assert items["BIZ_REG"]["state"] == "dispatched" and all(
        items[c]["state"] == "blocked_on_dependency" for c in ("SEAL", "TAX_REG", "SI_ACCOUNT", "BANK_APPT")), items
    # five businesses already: a sixth is refused; a registered name is refused
    lines = ["uscc,name,legal_rep_id_number,registered_on,address,status"]
    taken = None
    for k in range(5):
        body = "MA" + "".join(_rng.choice("0123456789ABCDEFGHJKLMNPQRTUWXY") for _ in range(6))
        w = [3, 7, 9, 10, 5, 8, 4, 2]
        s = sum((int(c) if c.isdigit() else ord(c) - 55) * wi for c, wi in zip(body, w))
        org = body + {10: "X", 11: "0"}.get(11 - s % 11, str(11 - s % 11))
        first17 = "91110101" + org
        chars = "0123456789ABCDEFGHJKLMNPQRTUWXY"
        ws = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28]
        c = 31 - sum(chars.index(x) * wi for x, wi in zip(first17, ws)) % 31
        taken = f"北京已注册{uuid.uuid4().hex[:6]}有限公司"
        lines.append(f"{first17}{chars[0 if c == 31 else c]},{taken},{rep},2020-0{k + 1}-01,北京市东城区,active")
    r = import_dataset(cluster, "businesses", lines)
    assert r.returncode == 0 and "5 added" in r.stdout, r.stdout + r.stderr
    fields[0] = {"name": "company.name", "value": taken}
    r = submit(cluster, boss, fields, bundle="business_opening")
    assert r.status == 201 and r.json()["state"] == "rejected", r
    found = {(e["field"], e["reason"]) for e in r.json()["errors"]}
    assert found == {("legal_rep.id_number", "is already the legal representative of 5 businesses"),
                     ("company.name", "is already registered")}, found
    bad_date = dict(fields[12], value="2020-01-01")
    r = submit(cluster, boss, fields[:12] + [bad_date], bundle="business_opening")
    assert_error(r, 400, "INVALID_ARGUMENT", "bank.appointment_date: must not be in the past")


def test_retirement_needs_the_statutory_age_and_fifteen_years_of_contributions(cluster):
    old = person(64, "M")
    young = person(45, "F")
    for p in (old, young):
        import_registry(cluster, p)
    since_old = years_before(china_today(), 30)
    r = import_dataset(cluster, "social_insurance", ["id_number,employer,insured_since,status",
                                                     f"{old['id']},北京某机械厂,{since_old},active",
                                                     f"{young['id']},北京某商场,{years_before(china_today(), 5)},active"])
    assert r.returncode == 0, r.stdout + r.stderr

    def apply(p, category="worker"):
        who = login(cluster)
        assert call(cluster, who, "/v1/me/real-name", "POST", {"id_number": p["id"], "name": p["name"]}).status == 200
        f = {x["name"]: x for x in form(cluster, who, "retirement")["fields"]}
        assert f["retiree.name"]["value"] == p["name"] and f["retiree.name"]["source"] == "registry", f
        assert f["retiree.id_number"]["value"] == p["id"][:4] + "*" * 10 + p["id"][14:], f
        fields = [{"name": k, "value": v["value"]} for k, v in f.items() if v["value"]]
        fields += [{"name": "retiree.category", "value": category}, {"name": "retire.date", "value": str(china_today())},
                   {"name": "pension.bank_account", "value": "6222020200112233445"}]
        return submit(cluster, who, fields, bundle="retirement")

    r = apply(old)
    assert r.status == 201 and r.json()["state"] == "accepted", r
    assert items_by_code(r.json())["PENSION"]["state"] == "dispatched"
    r = apply(young)
    assert r.status == 201 and r.json()["state"] == "rejected", r
    reasons = [e["reason"] for e in r.json()["errors"] if e["field"] == "retire.date"]
    assert len(reasons) == 2 and reasons[0].startswith("is before the statutory retirement date"), reasons
    assert reasons[1] == "fewer than 15 years and 0 months of contributions by this date", reasons
    # a woman worker born after 1975 retires later than at 50 (the 2025 reform): 53 and some months
    due = datetime.date.fromisoformat(reasons[0].split()[-1])
    birth = young["birth"]
    assert years_before(due, 53) > birth > years_before(due, 54), (due, birth)


# --------------------------------------------------------------------------- delegation

def test_counter_staff_acting_for_a_citizen_submit_with_acted_by_and_both_in_the_access_log(cluster):
    who = mother(cluster)
    mum = demo_person(cluster, "陈晓敏")
    staff = staff_token(cluster, dept="police-hukou")
    r = call(cluster, staff, "/v1/staff/delegations", "POST",
             {"id_number": mum["id"], "name": mum["name"], "purpose": "出生一件事窗口帮办"})
    assert r.status == 200, r
    delegate = {"token": r.json()["access_token"]}
    f = form(cluster, delegate)
    assert {x["name"]: x["value"] for x in f["fields"]}["mother.name"] == "陈晓敏"
    r = submit(cluster, delegate, birth_fields(cluster))
    assert r.status == 201 and r.json()["state"] == "accepted", r
    app_id = r.json()["application_id"]
    assert app_row(cluster, app_id, "acted_by, citizen_id") == [staff["staff_id"], who["citizen_id"]]
    entries = call(cluster, who, "/v1/me/access-log").json()["entries"]
    reads = [e for e in entries if e["action"].startswith("dataset.read:") and e["actor_role"] == "staff"]
    assert reads and all(e["actor"] == staff["staff_id"] and e["on_behalf_of"] == who["citizen_id"] for e in reads)
    assert {e["purpose"] for e in reads} == {"one-thing form prefill: birth", "one-thing application: birth"}, reads
    events = psql(cluster, "SELECT DISTINCT actor_role || ':' || actor FROM item_events e JOIN application_items i "
                           f"USING (item_id) WHERE i.application_id = '{app_id}' AND e.note = 'submitted'")
    assert events == f"staff:{staff['staff_id']}", events
    # the citizen sees the application as their own
    assert call(cluster, who, f"/v1/onething/applications/{app_id}").status == 200


# --------------------------------------------------------------------------- catalog versions (last: it changes the
# active version for every later submission)

def test_catalog_load_activates_a_new_version_and_applications_keep_theirs(cluster):
    who = mother(cluster)
    old_app = submitted(cluster)
    v_old = old_app["catalog_version"]
    with open(CATALOG_FILE, encoding="utf-8") as f:
        doc = json.load(f)
    v2 = copy.deepcopy(doc)
    for it in v2["items"]:
        if it["code"] == "VACCINE_CERT":
            it["name"] = "预防接种证（第二版）"
            it["promised_days"] = 2
    birth = [b for b in v2["bundles"] if b["code"] == "birth"][0]
    birth["form"].append({"name": "vaccine.first_dose", "label": "首针接种日期", "type": "date", "required": False,
                          "not_future": True, "items": ["VACCINE_CERT"]})
    path = os.path.join(cluster.tmpdir, "catalog-v2.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(v2, f, ensure_ascii=False)
    versions = int(psql(cluster, "SELECT count(*) FROM catalog_versions"))
    r = cluster.gateway.run("catalog", "load", path)
    assert r.returncode == 0 and "is active" in r.stdout, r.stdout + r.stderr
    v_new = int(psql(cluster, "SELECT version FROM catalog_versions WHERE active"))
    assert v_new > v_old and int(psql(cluster, "SELECT count(*) FROM catalog_versions")) == versions + 1
    # loading the active document again changes nothing
    r = cluster.gateway.run("catalog", "load", path)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout
    # a broken catalog is refused with every problem named, and nothing is inserted
    broken = copy.deepcopy(v2)
    broken["bundles"][0]["items"][1]["depends_on"] = ["NO_SUCH_ITEM"]
    broken["bundles"][0]["form"][0]["type"] = "colour"
    broken["items"][0]["department"] = "nowhere"
    bad_path = os.path.join(cluster.tmpdir, "catalog-bad.json")
    with open(bad_path, "w", encoding="utf-8") as f:
        json.dump(broken, f, ensure_ascii=False)
    r = cluster.gateway.run("catalog", "load", bad_path)
    assert r.returncode == 1 and "nothing loaded" in r.stderr, r.stderr
    for problem in ("depends on NO_SUCH_ITEM", "unknown type \"colour\"", "department nowhere is not in departments"):
        assert problem in r.stderr, r.stderr
    assert int(psql(cluster, "SELECT version FROM catalog_versions WHERE active")) == v_new
    # the list, the form and new applications use the new version at once
    bundles = {b["code"]: b for b in call(cluster, who, "/v1/onething/bundles").json()["bundles"]}
    assert bundles["birth"]["catalog_version"] == v_new
    assert {i["item_code"]: i for i in bundles["birth"]["items"]}["VACCINE_CERT"]["name"] == "预防接种证（第二版）"
    assert form(cluster, who)["catalog_version"] == v_new
    new_app = submitted(cluster, vaccine__first_dose=str(china_today()))
    assert new_app["catalog_version"] == v_new
    assert items_by_code(new_app)["VACCINE_CERT"]["name"] == "预防接种证（第二版）"
    # the old application keeps its version, its item names and deadlines
    got = call(cluster, who, f"/v1/onething/applications/{old_app['application_id']}").json()
    assert got["catalog_version"] == v_old
    assert items_by_code(got)["VACCINE_CERT"]["name"] == "预防接种证办理", got
    assert items_by_code(got)["VACCINE_CERT"]["due_at"] == items_by_code(old_app)["VACCINE_CERT"]["due_at"]
    # the new version's field is checked by the new version's rules
    r = submit(cluster, who, birth_fields(cluster, vaccine__first_dose=str(china_today() + datetime.timedelta(days=9))))
    assert_error(r, 400, "INVALID_ARGUMENT", "vaccine.first_dose: must not be in the future")
    # back to the shipped catalog (a new version with its content)
    r = cluster.gateway.run("catalog", "load", CATALOG_FILE)
    assert r.returncode == 0 and "is active" in r.stdout, r.stdout + r.stderr
