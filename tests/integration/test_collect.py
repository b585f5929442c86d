"""Multi-site collection end to end: five real trialhub instances act as the sites' FHIR servers
(each with its own database, trial and patients, their responses posted through their own API),
and one Python process (fixture_sites.py) serves the broken ones: a site that hangs, one that
answers 500, one that drops the connection mid-body, one that answers invalid JSON, one that pages
forever, a slow one and one whose `next` link points at another host. The sponsor instance
collects from all of them at once, and the test checks what the issue asks for: every valid record
arrives exactly once (the per-site counts and the sponsor's stored rows), a second collection
brings only duplicates, each broken site has its own outcome, the collection ends by its deadline
and stops at once when cancelled, records the sponsor must refuse are refused with a reason
without stopping the rest, the credentials are never shown, and no thread or descriptor is left
behind."""
import json
import math
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
import urllib.parse

from harness import Server, gad7, make_key, phq9, seed

HERE = os.path.dirname(os.path.abspath(__file__))

GOOD = [1, 2, 3, 4, 5]
# Valid records per good site. Site 1 has more than one page's worth at any sensible page size.
COUNTS = {1: 150, 2: 20, 3: 25, 4: 30, 5: 35}
NO_IDENT_EVERY = 7  # every 7th record (i % 7 == 3) has no identifier: duplicates by resource id
BAD = {"S6": "hang", "S7": "error500", "S8": "drop", "S9": "badjson", "S10": "forever",
       "S11": "slow", "S12": "offhost"}
MAX_IN_FLIGHT = 5
DEADLINE_S = 8
SECRET_ANSWER = "FIXTURE-SECRET-ANSWER-7731"  # as in fixture_sites.py
UNKNOWN_PATIENT = "PZ99"                      # as in fixture_sites.py
TRANSFER_REASON = re.compile(r"transfer|partial|closed|connection|receiv|short|incomplete|"
                             r"truncat|remaining", re.I)
PARSE_REASON = re.compile(r"json|pars|invalid|malformed|syntax", re.I)
ENROLMENT_REASON = re.compile(r"enrol|unknown patient|not (a )?patient|no such patient", re.I)


def patients_of(k):
    return ["P%d%02d" % (k, i) for i in range(1, 11)]


def record(k, i):
    """The i-th record of site k: (resource, patient, authored, identifier or None)."""
    patient = patients_of(k)[i % 10]
    authored = "2026-11-%02dT%02d:%02d:00Z" % (20 + k, 8 + i // 60, i % 60)
    ident = None if i % NO_IDENT_EVERY == 3 else "s%d-r%03d" % (k, i)
    if i % 2 == 0:
        qr = phq9(patient, [(i + j) % 4 for j in range(9)], ident=ident, authored=authored)
    else:
        qr = gad7(patient, [(i + j) % 4 for j in range(7)], ident=ident)
        qr["authored"] = authored
    return qr, patient, authored, ident


def start_fixtures():
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fixture_sites.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        proc.kill()
        raise AssertionError("fixture_sites.py did not print its ports")
    ports = json.loads(proc.stdout.readline())
    return proc, ports


def stop_fixtures(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def get_json(port, path, timeout=10):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def proc_counts(pid):
    """Threads, and descriptors other than the store's database files: the store keeps a small,
    bounded pool of read connections that grows to what concurrency needed and stays (not a
    leak of the collection's)."""
    fds = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if not re.search(r"\.db(-wal|-shm)?$", target):
            fds += 1
    return (len(os.listdir("/proc/%d/task" % pid)), fds)


def describe_fds(pid):
    """fd -> target, with sockets resolved to their TCP endpoints (evidence for a leak report)."""
    inodes = {}
    for table in ("/proc/%d/net/tcp" % pid, "/proc/%d/net/tcp6" % pid):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, remote, inode = cols[1], cols[2], cols[9]

                    def addr(a):
                        host, port = a.split(":")
                        return "%s:%d" % (host, int(port, 16))
                    inodes[inode] = "tcp %s -> %s st=%s" % (addr(local), addr(remote), cols[3])
        except OSError:
            pass
    out = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m and m.group(1) in inodes:
            target += " " + inodes[m.group(1)]
        out[fd] = target
    return out


def thread_names(pid):
    names = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return sorted(names)


def parallel_map(fn, items, nthreads=8):
    results = [None] * len(items)
    errors = []
    lock = threading.Lock()
    cursor = [0]

    def run():
        while True:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(items):
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # re-raised below, on the test's thread
                errors.append(e)
                return
    threads = [threading.Thread(target=run) for _ in range(min(nthreads, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class Collect(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fixtures = None
        cls.sites = {}
        cls.sponsor = None
        cls.answers = []  # every sponsor answer (status, headers, body) for the credential check
        try:
            cls.set_up()
        except BaseException:
            cls.tear_down()
            raise

    @classmethod
    def set_up(cls):
        cls.fixtures, cls.ports = start_fixtures()
        # Five site instances and the sponsor, started at once (sanitizer builds start slowly).
        for k in GOOD:
            cls.sites[k] = Server()
        cls.sponsor = Server(("--collect-allow-http",
                              "--collect-max-in-flight", str(MAX_IN_FLIGHT),
                              "--collect-site-timeout-ms", "60000"))

        def boot(server):
            server.admin = server.token("--role", "admin")
            server.start()
        parallel_map(boot, list(cls.sites.values()) + [cls.sponsor])

        # Each site: its own trial T1 with its own patients at its own site "H", and its records.
        # Site 3 also has a patient the sponsor does not know (P399); site 4 a patient whose id
        # the sponsor has enrolled at another site (P101 is at S1): both must be refused there.
        cls.expected = {}   # k -> sorted [(patient, authored, identifier)]
        cls.creds = {}      # site id at the sponsor -> credential
        cls.extra = {3: "P399", 4: "P101"}

        def fill(k):
            site = cls.sites[k]
            patients = patients_of(k) + ([cls.extra[k]] if k in cls.extra else [])
            seed(site, site.admin, patients=patients, sites=("H",))
            # Site-scoped keys as credentials; site 5 hands out its admin key instead.
            cred = (make_key(site, site.admin, role="site", trial="T1", site="H") if k != 5
                    else site.admin)
            rows = []
            work = [record(k, i) for i in range(COUNTS[k])]
            if k in cls.extra:
                qr = phq9(cls.extra[k], [2] * 9, ident="s%d-bad-%s" % (k, cls.extra[k]),
                          authored="2026-11-27T09:00:00Z")
                work.append((qr, cls.extra[k], qr["authored"], qr["identifier"]["value"]))

            def post(item):
                qr, patient, authored, ident = item
                r = site.post_fhir(qr, site.admin)
                assert r.status == 201, (k, r.status, r.body[:300])
                return (patient, authored, ident)
            for row in parallel_map(post, work, nthreads=4):
                if row[0] != cls.extra.get(k):
                    rows.append(row)
            return k, cred, sorted(rows, key=str)
        for k, cred, rows in parallel_map(fill, GOOD, nthreads=5):
            cls.expected[k] = rows
            cls.creds["S%d" % k] = cred
        for site_id in BAD:
            cls.creds[site_id] = "fixture-credential-%s-%s" % (site_id, os.urandom(8).hex())

        # The sponsor: S1..S5 created first without a FHIR server (then PUT: an update), the
        # broken ones created by PUT, S13 a site with no FHIR server at all.
        s = cls.sponsor
        seed(s, s.admin, patients=(), sites=["S%d" % k for k in GOOD] + ["S13"])
        cls.put_status = {}
        for k in GOOD:
            r = cls.put_site("S%d" % k, "http://127.0.0.1:%d/fhir" % cls.sites[k].port)
            cls.put_status["S%d" % k] = r.status
        for site_id, name in BAD.items():
            r = cls.put_site(site_id, "http://127.0.0.1:%d/fhir" % cls.ports[name])
            cls.put_status[site_id] = r.status
        for k in GOOD:
            for p in patients_of(k):
                r = cls.call("POST", "/v1/trials/T1/patients",
                             {"id": p, "site": "S%d" % k, "arm": "A",
                              "enrolled_on": "2026-11-01"}, key=s.admin)
                assert r.status == 201, (r.status, r.body)
        cls.investigator = make_key(s, s.admin, role="investigator", trial="T1")
        cls.patient_key = make_key(s, s.admin, role="patient", trial="T1", patient="P101")
        r = cls.call("POST", "/v1/trials", {"id": "T2", "name": "Other", "arms": ["X"],
                                            "schedule_weeks": [0]}, key=s.admin)
        assert r.status == 201, r.body
        cls.other_investigator = make_key(s, s.admin, role="investigator", trial="T2")
        # One of site 2's records reached the sponsor directly already (same identifier): the
        # collected copy is a duplicate.
        qr, patient, authored, ident = record(2, 0)
        assert ident is not None
        r = s.post_fhir(qr, s.admin)
        assert r.status == 201, r.body

        # Baseline for the leak check: the sponsor at rest, before any collection.
        cls.baseline = cls.settled_counts()

        # The main collection: every site with a FHIR URL, by an investigator of the trial.
        cls.t_start = time.monotonic()
        r = cls.call("POST", "/v1/trials/T1/collections?timeout=%ds" % DEADLINE_S,
                     key=cls.investigator)
        assert r.status == 202, (r.status, r.body)
        cls.main_post = r
        cls.main_id = r.json()["id"]
        cls.main, cls.main_elapsed, cls.last_running = cls.wait_done(
            cls.main_id, DEADLINE_S + 30, cls.t_start)
        cls.fixture_stats_after_main = get_json(cls.ports["control"], "/stats")
        sys.stderr.write("main collection after %.2f s:\n%s\n" % (
            cls.main_elapsed, json.dumps(cls.summary(cls.main), indent=1)))

    @classmethod
    def tearDownClass(cls):
        cls.tear_down()

    @classmethod
    def tear_down(cls):
        problems = []
        if cls.sponsor is not None:
            rc = cls.sponsor.stop()
            log = cls.sponsor.read_log()
            if rc != 0:
                problems.append("sponsor exit code %s:\n%s" % (rc, log[-4000:]))
            for marker in ("Sanitizer", "runtime error"):
                if marker in log:
                    problems.append("sponsor log:\n" + log[-6000:])
            cls.sponsor.cleanup()
        for k, site in cls.sites.items():
            rc = site.stop()
            log = site.read_log()
            if rc != 0 or "Sanitizer" in log or "runtime error" in log:
                problems.append("site %d exit code %s:\n%s" % (k, rc, log[-3000:]))
            site.cleanup()
        if cls.fixtures is not None:
            rc = stop_fixtures(cls.fixtures)
            if rc != 0:
                problems.append("fixture_sites.py exit code %s" % rc)
        assert not problems, "\n".join(problems)

    # ---- helpers ------------------------------------------------------------------------------

    @classmethod
    def call(cls, method, path, body=None, key=None, timeout=30):
        r = cls.sponsor.request(method, path, body, key=key, timeout=timeout)
        cls.answers.append((method, path, r))
        return r

    @classmethod
    def put_site(cls, site_id, url, credential=None, key=None):
        return cls.call("PUT", "/v1/trials/T1/sites/" + site_id,
                        {"name": "Site " + site_id, "fhir_base_url": url,
                         "credential": credential or cls.creds[site_id]},
                        key=key or cls.sponsor.admin)

    @classmethod
    def get_collection(cls, cid, key=None):
        r = cls.call("GET", "/v1/collections/" + cid, key=key or cls.investigator)
        assert r.status == 200, (r.status, r.body)
        return r.json()

    @classmethod
    def wait_done(cls, cid, limit_s, t_start):
        """Polls until the collection is no longer running: (final doc, seconds since t_start,
        last snapshot seen running)."""
        last_running = None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            doc = cls.get_collection(cid)
            if doc["state"] != "running":
                return doc, time.monotonic() - t_start, last_running
            last_running = (time.monotonic() - t_start, doc)
            time.sleep(0.1)
        raise AssertionError("collection %s still running after %d s: %s" % (
            cid, limit_s, json.dumps(cls.summary(doc))))

    @classmethod
    def settled_counts(cls, want=None, limit_s=1.0):
        """The sponsor's (threads, fds) once they stop moving (or drop to want)."""
        pid = cls.sponsor.proc.pid
        last = proc_counts(pid)
        stable_since = time.monotonic()
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = proc_counts(pid)
            if want is not None and now[0] <= want[0] and now[1] <= want[1]:
                return now
            if now != last:
                last, stable_since = now, time.monotonic()
            elif want is None and time.monotonic() - stable_since > 0.5:
                return now
        return last

    @staticmethod
    def summary(doc):
        """The doc with long reason lists cut, for messages."""
        out = dict(doc)
        out["sites"] = [dict(s, reasons=s.get("reasons", [])[:3] + (
            ["... %d more" % (len(s["reasons"]) - 3)] if len(s.get("reasons", [])) > 3 else []))
            for s in doc.get("sites", [])]
        return out

    @staticmethod
    def site_row(doc, site_id):
        rows = [s for s in doc["sites"] if s["site"] == site_id]
        assert len(rows) == 1, (site_id, [s["site"] for s in doc["sites"]])
        return rows[0]

    def sponsor_rows(self):
        con = sqlite3.connect("file:%s?mode=ro" % self.sponsor.db_path, uri=True, timeout=30)
        try:
            return con.execute("SELECT site_id, patient_id, authored, identifier_value,"
                               " processing, score FROM questionnaire_responses").fetchall()
        finally:
            con.close()

    def assert_site(self, doc, site_id, state, received, accepted, duplicates, rejected):
        row = self.site_row(doc, site_id)
        got = {k: row.get(k) for k in ("state", "received", "accepted", "duplicates", "rejected")}
        want = {"state": state, "received": received, "accepted": accepted,
                "duplicates": duplicates, "rejected": rejected}
        self.assertEqual(got, want, "%s: %s" % (site_id, json.dumps(row)[:1500]))
        return row

    def run_collection(self, query, key=None, limit_s=60):
        t0 = time.monotonic()
        r = self.call("POST", "/v1/trials/T1/collections" + query, key=key or self.investigator)
        self.assertEqual(r.status, 202, r.body)
        doc, elapsed, _ = self.wait_done(r.json()["id"], limit_s, t0)
        return doc, elapsed

    # ---- the sites themselves (so that a failure below is not blamed on the collector) -------

    def test_a_site_instances_answer_the_search(self):
        for k in GOOD:
            site = self.sites[k]
            r = site.request("GET", "/fhir/QuestionnaireResponse?_count=1000",
                             key=self.creds["S%d" % k])
            self.assertEqual(r.status, 200, (k, r.body[:300]))
            bundle = r.json()
            self.assertEqual(bundle["type"], "searchset")
            self.assertEqual(bundle["total"], COUNTS[k] + (1 if k in self.extra else 0), k)

    # ---- the main collection ------------------------------------------------------------------

    def test_b_put_site_created_201_updated_200(self):
        for site_id in ["S%d" % k for k in GOOD]:
            self.assertEqual(self.put_status[site_id], 200, "PUT of an existing site: updated")
        for site_id in BAD:
            self.assertEqual(self.put_status[site_id], 201, "PUT of a new site: created")

    def test_b_answers_and_shape(self):
        self.assertEqual(self.main_post.header("Location"), "/v1/collections/" + self.main_id)
        doc = self.main
        self.assertEqual(doc["id"], self.main_id)
        self.assertEqual(doc["trial"], "T1")
        self.assertEqual(doc["state"], "done", json.dumps(self.summary(doc)))
        # Every site with a FHIR URL, and only those (S13 has none).
        self.assertEqual(sorted(s["site"] for s in doc["sites"]),
                         sorted(["S%d" % k for k in GOOD] + list(BAD)))
        for row in doc["sites"]:
            for field in ("site", "state", "received", "accepted", "duplicates", "rejected",
                          "reasons", "http_status", "duration_ms", "pages"):
                self.assertIn(field, row, row["site"])
            self.assertIsInstance(row["reasons"], list)
            self.assertLessEqual(row["accepted"] + row["duplicates"] + row["rejected"],
                                 row["received"], row)

    def test_c_good_sites_every_record_exactly_once(self):
        doc = self.main
        page = self.page_size()
        for k in GOOD:
            n = COUNTS[k]
            dup = 1 if k == 2 else 0
            rejected = 1 if k in self.extra else 0
            row = self.assert_site(doc, "S%d" % k, "done", n + rejected, n - dup, dup, rejected)
            self.assertEqual(row["http_status"], 200, row)
            if page:
                self.assertGreaterEqual(row["pages"], math.ceil((n + rejected) / page), row)
        # The sponsor's stored rows: exactly the sites' valid records, each once, at its site.
        stored = {}
        for site_id, patient, authored, ident, _, _ in self.sponsor_rows():
            stored.setdefault(site_id, []).append((patient, authored, ident))
        for k in GOOD:
            self.assertEqual(sorted(stored.pop("S%d" % k, []), key=str), self.expected[k],
                             "site S%d" % k)
        self.assertEqual(stored, {}, "rows stored for sites that had nothing valid")

    def test_c_collected_rows_are_scored(self):
        deadline = time.monotonic() + 30
        while True:
            rows = self.sponsor_rows()
            pending = [r for r in rows if r[4] != "scored" or r[5] is None]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(pending, [], "collected rows not scored like posted ones")

    def test_d_records_the_sponsor_must_refuse_are_rejected_with_reason(self):
        for k, patient in self.extra.items():
            row = self.site_row(self.main, "S%d" % k)
            self.assertEqual(row["rejected"], 1, row)
            self.assertEqual(row["state"], "done", row)  # and the rest still came in
            text = " ".join(row["reasons"])
            self.assertTrue(ENROLMENT_REASON.search(text) or patient in text, row["reasons"])
        self.assertNotIn("s3-bad-P399", json.dumps(self.main))

    def test_e_hang_is_timed_out_by_the_collection_deadline(self):
        row = self.site_row(self.main, "S6")
        self.assertEqual(row["state"], "timed_out", row)
        self.assertEqual((row["received"], row["accepted"]), (0, 0), row)
        # It could only end by the collection's deadline (the site timeout is 60 s): the
        # collection ran to it, and not much longer.
        self.assertGreaterEqual(self.main_elapsed, DEADLINE_S - 0.5)
        self.assertLessEqual(self.main_elapsed, DEADLINE_S + 2,
                             "the collection outlived its deadline by more than 2 s")
        self.assertGreaterEqual(row["duration_ms"], (DEADLINE_S - 1) * 1000, row)
        # Its connection was closed, not left open.
        stats = get_json(self.ports["control"], "/stats")["sites"]["hang"]
        self.assertGreaterEqual(stats["requests"], 1)
        self.assertEqual(stats["open"], 0, stats)

    def test_e_error500_is_failed_with_its_status(self):
        row = self.assert_site(self.main, "S7", "failed", 0, 0, 0, 0)
        self.assertEqual(row["http_status"], 500, row)
        self.assertTrue(row["reasons"], row)

    def test_e_dropped_connection_is_failed_with_a_transfer_reason(self):
        row = self.assert_site(self.main, "S8", "failed", 0, 0, 0, 0)
        self.assertTrue(TRANSFER_REASON.search(" ".join(row["reasons"])), row)

    def test_e_invalid_json_is_failed_with_a_parse_reason(self):
        row = self.assert_site(self.main, "S9", "failed", 0, 0, 0, 0)
        self.assertTrue(PARSE_REASON.search(" ".join(row["reasons"])), row)
        self.assertEqual(row["http_status"], 200, row)

    def test_e_page_forever_is_stopped_and_its_entries_rejected(self):
        row = self.site_row(self.main, "S10")
        self.assertIn(row["state"], ("timed_out", "failed"), row)
        self.assertGreaterEqual(row["pages"], 2, "next links were not followed: %s" % row)
        served = self.fixture_stats_after_main["sites"]["forever"]["pages"]
        self.assertLessEqual(row["pages"], served, row)
        self.assertEqual(row["accepted"], 0, row)
        self.assertGreaterEqual(row["rejected"], 1, row)
        self.assertGreaterEqual(row["received"], row["rejected"], row)
        text = " ".join(row["reasons"])
        self.assertTrue(ENROLMENT_REASON.search(text) or UNKNOWN_PATIENT in text, row["reasons"])
        # Nothing of the resource but the pseudonymous id.
        self.assertNotIn(SECRET_ANSWER, json.dumps(self.main))
        self.assertNotIn("forever-", json.dumps(self.main))

    def test_e_slow_site_is_waited_for(self):
        row = self.assert_site(self.main, "S11", "done", 0, 0, 0, 0)
        self.assertGreaterEqual(row["duration_ms"], 1900, row)
        self.assertEqual(row["pages"], 1, row)

    def test_e_next_link_to_another_host_is_not_followed(self):
        trap = get_json(self.ports["control"], "/stats")["sites"]["trap"]
        self.assertEqual(trap["requests"], 0, "followed a next link to another host: %s" % trap)
        row = self.site_row(self.main, "S12")
        self.assertIn(row["state"], ("failed", "done"), row)
        if row["state"] == "failed":
            self.assertTrue(row["reasons"], row)

    def test_f_broken_sites_affect_only_their_own_row(self):
        self.assertIsNotNone(self.last_running, "never seen running")
        at, doc = self.last_running
        # Just before the deadline, with the hanging site still open, the good sites and the
        # slow one were done with their final counts.
        self.assertGreater(at, DEADLINE_S - 2, "the collection ended early")
        for site_id in ["S%d" % k for k in GOOD] + ["S11"]:
            row = self.site_row(doc, site_id)
            self.assertEqual(row, self.site_row(self.main, site_id), site_id)
        self.assertIn(self.site_row(doc, "S6")["state"], ("fetching", "pending"))

    def test_f_credentials_sent_to_their_own_site_only(self):
        stats = self.fixture_stats_after_main
        for site_id, name in BAD.items():
            seen = set(stats["sites"][name]["auth"])
            self.assertEqual(seen, {"Bearer " + self.creds[site_id]}, name)
        paths = stats["sites"]["error500"]["paths"]
        self.assertTrue(paths and paths[0].startswith("/fhir/QuestionnaireResponse?"), paths)
        self.assertIn("_count=", paths[0])
        self.assertNotIn("_lastUpdated", paths[0], "no since given")
        self.assertLessEqual(stats["peak_in_flight"], MAX_IN_FLIGHT,
                             "more sites fetched at once than --collect-max-in-flight")

    # ---- more collections ---------------------------------------------------------------------

    def test_g_second_collection_brings_only_duplicates(self):
        before = self.sponsor_rows()
        doc, _ = self.run_collection("?sites=S1,S2,S3,S4,S5&timeout=60s")
        self.assertEqual(doc["state"], "done", json.dumps(self.summary(doc)))
        self.assertEqual(sorted(s["site"] for s in doc["sites"]), ["S1", "S2", "S3", "S4", "S5"])
        for k in GOOD:
            rejected = 1 if k in self.extra else 0
            self.assert_site(doc, "S%d" % k, "done", COUNTS[k] + rejected, 0, COUNTS[k],
                             rejected)
        self.assertEqual(sorted(self.sponsor_rows(), key=str), sorted(before, key=str))

    def test_h_since_brings_only_what_is_newer(self):
        # Records posted at site 2 strictly after `since` (whole seconds apart, whatever the
        # precision of meta.lastUpdated).
        time.sleep(1.05 - (time.time() % 1))
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        time.sleep(1.1)
        site = self.sites[2]
        new = []
        for i in range(3):
            qr = phq9("P203", [1] * 9, ident="s2-new-%d" % i, authored="2026-11-28T10:0%d:00Z" % i)
            r = site.post_fhir(qr, site.admin)
            self.assertEqual(r.status, 201, r.body)
            new.append(("P203", qr["authored"], "s2-new-%d" % i))
        direct = site.request("GET", "/fhir/QuestionnaireResponse?_lastUpdated=gt" + since,
                              key=self.creds["S2"])
        self.assertEqual(direct.status, 200, direct.body[:300])
        self.assertEqual(direct.json().get("total"), 3, "the site's own search (not the collector)")
        doc, _ = self.run_collection("?since=%s&sites=S2&timeout=60s" % urllib.parse.quote(since))
        self.assertEqual([s["site"] for s in doc["sites"]], ["S2"])
        self.assert_site(doc, "S2", "done", 3, 3, 0, 0)
        stored = sorted((p, a, i) for s, p, a, i, _, _ in self.sponsor_rows()
                        if s == "S2" and i and i.startswith("s2-new-"))
        self.assertEqual(stored, sorted(new))
        paths = get_json(self.ports["control"], "/stats")["sites"]["error500"]["paths"]
        self.assertEqual(len(paths), 1, "S7 was not asked for: %s" % paths)

    def test_i_cancel_stops_at_once(self):
        hang0 = get_json(self.ports["control"], "/stats")["sites"]["hang"]["requests"]
        t0 = time.monotonic()
        r = self.call("POST", "/v1/trials/T1/collections?sites=S6,S1&timeout=60s",
                      key=self.investigator)
        self.assertEqual(r.status, 202, r.body)
        cid = r.json()["id"]
        # Wait until the collection waits on the hanging site.
        while True:
            hang = get_json(self.ports["control"], "/stats")["sites"]["hang"]
            if hang["requests"] > hang0 and hang["open"] >= 1:
                break
            self.assertLess(time.monotonic() - t0, 20, "the hanging site was never asked")
            time.sleep(0.02)
        self.assertEqual(self.get_collection(cid)["state"], "running")
        t_cancel = time.monotonic()
        r = self.call("DELETE", "/v1/collections/" + cid, key=self.investigator)
        self.assertEqual(r.status, 202, r.body)
        doc, elapsed, _ = self.wait_done(cid, 10, t_cancel)
        self.assertEqual(doc["state"], "canceled", json.dumps(self.summary(doc)))
        self.assertLessEqual(elapsed, 1.0, "cancel took %.3f s" % elapsed)
        self.assertEqual(self.site_row(doc, "S6")["state"], "canceled")
        # The transfer itself was aborted: the hanging site sees its connection closed.
        deadline = time.monotonic() + 1.0
        while get_json(self.ports["control"], "/stats")["sites"]["hang"]["open"] != 0:
            self.assertLess(time.monotonic(), deadline, "the hanging connection stays open")
            time.sleep(0.02)
        self.assertEqual(self.call("DELETE", "/v1/collections/nope",
                                   key=self.investigator).status, 404)

    def test_i_too_many_running_is_503_and_all_cancel(self):
        # Collections that can only wait on the hanging site, until the collector refuses one.
        ids, refused = [], None
        for _ in range(64):
            r = self.call("POST", "/v1/trials/T1/collections?sites=S6&timeout=60s",
                          key=self.investigator)
            if r.status != 202:
                refused = r
                break
            ids.append(r.json()["id"])
        try:
            self.assertIsNotNone(refused, "64 collections running at once, none refused")
            self.assertEqual(refused.status, 503, refused.body)
            self.assertTrue(refused.header("Retry-After"), refused.headers)
            self.assertGreaterEqual(len(ids), 1)
        finally:
            t0 = time.monotonic()
            for cid in ids:
                self.call("DELETE", "/v1/collections/" + cid, key=self.investigator)
            for cid in ids:
                doc, _, _ = self.wait_done(cid, 10, t0)
                self.assertEqual(doc["state"], "canceled", cid)
        self.assertLessEqual(time.monotonic() - t0, 3.0, "cancelling them all took too long")
        deadline = time.monotonic() + 2.0
        while get_json(self.ports["control"], "/stats")["sites"]["hang"]["open"] != 0:
            self.assertLess(time.monotonic(), deadline, "hanging connections stay open")
            time.sleep(0.02)

    def test_j_errors_and_scope(self):
        s = self.sponsor
        secret = "cred-" + os.urandom(8).hex()
        self.creds["rejected-put"] = secret
        # Only admins configure sites; bad URLs are refused without quoting the credential.
        self.assertEqual(self.put_site("S6", "http://127.0.0.1:1/fhir", secret,
                                       key=self.investigator).status, 403)
        r = self.put_site("S14", "ftp://127.0.0.1/fhir", secret)
        self.assertIn(r.status, (400, 422), r.body)
        r = self.call("PUT", "/v1/trials/NOPE/sites/S1",
                      {"name": "x", "fhir_base_url": "http://127.0.0.1:1/fhir",
                       "credential": secret}, key=s.admin)
        self.assertEqual(r.status, 404, r.body)
        post = "/v1/trials/T1/collections"
        self.assertEqual(self.call("POST", "/v1/trials/NOPE/collections",
                                   key=s.admin).status, 404)
        self.assertEqual(self.call("POST", post + "?sites=S99", key=s.admin).status, 404)
        self.assertEqual(self.call("POST", post + "?sites=S13", key=s.admin).status, 400)
        self.assertEqual(self.call("POST", post + "?since=yesterday", key=s.admin).status, 400)
        self.assertEqual(self.call("POST", post + "?timeout=soon", key=s.admin).status, 400)
        self.assertEqual(self.call("POST", post, key=self.patient_key).status, 403)
        self.assertEqual(self.call("POST", post, key=self.other_investigator).status, 403)
        self.assertEqual(self.call("POST", post).status, 401)
        self.assertEqual(self.call("GET", "/v1/collections/nope", key=s.admin).status, 404)
        self.assertIn(self.call("GET", "/v1/collections/" + self.main_id,
                                key=self.other_investigator).status, (403, 404))
        self.assertIn(self.call("DELETE", "/v1/collections/" + self.main_id,
                                key=self.other_investigator).status, (403, 404))
        self.assertEqual(self.call("GET", "/v1/collections/" + self.main_id,
                                   key=s.admin).status, 200)

    # ---- after everything ---------------------------------------------------------------------

    def test_y_credentials_never_shown(self):
        self.call("GET", "/v1/trials", key=self.sponsor.admin)
        self.call("GET", "/metrics")
        log = self.sponsor.read_log()
        for site_id, cred in self.creds.items():
            self.assertNotIn(cred, log, "credential of %s in the sponsor's log" % site_id)
            for method, path, r in self.answers:
                text = r.body.decode("utf-8", "replace") + json.dumps(r.headers)
                self.assertNotIn(cred, text, "credential of %s in the answer to %s %s" % (
                    site_id, method, path))
        self.assertNotIn(SECRET_ANSWER, log)

    def test_z_no_thread_or_descriptor_left(self):
        # Every collection has ended (the cancelled one included); give workers time to exit.
        threads, fds = self.settled_counts(want=self.baseline, limit_s=10)
        pid = self.sponsor.proc.pid
        self.assertLessEqual(threads, self.baseline[0], "threads %d -> %d: %s" % (
            self.baseline[0], threads, thread_names(pid)))
        self.assertLessEqual(fds, self.baseline[1], "fds %d -> %d: %s" % (
            self.baseline[1], fds, json.dumps(describe_fds(pid), indent=1)))

    # ---- -------------------------------------------------------------------------------------

    @classmethod
    def page_size(cls):
        """The _count the collector asks for (seen by a fixture), or None."""
        paths = cls.fixture_stats_after_main["sites"]["error500"]["paths"]
        if not paths:
            return None
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(paths[0]).query)
        try:
            return int(q["_count"][0])
        except (KeyError, ValueError):
            return None


if __name__ == "__main__":
    unittest.main()
