"""GET /v1/trials/{id}/progress over real HTTP: who may read what (admin, investigator, site key
with its own rows only, patient refused), ETag and 304, fresh within a second of a 201, safety
alerts counted after scoring, the visit inferred from `authored` when the response names none,
new patients counted, and a restart whose first read already has every number."""
import time
import unittest

from harness import ServerTest, gad7, make_key, phq9


def wait_for(fn, timeout=1.0):
    """Polls fn until it returns a true value or timeout seconds pass; returns the last value and
    the seconds it took."""
    start = time.monotonic()
    while True:
        value = fn()
        elapsed = time.monotonic() - start
        if value or elapsed > timeout:
            return value, elapsed
        time.sleep(0.02)


def sums_match(doc):
    sites = doc["sites"]
    return (sum(s["enrolled"]["total"] for s in sites) == doc["enrolled"]["total"]
            and sum(doc["enrolled"]["by_arm"].values()) == doc["enrolled"]["total"]
            and sum(s["questionnaires"]["total"] for s in sites) == doc["questionnaires"]["total"]
            and sum(i["total"] for i in doc["questionnaires"]["by_instrument"])
            == doc["questionnaires"]["total"]
            and sum(s["visits"]["expected"] for s in sites) == doc["visits"]["expected"]
            and sum(s["visits"]["received"] for s in sites) == doc["visits"]["received"]
            and sum(s["alerts"]["open"] for s in sites) == doc["alerts"]["open"])


class Progress(ServerTest):
    # Publish often so the freshness bound is about the pipeline, not the throttle's default.
    server_args = ("--progress-publish-ms", "100")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        s = cls.server
        cls.investigator = make_key(s, cls.admin, role="investigator", trial="T1")
        cls.site2 = make_key(s, cls.admin, role="site", trial="T1", site="S2")
        cls.p1 = make_key(s, cls.admin, role="patient", trial="T1", patient="P001")
        cls.p2 = make_key(s, cls.admin, role="patient", trial="T1", patient="P002")
        r = s.request("POST", "/v1/trials", {"id": "T2", "name": "Other", "arms": ["X"],
                                             "schedule_weeks": [0]}, key=cls.admin)
        assert r.status == 201
        time.sleep(0.3)  # progress picks up new trials within a second
        cls.other = make_key(s, cls.admin, role="investigator", trial="T2")

    def get(self, key, trial="T1", headers=None):
        return self.server.request("GET", "/v1/trials/%s/progress" % trial, key=key,
                                   headers=headers)

    def test_1_scopes(self):
        # The trial and its patients were created a moment ago: visible within a second.
        doc, _ = wait_for(lambda: (lambda r: r.status == 200 and r.json()["enrolled"]["total"] == 3
                                   and r)(self.get(self.investigator)))
        self.assertTrue(doc, "the seeded trial did not appear within a second")
        r = self.get(self.investigator)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type"), "application/json")
        doc = r.json()
        self.assertEqual(doc["trial"], "T1")
        self.assertEqual(doc["scope"], "trial")
        self.assertEqual(doc["enrolled"]["total"], 3)
        self.assertEqual(doc["enrolled"]["by_arm"], {"A": 3, "B": 0})
        self.assertEqual([s["site"] for s in doc["sites"]], ["S1", "S2"])
        self.assertTrue(sums_match(doc))
        self.assertEqual(self.get(self.admin).status, 200)
        site = self.get(self.site2).json()
        self.assertEqual(site["scope"], "site")
        self.assertEqual([s["site"] for s in site["sites"]], ["S2"])
        self.assertEqual(site["enrolled"]["total"], 1)
        self.assertTrue(sums_match(site))
        self.assertEqual(self.get(self.other).status, 403)
        self.assertEqual(self.get(self.p1).status, 403)
        self.assertEqual(self.get(None).status, 401)
        self.assertEqual(self.get(self.admin, trial="NOPE").status, 404)
        r = self.server.request("POST", "/v1/trials/T1/progress", key=self.admin)
        self.assertEqual(r.status, 405)

    def test_2_fresh_after_submission_and_etag(self):
        r = self.get(self.investigator)
        etag = r.header("ETag")
        self.assertTrue(etag and etag.startswith('"'), etag)
        before = r.json()["questionnaires"]["total"]
        r = self.get(self.investigator, headers={"If-None-Match": etag})
        self.assertEqual(r.status, 304)
        self.assertEqual(r.body, b"")

        r = self.server.post_fhir(phq9("P001", [1] * 8 + [0], week=0), self.p1)  # no alert
        self.assertEqual(r.status, 201)
        doc, took = wait_for(lambda: (lambda d: d if d["questionnaires"]["total"] == before + 1
                                      else None)(self.get(self.investigator).json()))
        self.assertIsNotNone(doc, "not visible within 1 s")
        self.assertLess(took, 1.0)
        self.assertTrue(sums_match(doc))
        r = self.get(self.investigator, headers={"If-None-Match": etag})
        self.assertEqual(r.status, 200)
        self.assertNotEqual(r.header("ETag"), etag)

    def test_3_alert_and_scores(self):
        def s2_alerts(d):
            return [s for s in d["sites"] if s["site"] == "S2"][0]["alerts"]["open"]

        def rebuilds():
            for line in self.server.request("GET", "/metrics").body.decode().splitlines():
                if line.startswith('trialhub_progress_events_total{event="rebuild"}'):
                    return float(line.split()[-1])
            return None
        rebuilds_before = rebuilds()
        self.assertEqual(s2_alerts(self.get(self.investigator).json()), 0)
        # Item 9 (thoughts of self-harm) answered: a safety alert once scored.
        r = self.server.post_fhir(phq9("P002", [0] * 8 + [2], week=2), self.p2)
        self.assertEqual(r.status, 201)
        doc, _ = wait_for(lambda: (lambda d: d if s2_alerts(d) == 1 else None)(
            self.get(self.investigator).json()), timeout=3)
        self.assertIsNotNone(doc, "alert not counted")
        self.assertEqual(doc["alerts"]["open"], 1)
        # Counted from the notes alone: a submission and its score need no rebuild.
        self.assertEqual(rebuilds(), rebuilds_before)
        week2 = [c for c in doc["scores"] if c["week"] == 2
                 and c["instrument"] == "http://loinc.org/q/44249-1"]
        self.assertEqual(week2, [{"instrument": "http://loinc.org/q/44249-1", "week": 2, "n": 1,
                                  "mean": 2}])
        # The site key of S2 sees its alert; the trial total is S2's own.
        site = self.get(self.site2).json()
        self.assertEqual(site["alerts"]["open"], 1)

    def test_4_visit_inferred_from_authored(self):
        # P003 was enrolled on 2026-11-01; authored 15 days later is nearest to week 2.
        qr = phq9("P003", [0] * 9, authored="2026-11-16T09:00:00Z")
        key = make_key(self.server, self.admin, role="patient", trial="T1", patient="P003")
        before = self.get(self.investigator).json()["visits"]["received"]
        self.assertEqual(self.server.post_fhir(qr, key).status, 201)
        doc, _ = wait_for(lambda: (lambda d: d if d["visits"]["received"] == before + 1
                                   else None)(self.get(self.investigator).json()), timeout=3)
        self.assertIsNotNone(doc)
        cells = [c for c in doc["scores"] if c["week"] == 2]
        doc, _ = wait_for(lambda: (lambda d: d if any(
            c["week"] == 2 and c["n"] == 2 for c in d["scores"]) else None)(
            self.get(self.investigator).json()), timeout=3)
        self.assertIsNotNone(doc, cells)

    def test_5_new_patient_counted(self):
        r = self.server.request("POST", "/v1/trials/T1/patients",
                                {"id": "P010", "site": "S2", "arm": "B",
                                 "enrolled_on": "2026-11-02"}, key=self.admin)
        self.assertEqual(r.status, 201)
        doc, _ = wait_for(lambda: (lambda d: d if d["enrolled"]["by_arm"]["B"] == 1 else None)(
            self.get(self.investigator).json()), timeout=3)
        self.assertIsNotNone(doc, "the new patient was not counted")
        self.assertTrue(sums_match(doc))
        key = make_key(self.server, self.admin, role="patient", trial="T1", patient="P010")
        r = self.server.post_fhir(gad7("P010", [1] * 7), key)
        self.assertEqual(r.status, 201)
        doc, _ = wait_for(lambda: (lambda d: d if [s for s in d["sites"] if s["site"] == "S2"][0]
                                   ["questionnaires"]["total"] >= 2 else None)(
            self.get(self.investigator).json()), timeout=3)
        self.assertIsNotNone(doc)

    def test_6_restart_first_read_is_right(self):
        time.sleep(0.5)  # let scoring settle
        before = self.get(self.investigator).json()
        self.assertEqual(self.server.stop(), 0)
        self.server.start()
        after = self.get(self.investigator).json()
        for k in ("enrolled", "questionnaires", "visits", "scores", "alerts", "sites"):
            self.assertEqual(before[k], after[k], k)


if __name__ == "__main__":
    unittest.main()
