"""FHIR search on GET /fhir/QuestionnaireResponse, as multi-site collection asks every site for it:
filters (_lastUpdated with prefixes and precisions, subject, questionnaire) checked against the
rows in the server's own SQLite file, keyset paging that returns every row exactly once while new
responses are posted between pages, total, _count clamping, scope per role, 400 OperationOutcome
for anything it does not support, and absolute links built from the Host header."""
import datetime
import json
import time
import unittest
import urllib.parse

from harness import ServerTest, gad7, make_key, phq9

BASE = "/fhir/QuestionnaireResponse"
PHQ9 = "http://loinc.org/q/44249-1"
GAD7 = "http://loinc.org/q/69737-5"
DAY_MS = 86400000
# Received times the class gives its first responses: every 7 hours from 2026-10-30T00:00:00Z,
# so that days, months, hours and zone offsets all cut through them.
T0_MS = int(datetime.datetime(2026, 10, 30, tzinfo=datetime.timezone.utc).timestamp() * 1000)
STEP_MS = 7 * 3600 * 1000


def ms(text):
    """Unix ms of an RFC 3339 time."""
    return int(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


class Search(ServerTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        s, admin = cls.server, cls.admin
        # A second trial, so that scope has something to keep out.
        r = s.request("POST", "/v1/trials", {"id": "T2", "name": "Trial two", "arms": ["A"],
                                             "schedule_weeks": [0, 4]}, key=admin)
        assert r.status == 201, r.body
        assert s.request("POST", "/v1/trials/T2/sites", {"id": "S1", "name": "x"},
                         key=admin).status == 201
        assert s.request("POST", "/v1/trials/T2/patients",
                         {"id": "Q001", "site": "S1", "arm": "A", "enrolled_on": "2026-11-01"},
                         key=admin).status == 201
        cls.patient = make_key(s, admin, role="patient", trial="T1", patient="P001")
        cls.site1 = make_key(s, admin, role="site", trial="T1", site="S1")
        cls.site2 = make_key(s, admin, role="site", trial="T1", site="S2")
        cls.investigator = make_key(s, admin, role="investigator", trial="T1")
        cls.investigator2 = make_key(s, admin, role="investigator", trial="T2")
        n = 0
        for patient, kind, count in (("P001", "phq9", 7), ("P001", "gad7", 3), ("P002", "phq9", 6),
                                     ("P003", "gad7", 4), ("Q001", "phq9", 3)):
            for _ in range(count):
                n += 1
                qr = (phq9 if kind == "phq9" else gad7)(patient, [n % 4] * 9, ident="s-%d" % n)
                r = s.post_fhir(qr, admin)
                assert r.status == 201, r.body
        # Scored before the tests start, so that a search and a later read see the same thing.
        deadline = time.time() + 30
        while True:
            with s.db() as db:
                pending = db.execute("SELECT count(*) FROM questionnaire_responses"
                                     " WHERE processing = 'pending'").fetchone()[0]
            if pending == 0:
                break
            assert time.time() < deadline, "responses not scored in time"
            time.sleep(0.05)
        with s.db() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM questionnaire_responses"
                                                " ORDER BY id")]
            db.executemany("UPDATE questionnaire_responses SET received_ms = ? WHERE id = ?",
                           [(T0_MS + i * STEP_MS, rid) for i, rid in enumerate(ids)])

    # ---- helpers

    def search(self, query="", key=None, headers=None, path=BASE):
        url = path + ("?" + query if query else "")
        return self.server.request("GET", url, key=key or self.admin, headers=headers)

    def ok(self, query="", key=None, headers=None):
        r = self.search(query, key, headers)
        self.assertEqual(r.status, 200, (query, r.body[:500]))
        self.assertEqual(r.header("Content-Type"), "application/fhir+json")
        return r.json()

    def link(self, bundle, relation):
        for link in bundle.get("link", []):
            if link["relation"] == relation:
                return link["url"]
        return None

    def follow(self, url, key):
        """GETs an absolute next link on this server."""
        parts = urllib.parse.urlsplit(url)
        self.assertEqual(parts.scheme, "http")
        self.assertEqual(parts.netloc, "127.0.0.1:%d" % self.server.port)
        r = self.server.request("GET", parts.path + "?" + parts.query, key=key)
        self.assertEqual(r.status, 200, r.body[:500])
        return r.json()

    def all_ids(self, query, key=None, between_pages=None):
        """Follows next links to the end; returns (ids in order, first page's total, pages)."""
        key = key or self.admin
        bundle = self.ok(query, key)
        total = bundle.get("total")
        ids, pages = [], 0
        while True:
            pages += 1
            self.assertEqual(bundle["resourceType"], "Bundle")
            self.assertEqual(bundle["type"], "searchset")
            ids += [int(e["resource"]["id"]) for e in bundle["entry"]]
            url = self.link(bundle, "next")
            if url is None:
                return ids, total, pages
            self.assertLess(pages, 1000)
            if between_pages:
                between_pages(pages)
            bundle = self.follow(url, key)

    def expected(self, where="1", params=()):
        with self.server.db() as db:
            return [row[0] for row in db.execute(
                "SELECT id FROM questionnaire_responses WHERE %s ORDER BY id" % where, params)]

    # ---- the Bundle

    def test_bundle_shape(self):
        bundle = self.ok("subject=Patient/P002")
        want = self.expected("patient_id = 'P002'")
        self.assertEqual(bundle["total"], len(want))
        self.assertIsNone(self.link(bundle, "next"))
        origin = "http://127.0.0.1:%d" % self.server.port
        self.assertTrue(self.link(bundle, "self").startswith(origin + BASE + "?"))
        with self.server.db() as db:
            received = dict(db.execute("SELECT id, received_ms FROM questionnaire_responses"))
        for entry, rid in zip(bundle["entry"], want):
            resource = entry["resource"]
            self.assertEqual(entry["fullUrl"], "%s%s/%d" % (origin, BASE, rid))
            self.assertEqual(entry["search"], {"mode": "match"})
            self.assertEqual(resource["resourceType"], "QuestionnaireResponse")
            self.assertEqual(resource["id"], str(rid))
            self.assertEqual(resource["meta"]["versionId"], "1")
            self.assertEqual(ms(resource["meta"]["lastUpdated"]), received[rid])
            self.assertRegex(resource["meta"]["lastUpdated"],
                             r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertEqual(resource["subject"]["reference"], "Patient/P002")
            # The same resource as a read gives, processing extension included.
            read = self.server.request("GET", "%s/%d" % (BASE, rid), key=self.admin).json()
            self.assertEqual(read, resource)

    def test_capability_statement_lists_the_search(self):
        cap = self.server.request("GET", "/fhir/metadata").json()
        qr = [r for r in cap["rest"][0]["resource"] if r["type"] == "QuestionnaireResponse"][0]
        self.assertIn("search-type", [i["code"] for i in qr["interaction"]])
        self.assertEqual({p["name"] for p in qr["searchParam"]},
                         {"_lastUpdated", "subject", "questionnaire"})

    # ---- filters

    def test_subject_and_questionnaire(self):
        for query, where in [
                ("subject=Patient/P001", "patient_id = 'P001'"),
                ("subject=P001", "patient_id = 'P001'"),
                ("questionnaire=" + urllib.parse.quote(GAD7, safe=""),
                 "questionnaire = '%s'" % GAD7),
                ("questionnaire=%s&subject=P001" % GAD7,
                 "questionnaire = '%s' AND patient_id = 'P001'" % GAD7),
                ("subject=Patient/P001&questionnaire=http://example.org/nothing", "0"),
                ("subject=Q001", "patient_id = 'Q001'"),
                ("subject=NOBODY", "0")]:
            ids, total, _ = self.all_ids(query + "&_count=4")
            want = self.expected(where)
            self.assertEqual(ids, want, query)
            self.assertEqual(total, len(want), query)

    def test_last_updated(self):
        t = T0_MS
        iso = lambda v: datetime.datetime.fromtimestamp(v / 1000, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S")
        nov1 = ms("2026-11-01T00:00:00Z")
        cases = [
            # prefixes on a full time
            ("_lastUpdated=ge" + iso(t + 5 * STEP_MS) + "Z", "received_ms >= ?", (t + 5 * STEP_MS,)),
            ("_lastUpdated=gt" + iso(t + 5 * STEP_MS) + "Z", "received_ms >= ?",
             (t + 5 * STEP_MS + 1000,)),
            ("_lastUpdated=lt" + iso(t + 5 * STEP_MS) + "Z", "received_ms < ?", (t + 5 * STEP_MS,)),
            ("_lastUpdated=le" + iso(t + 5 * STEP_MS) + "Z", "received_ms < ?",
             (t + 5 * STEP_MS + 1000,)),
            # no prefix: equal over the value's precision
            ("_lastUpdated=" + iso(t + 5 * STEP_MS) + "Z", "received_ms >= ? AND received_ms < ?",
             (t + 5 * STEP_MS, t + 5 * STEP_MS + 1000)),
            ("_lastUpdated=eq" + iso(t + 5 * STEP_MS) + ".000Z",
             "received_ms >= ? AND received_ms < ?", (t + 5 * STEP_MS, t + 5 * STEP_MS + 1)),
            ("_lastUpdated=2026-11-01", "received_ms >= ? AND received_ms < ?",
             (nov1, nov1 + DAY_MS)),
            ("_lastUpdated=2026-10", "received_ms >= ? AND received_ms < ?",
             (ms("2026-10-01T00:00:00Z"), nov1)),
            ("_lastUpdated=2026", "received_ms >= ? AND received_ms < ?",
             (ms("2026-01-01T00:00:00Z"), ms("2027-01-01T00:00:00Z"))),
            ("_lastUpdated=gt2026-11-01", "received_ms >= ?", (nov1 + DAY_MS,)),
            ("_lastUpdated=le2026-11-01", "received_ms < ?", (nov1 + DAY_MS,)),
            ("_lastUpdated=2026-11-01T07:00", "received_ms >= ? AND received_ms < ?",
             (nov1 + 7 * 3600000, nov1 + 7 * 3600000 + 60000)),
            # a range, as collectors ask for it
            ("_lastUpdated=ge2026-10-31T00:00:00Z&_lastUpdated=lt2026-11-02T00:00:00Z",
             "received_ms >= ? AND received_ms < ?", (nov1 - DAY_MS, nov1 + DAY_MS)),
            # zone offsets: %2B, and a '+' sent unencoded (decoded as a space)
            ("_lastUpdated=ge2026-11-01T03:00:00%2B02:00", "received_ms >= ?", (nov1 + 3600000,)),
            ("_lastUpdated=ge2026-11-01T03:00:00+02:00", "received_ms >= ?", (nov1 + 3600000,)),
            ("_lastUpdated=lt2026-10-31T20:00:00-05:00", "received_ms < ?", (nov1 + 3600000,)),
            # a window that closes itself
            ("_lastUpdated=gt2026-11-02&_lastUpdated=lt2026-11-01", "0", ()),
        ]
        for query, where, params in cases:
            want = self.expected(where, params)
            ids, total, _ = self.all_ids(query + "&_count=50")
            self.assertEqual(ids, want, query)
            self.assertEqual(total, len(want), query)
        # The cases cut through the data: none of the checks above is trivially everything.
        self.assertGreater(len(self.expected("received_ms >= ? AND received_ms < ?",
                                             (nov1, nov1 + DAY_MS))), 1)

    def test_filters_combine_with_scope(self):
        query = "_lastUpdated=ge2026-11-01&questionnaire=" + PHQ9
        ids, total, _ = self.all_ids(query, key=self.site2)
        want = self.expected("received_ms >= ? AND questionnaire = ? AND trial_id = 'T1'"
                             " AND site_id = 'S2'", (ms("2026-11-01T00:00:00Z"), PHQ9))
        self.assertTrue(want)
        self.assertEqual((ids, total), (want, len(want)))

    # ---- paging

    def test_paging_returns_every_row_once_while_rows_arrive(self):
        asof_want = self.expected("trial_id = 'T1'")
        posted = []

        def post_between(page):
            for i in range(2):
                r = self.server.post_fhir(phq9("P001", [1] * 9, ident="mid-%d-%d" % (page, i)),
                                          self.investigator)
                self.assertEqual(r.status, 201, r.body)
                posted.append(int(r.header("Location").rsplit("/", 1)[1]))

        ids, total, pages = self.all_ids("_count=4", key=self.investigator,
                                         between_pages=post_between)
        self.assertEqual(ids, asof_want)  # in id order, each once, none of the new ones
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(total, len(asof_want))
        self.assertEqual(pages, (len(asof_want) + 3) // 4)
        self.assertTrue(posted)
        self.assertFalse(set(posted) & set(ids))
        # A later search finds them.
        again, total2, _ = self.all_ids("_count=7", key=self.investigator)
        self.assertEqual(again, self.expected("trial_id = 'T1'"))
        self.assertTrue(set(posted) <= set(again))
        self.assertEqual(total2, len(again))

    def test_links_carry_the_filters(self):
        query = ("_lastUpdated=ge2026-10-01T00:00:00%2B01:00&subject=Patient/P001&questionnaire="
                 + urllib.parse.quote(PHQ9, safe="") + "&_count=2&_format=json")
        first = self.ok(query)
        nxt = urllib.parse.urlsplit(self.link(first, "next"))
        params = urllib.parse.parse_qs(nxt.query)
        self.assertEqual(params["_lastUpdated"], ["ge2026-10-01T00:00:00+01:00"])
        self.assertEqual(params["subject"], ["Patient/P001"])
        self.assertEqual(params["questionnaire"], [PHQ9])
        self.assertEqual(params["_count"], ["2"])
        self.assertEqual(params["_cursor"], [first["entry"][-1]["resource"]["id"]])
        self.assertTrue(int(params["_asof"][0]) >= int(params["_cursor"][0]))
        # Later pages: total only when asked for (counting again costs a scan of the range).
        second = self.follow(self.link(first, "next"), self.admin)
        self.assertNotIn("total", second)
        self.assertGreater(int(second["entry"][0]["resource"]["id"]), int(params["_cursor"][0]))
        parts = urllib.parse.urlsplit(self.link(first, "next"))
        r = self.server.request("GET", parts.path + "?" + parts.query + "&_total=accurate",
                                key=self.admin)
        self.assertEqual(r.json()["total"], first["total"])

    def test_total_none_and_count_zero(self):
        bundle = self.ok("_total=none&subject=P001")
        self.assertNotIn("total", bundle)
        bundle = self.ok("_count=0&subject=P001")
        self.assertEqual(bundle["total"], len(self.expected("patient_id = 'P001'")))
        self.assertEqual(bundle["entry"], [])
        self.assertIsNone(self.link(bundle, "next"))

    def test_count_default_and_clamp(self):
        # 620 responses of one patient written straight into the database.
        r = self.server.request("POST", "/v1/trials/T2/patients",
                                {"id": "Q900", "site": "S1", "arm": "A",
                                 "enrolled_on": "2026-11-01"}, key=self.admin)
        self.assertEqual(r.status, 201)
        body = json.dumps(phq9("Q900", [0] * 9)).encode()
        with self.server.db() as db:
            db.executemany(
                "INSERT INTO questionnaire_responses(trial_id, site_id, patient_id, questionnaire,"
                " instrument, identifier_system, identifier_value, status, authored, authored_s,"
                " visit_week, body, body_sha256, received_ms, processing, score, score_is_int,"
                " band, alert)"
                " VALUES('T2','S1','Q900',?,?,'urn:clamp',?,'completed','2026-11-20T10:00:00Z',"
                " 1763632800,0,?,x'00',?,'scored',0,1,'minimal',0)",
                [(PHQ9, PHQ9, "c-%d" % i, body, T0_MS + i) for i in range(620)])
        bundle = self.ok("subject=Q900")
        self.assertEqual(len(bundle["entry"]), 50)
        self.assertEqual(bundle["total"], 620)
        bundle = self.ok("subject=Q900&_count=100000")
        self.assertEqual(len(bundle["entry"]), 500)
        self.assertIn("_count=500", self.link(bundle, "self"))
        self.assertIn("_count=500", self.link(bundle, "next"))
        last = self.follow(self.link(bundle, "next"), self.admin)
        self.assertEqual(len(last["entry"]), 120)
        self.assertIsNone(self.link(last, "next"))
        ids, total, pages = self.all_ids("subject=Q900&_count=500", key=self.investigator2)
        self.assertEqual((len(ids), len(set(ids)), total, pages), (620, 620, 620, 2))

    def test_exact_last_page_has_no_next(self):
        n = len(self.expected("patient_id = 'P002'"))
        bundle = self.ok("subject=P002&_count=%d" % n)
        self.assertEqual(len(bundle["entry"]), n)
        self.assertIsNone(self.link(bundle, "next"))

    # ---- scope

    def test_scope_per_role(self):
        cases = [
            (self.admin, "", "1"),
            (self.investigator, "", "trial_id = 'T1'"),
            (self.investigator2, "", "trial_id = 'T2'"),
            (self.site1, "", "trial_id = 'T1' AND site_id = 'S1'"),
            (self.site2, "", "trial_id = 'T1' AND site_id = 'S2'"),
            (self.patient, "", "patient_id = 'P001'"),
            (self.patient, "subject=Patient/P001", "patient_id = 'P001'"),
            (self.site1, "subject=P003", "patient_id = 'P003'"),
            (self.investigator, "subject=P002", "patient_id = 'P002'"),
        ]
        for key, query, where in cases:
            ids, total, _ = self.all_ids(query + ("&" if query else "") + "_count=50", key=key)
            want = self.expected(where)
            self.assertTrue(want)
            self.assertEqual(ids, want, (query, where))
            self.assertEqual(total, len(want), (query, where))

    def test_foreign_subject_is_403(self):
        for key, subject in [(self.patient, "P002"), (self.patient, "NOBODY"),
                             (self.site2, "P001"), (self.investigator2, "P001"),
                             (self.investigator, "Q001")]:
            r = self.search("subject=" + subject, key=key)
            self.assertEqual(r.status, 403, (subject, r.body))
            self.assertEqual(r.json()["resourceType"], "OperationOutcome")
            self.assertNotIn(subject.encode(), r.body)

    def test_auth_required(self):
        r = self.server.request("GET", BASE)
        self.assertEqual(r.status, 401)
        self.assertEqual(r.json()["resourceType"], "OperationOutcome")

    # ---- what it refuses

    def test_bad_parameters_are_400(self):
        for query in ["foo=1", "_sort=_lastUpdated", "_include=QuestionnaireResponse:subject",
                      "subject:missing=true", "status=completed", "_id=1",
                      "_lastUpdated=2026-13-01", "_lastUpdated=2026-02-30", "_lastUpdated=x",
                      "_lastUpdated=ne2026-11-01", "_lastUpdated=sa2026-11-01",
                      "_lastUpdated=ge2026-11-01T10:00:00+25:00", "_lastUpdated=ge2026-11-01T10",
                      "_lastUpdated=", "_lastUpdated", "_lastUpdated=" + "9" * 60,
                      "&".join(["_lastUpdated=ge2026-11-01"] * 9),
                      "_count=-1", "_count=abc", "_count=1.5", "_count=1&_count=2",
                      "_cursor=0&_asof=5", "_cursor=abc&_asof=5", "_cursor=5", "_asof=-3",
                      "_cursor=9&_asof=5", "_cursor=99999999999999999999&_asof=5",
                      "subject=Patient/P001,P002", "subject=", "subject=Group/G1",
                      "subject=P001&subject=P002", "questionnaire=a&questionnaire=b",
                      "_total=maybe", "_format=xml", "_format=application/fhir%2Bxml"]:
            r = self.search(query)
            self.assertEqual(r.status, 400, (query, r.body))
            outcome = r.json()
            self.assertEqual(outcome["resourceType"], "OperationOutcome", query)
            self.assertEqual(outcome["issue"][0]["severity"], "error", query)
            self.assertNotIn(b"P001", r.body)
        r = self.search("foo=1")
        self.assertIn("'foo'", r.json()["issue"][0]["diagnostics"])

    def test_accepted_noops(self):
        for query in ["_format=json", "_format=application/fhir%2Bjson",
                      "_format=application/fhir+json", "_total=accurate", "_total=estimate"]:
            self.assertEqual(self.search(query).status, 200, query)
        # Lenient handling, when the client asks for it: unknown parameters are ignored and
        # left out of the links.
        bundle = self.ok("foo=1&subject=P002", headers={"Prefer": "handling=lenient"})
        self.assertEqual(bundle["total"], len(self.expected("patient_id = 'P002'")))
        self.assertNotIn("foo", self.link(bundle, "self"))

    def test_relative_links_without_a_usable_host(self):
        r = self.server.request("GET", BASE + "?subject=P001&_count=2", key=self.admin,
                                headers={"Host": "bad host\"x"})
        if r.status == 400:
            return  # refused by libmicrohttpd itself: nothing to build links from
        bundle = r.json()
        self.assertTrue(self.link(bundle, "next").startswith(BASE + "?"))
        self.assertTrue(bundle["entry"][0]["fullUrl"].startswith(BASE + "/"))

    def test_head(self):
        r = self.server.request("HEAD", BASE + "?subject=P001", key=self.admin)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")


if __name__ == "__main__":
    unittest.main()
