"""Interim reports over real HTTP on a real SQLite file with 50,000 responses (written straight into
the database by the test, then read by a restarted server): statistics checked against Python's
statistics module on the same rows, CSV/PDF/PNG/SVG outputs, scope, and the point of the issue:
deadlines (504 naming the stage) and a client that goes away cancel the work within 50 ms, as
/metrics shows; identical concurrent requests share one computation; a full report pool answers
503; asynchronous jobs run, are fetched and are cancelled."""
import datetime
import math
import os
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
import unittest

from harness import Server, make_key, seed

PHQ9 = "http://loinc.org/q/44249-1"
GAD7 = "http://loinc.org/q/69737-5"
WEEKS = [0, 2, 4, 8, 12]


def t975(df):
    """Student's t 97.5% quantile by the Cornish-Fisher expansion (good to 1e-5 for df >= 30)."""
    z = 1.959963984540054
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def summary(values):
    n = len(values)
    out = {"n": n}
    if n == 0:
        return out
    out["mean"] = statistics.fmean(values)
    out["median"] = statistics.median(values)
    if n >= 2:
        q = statistics.quantiles(values, n=4, method="inclusive")
        out["q1"], out["q3"] = q[0], q[2]
        out["sd"] = statistics.stdev(values)
        half = t975(n - 1) * out["sd"] / math.sqrt(n)
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def insert_rows(db_path, trial, rows):
    """rows: (site, patient, instrument, week, score, alert)."""
    import sqlite3
    con = sqlite3.connect(db_path, timeout=30)
    con.executemany(
        "INSERT INTO questionnaire_responses(trial_id, site_id, patient_id, questionnaire,"
        " instrument, identifier_system, identifier_value, status, authored, authored_s,"
        " visit_week, body, body_sha256, received_ms, processing, score, score_is_int, band, alert)"
        " VALUES(?,?,?,?,?,'urn:test',?,'completed','2026-11-20T10:00:00Z',1763632800,?,"
        " x'7b7d',x'00',1763632800000,'scored',?,1,'none',?)",
        [(trial, site, patient, instr, instr, "%s-%d" % (trial, i), week, score, alert)
         for i, (site, patient, instr, week, score, alert) in enumerate(rows)])
    con.commit()
    con.close()


def enrol(server, admin, patients, sites):
    """Trial T1 and its sites through the API; the patients straight into the stopped server's
    database (thousands of admin requests would only slow the test down). Arms alternate A/B."""
    seed(server, admin, patients=(), sites=sites)
    server.stop()
    import sqlite3
    con = sqlite3.connect(server.db_path, timeout=30)
    con.executemany("INSERT INTO patients(id, trial_id, site_id, arm, enrolled_on)"
                    " VALUES(?, 'T1', ?, ?, '2026-11-01')",
                    [(p, sites[i % len(sites)], "AB"[i % 2]) for i, p in enumerate(patients)])
    con.commit()
    site_of = dict(con.execute("SELECT id, site_id FROM patients"))
    arm_of = dict(con.execute("SELECT id, arm FROM patients"))
    enrolled = dict(con.execute("SELECT id, enrolled_on FROM patients"))
    con.close()
    return site_of, arm_of, enrolled


def metric(text, name, labels=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{" if labels else name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class Report(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        s = cls.server = Server(("--report-threads", "2", "--report-queue", "8"))
        cls.admin = s.token("--role", "admin")
        s.start()
        patients = ["P%04d" % i for i in range(1000)]
        site_of, arm_of, enrolled = enrol(s, cls.admin, patients, ("S1", "S2", "S3"))
        rng = random.Random(20261129)
        rows = []
        # 50,000 responses: 1000 patients x 5 visits x 2 instruments x 5 (repeats: the latest of a
        # patient's visit counts), with some visits missing.
        for rep in range(5):
            for p in patients:
                for w in WEEKS:
                    for instr, top in ((PHQ9, 27), (GAD7, 21)):
                        score = rng.randint(0, top)
                        if rep == 4 and rng.random() < 0.1:
                            score = None  # an unscored response: not in the statistics
                        rows.append((site_of[p], p, instr, w, score, 1 if rng.random() < 0.01
                                     else 0))
        assert len(rows) == 50000
        insert_rows(s.db_path, "T1", rows)
        cls.rows, cls.site_of, cls.arm_of, cls.enrolled = rows, site_of, arm_of, enrolled
        s.start()
        cls.investigator = make_key(s, cls.admin, role="investigator", trial="T1")
        cls.patient = make_key(s, cls.admin, role="patient", trial="T1", patient="P0001")

    @classmethod
    def tearDownClass(cls):
        rc = cls.server.stop()
        log = cls.server.read_log()
        cls.server.cleanup()
        assert rc == 0, log[-3000:]
        for marker in ("Sanitizer", "runtime error"):
            assert marker not in log, log[-4000:]

    def get(self, query="", key=None, timeout=60):
        return self.server.request("GET", "/v1/trials/T1/report" + query,
                                   key=key or self.investigator, timeout=timeout)

    def expected_cells(self):
        latest = {}
        for site, p, instr, w, score, alert in self.rows:
            if score is not None:
                latest[(instr, p, w)] = score
            elif (instr, p, w) not in latest:
                pass
        cells = {}
        today = datetime.datetime.now(datetime.timezone.utc).date()
        for instr in (PHQ9, GAD7):
            for arm in ("A", "B"):
                for w in WEEKS:
                    members = [p for p, a in self.arm_of.items() if a == arm]
                    vals = [latest[(instr, p, w)] for p in members if (instr, p, w) in latest]
                    changes = [latest[(instr, p, w)] - latest[(instr, p, 0)] for p in members
                               if w > 0 and (instr, p, w) in latest and (instr, p, 0) in latest]
                    due = sum(1 for p in members if datetime.date.fromisoformat(self.enrolled[p])
                              + datetime.timedelta(days=7 * w) <= today)
                    alerts = sum(a for site, p, i, ww, sc, a in self.rows
                                 if i == instr and ww == w and self.arm_of[p] == arm)
                    cells[(instr, arm, w)] = (summary(vals), summary(changes), due, alerts)
        return cells

    def assert_stats(self, got, want, what):
        self.assertEqual(got["n"], want["n"], what)
        for k in ("mean", "median", "q1", "q3", "sd"):
            if k in want:
                self.assertAlmostEqual(got[k], want[k], delta=1e-6 * max(1, abs(want[k])),
                                       msg="%s %s" % (what, k))
        if "ci95" in want:
            for i in range(2):
                self.assertAlmostEqual(got["ci95"][i], want["ci95"][i], delta=1e-4,
                                       msg="%s ci95" % what)

    def test_json_statistics_match_python(self):
        r = self.get()
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(r.header("Content-Type"), "application/json")
        doc = r.json()
        self.assertEqual(doc["trial"], "T1")
        self.assertEqual(doc["responses"], 50000)
        self.assertEqual(doc["patients"], 1000)
        want = self.expected_cells()
        self.assertEqual(len(doc["cells"]), len(want))
        for cell in doc["cells"]:
            key = (cell["instrument"], cell["arm"], cell["week"])
            score, change, due, alerts = want[key]
            self.assert_stats(cell["score"], score, "%s score" % (key,))
            self.assert_stats(cell["change"], change, "%s change" % (key,))
            self.assertEqual(cell["expected"], due, key)
            self.assertEqual(cell["received"], score["n"], key)
            self.assertEqual(cell["alerts"], alerts, key)
        self.assertEqual(sum(s["enrolled"] for s in doc["sites"]), 1000)
        self.assertEqual(sum(s["alerts"] for s in doc["sites"]),
                         sum(row[5] for row in self.rows))

    def test_csv_pdf_png_svg(self):
        r = self.get("?format=csv")
        self.assertEqual(r.status, 200)
        self.assertTrue(r.header("Content-Type").startswith("text/csv"))
        self.assertIn("attachment", r.header("Content-Disposition") or "")
        lines = r.body.decode().strip().splitlines()
        self.assertEqual(len(lines), 1 + 2 * 2 * 5)  # header + instruments x arms x weeks
        r = self.get("?format=pdf")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type"), "application/pdf")
        self.assertTrue(r.body.startswith(b"%PDF"))
        tmp = tempfile.mkdtemp(prefix="th-report-")
        try:
            path = os.path.join(tmp, "r.pdf")
            with open(path, "wb") as f:
                f.write(r.body)
            text = subprocess.run(["pdftotext", path, "-"], capture_output=True, check=True,
                                  timeout=60).stdout.decode()
        finally:
            shutil.rmtree(tmp)
        self.assertIn("Trial one", text)
        n_a0 = self.expected_cells()[(PHQ9, "A", 0)][0]["n"]
        self.assertIn(str(n_a0), text)
        r = self.get("?format=png&chart=scores")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type"), "image/png")
        self.assertEqual(r.body[:8], b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", r.body[16:24])
        self.assertEqual((width, height), (1200, 800))
        r = self.get("?format=svg&chart=completion")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type"), "image/svg+xml")
        self.assertIn(b"</svg>", r.body)

    def test_errors_and_scope(self):
        self.assertEqual(self.get(key=self.patient).status, 403)
        self.assertEqual(self.server.request("GET", "/v1/trials/NOPE/report",
                                             key=self.admin).status, 404)
        self.assertEqual(self.get("?format=docx").status, 400)
        self.assertEqual(self.get("?format=json&chart=scores").status, 400)
        self.assertEqual(self.get("?timeout=soon").status, 400)
        self.assertEqual(self.get("?timeout=1h").status, 400)
        self.assertEqual(self.get("?timeout=1000s").status, 400)  # above the maximum (120 s)

    def test_timeout_is_504_with_stage(self):
        before = self.server.request("GET", "/metrics").body.decode()
        r = self.get("?format=pdf&timeout=1ms")
        self.assertEqual(r.status, 504)
        self.assertIn("stage running", r.json()["detail"])
        after = self.server.request("GET", "/metrics").body.decode()
        self.assertEqual(metric(after, "trialhub_reports_total", 'outcome="timed_out"')
                         - metric(before, "trialhub_reports_total", 'outcome="timed_out"'), 1)

    def test_async_job(self):
        r = self.server.request("POST", "/v1/trials/T1/reports", {"format": "csv"},
                                key=self.investigator)
        self.assertEqual(r.status, 202, r.body)
        job = r.json()
        self.assertEqual(r.header("Location"), "/v1/reports/" + job["id"])
        for _ in range(600):
            job = self.server.request("GET", "/v1/reports/" + job["id"],
                                      key=self.investigator).json()
            if job["state"] != "running":
                break
            time.sleep(0.05)
        self.assertEqual(job["state"], "done", job)
        r = self.server.request("GET", job["file"], key=self.investigator)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, self.get("?format=csv").body)
        self.server.request("POST", "/v1/trials", {"id": "T2", "name": "Other", "arms": ["X"],
                                                   "schedule_weeks": [0]}, key=self.admin)
        other = make_key(self.server, self.admin, role="investigator", trial="T2")
        self.assertEqual(self.server.request("GET", "/v1/reports/" + job["id"],
                                             key=other).status, 403)
        r = self.server.request("DELETE", "/v1/reports/" + job["id"], key=self.investigator)
        self.assertEqual(r.status, 204)
        self.assertEqual(self.server.request("GET", "/v1/reports/" + job["id"],
                                             key=self.investigator).status, 404)
        r = self.server.request("POST", "/v1/trials/T1/reports", {"format": "xls"},
                                key=self.investigator)
        self.assertEqual(r.status, 400)


class Cancel(unittest.TestCase):
    """A trial big enough that its report runs for a while, to catch it mid-way."""

    @classmethod
    def setUpClass(cls):
        s = cls.server = Server(("--report-threads", "1", "--report-queue", "1"))
        cls.admin = s.token("--role", "admin")
        s.start()
        patients = ["P%04d" % i for i in range(2000)]
        site_of, _, _ = enrol(s, cls.admin, patients, ("S1", "S2"))
        rng = random.Random(1)
        rows = [(site_of[p], p, PHQ9, WEEKS[i % 5], rng.randint(0, 27), 0)
                for i in range(800000) for p in (patients[i % 2000],)]
        insert_rows(s.db_path, "T1", rows)
        s.start()
        cls.investigator = make_key(s, cls.admin, role="investigator", trial="T1")
        # How long an uncancelled report takes here: the tests below need it to run >= 300 ms.
        start = time.monotonic()
        r = s.request("GET", "/v1/trials/T1/report", key=cls.investigator, timeout=120)
        cls.full_s = time.monotonic() - start
        assert r.status == 200, r.body[:300]

    @classmethod
    def tearDownClass(cls):
        rc = cls.server.stop()
        log = cls.server.read_log()
        cls.server.cleanup()
        assert rc == 0, log[-3000:]
        for marker in ("Sanitizer", "runtime error"):
            assert marker not in log, log[-4000:]

    def metrics(self):
        return self.server.request("GET", "/metrics").body.decode()

    def wait_metric(self, name, labels, at_least, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.metrics()
            if metric(text, name, labels) >= at_least:
                return text
            time.sleep(0.02)
        self.fail("%s{%s} never reached %s" % (name, labels, at_least))

    def test_1_disconnect_stops_the_work_within_50ms(self):
        self.assertGreater(self.full_s, 0.3, "the report is too quick to catch mid-way")
        before = self.metrics()
        canceled0 = metric(before, "trialhub_reports_total", 'outcome="client_canceled"')
        completed0 = metric(before, "trialhub_reports_total", 'outcome="completed"')
        fast0 = metric(before, "trialhub_report_cancel_latency_seconds_bucket", 'le="0.05"')
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        sock.sendall(b"GET /v1/trials/T1/report?format=pdf HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + self.investigator.encode() + b"\r\n\r\n")
        time.sleep(0.1)
        sock.close()
        after = self.wait_metric("trialhub_reports_total", 'outcome="client_canceled"',
                                 canceled0 + 1)
        self.assertEqual(metric(after, "trialhub_report_cancel_latency_seconds_bucket",
                                'le="0.05"') - fast0, 1, "the work did not stop within 50 ms")
        self.assertEqual(metric(after, "trialhub_reports_total", 'outcome="completed"'),
                         completed0, "a report was produced for nobody")

    def test_2_deadline_stops_the_work_within_50ms(self):
        before = self.metrics()
        fast0 = metric(before, "trialhub_report_cancel_latency_seconds_bucket", 'le="0.05"')
        r = self.server.request("GET", "/v1/trials/T1/report?timeout=150ms",
                                key=self.investigator)
        self.assertEqual(r.status, 504)
        self.assertRegex(r.json()["detail"], "stage running: (query|statistics|render)")
        after = self.metrics()
        self.assertEqual(metric(after, "trialhub_report_cancel_latency_seconds_bucket",
                                'le="0.05"') - fast0, 1)

    def test_3_identical_requests_share_one_computation(self):
        before = metric(self.metrics(), "trialhub_reports_total", 'outcome="completed"')
        results = [None, None]
        barrier = threading.Barrier(2)

        def run(i):
            barrier.wait()
            results[i] = self.server.request("GET", "/v1/trials/T1/report?format=csv",
                                             key=self.investigator, timeout=120)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([r.status for r in results], [200, 200])
        self.assertEqual(results[0].body, results[1].body)
        after = metric(self.metrics(), "trialhub_reports_total", 'outcome="completed"')
        self.assertEqual(after - before, 1, "two computations for one report")

    def test_4_full_pool_is_503(self):
        formats = ["json", "csv", "pdf", "png", "svg", "png&chart=enrolment"]
        results = [None] * len(formats)

        def run(i):
            results[i] = self.server.request(
                "GET", "/v1/trials/T1/report?format=" + formats[i], key=self.investigator,
                timeout=120)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(formats))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status for r in results)
        self.assertIn(503, statuses)
        self.assertTrue(set(statuses) <= {200, 503}, statuses)
        refused = [r for r in results if r.status == 503]
        self.assertTrue(all(r.header("Retry-After") for r in refused))

    def test_5_delete_cancels_a_running_job(self):
        r = self.server.request("POST", "/v1/trials/T1/reports", {"format": "pdf"},
                                key=self.investigator)
        self.assertEqual(r.status, 202)
        job = r.json()
        time.sleep(0.05)
        r = self.server.request("DELETE", "/v1/reports/" + job["id"], key=self.investigator)
        self.assertIn(r.status, (202, 204))
        if r.status == 202:
            for _ in range(200):
                job = self.server.request("GET", "/v1/reports/" + job["id"],
                                          key=self.investigator).json()
                if job["state"] != "running":
                    break
                time.sleep(0.02)
            self.assertEqual(job["state"], "canceled", job)


if __name__ == "__main__":
    unittest.main()
