"""Accepted means durable: SIGKILL the server in the middle of a burst of concurrent
submissions, restart it, and every submission that got 201 is there byte for byte; retrying all
of them creates no duplicate. Also: SIGTERM drains (exit 0, nothing acknowledged lost), and
scoring left pending by a full pool resumes after a restart."""
import json
import signal
import threading
import time
import unittest

from harness import Server, make_key, phq9, seed


class Durability(unittest.TestCase):
    def setUp(self):
        self.server = Server()
        self.admin = self.server.token("--role", "admin")
        self.server.start()
        seed(self.server, self.admin)
        self.key = make_key(self.server, self.admin, role="investigator", trial="T1")

    def tearDown(self):
        self.server.cleanup()

    def burst(self, nthreads, per_thread, stop_event, acked, prefix):
        def worker(t):
            conn_server = self.server
            for i in range(per_thread):
                if stop_event.is_set():
                    return
                body = json.dumps(phq9("P00%d" % (1 + (i % 3)), [(i + t) % 4] * 9,
                                       ident="%s-%d-%d" % (prefix, t, i))).encode()
                try:
                    r = conn_server.post_fhir(body, self.key)
                except OSError:
                    return
                if r.status == 201:
                    with lock:
                        acked[r.header("Location")] = body
        lock = threading.Lock()
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
        for t in threads:
            t.start()
        return threads

    def test_sigkill_mid_burst_loses_nothing_acknowledged(self):
        acked = {}
        stop = threading.Event()
        threads = self.burst(16, 400, stop, acked, "kill")
        time.sleep(1.5)
        self.server.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join()
        self.assertGreater(len(acked), 50, "the burst was too small to mean anything")

        self.server.start()
        with self.server.db() as db:
            for location, body in acked.items():
                rid = int(location.rsplit("/", 1)[1])
                row = db.execute("SELECT body FROM questionnaire_responses WHERE id = ?",
                                 (rid,)).fetchone()
                self.assertIsNotNone(row, location)
                self.assertEqual(bytes(row[0]), body)
            total = db.execute("SELECT count(*) FROM questionnaire_responses").fetchone()[0]
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
        self.assertEqual(check, "ok")
        # Retrying every acknowledged submission is answered with the same resource.
        for location, body in acked.items():
            r = self.server.post_fhir(body, self.key)
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(r.header("Location"), location)
        with self.server.db() as db:
            after = db.execute("SELECT count(*) FROM questionnaire_responses").fetchone()[0]
        self.assertEqual(after, total)
        self.assertEqual(self.server.stop(), 0)

    def test_sigterm_drains_and_exits_zero(self):
        acked = {}
        stop = threading.Event()
        threads = self.burst(8, 200, stop, acked, "term")
        time.sleep(1.0)
        rc = self.server.stop(signal.SIGTERM)
        stop.set()
        for t in threads:
            t.join()
        self.assertEqual(rc, 0, self.server.read_log()[-3000:])
        self.server.start()
        with self.server.db() as db:
            for location, body in acked.items():
                rid = int(location.rsplit("/", 1)[1])
                row = db.execute("SELECT body FROM questionnaire_responses WHERE id = ?",
                                 (rid,)).fetchone()
                self.assertEqual(bytes(row[0]), body)
        self.assertEqual(self.server.stop(), 0)


class PendingScoring(unittest.TestCase):
    def test_pending_rows_are_scored_after_restart(self):
        server = Server(["--pool-queue", "1", "--pool-threads", "1"])
        try:
            admin = server.token("--role", "admin")
            server.start()
            seed(server, admin)
            for i in range(60):
                r = server.post_fhir(phq9("P001", [1] * 9, ident="pend-%d" % i), admin)
                self.assertEqual(r.status, 201)
            self.assertEqual(server.stop(signal.SIGKILL), -signal.SIGKILL)
            server.start()
            deadline = time.time() + 30
            while time.time() < deadline:
                with server.db() as db:
                    pending = db.execute("SELECT count(*) FROM questionnaire_responses"
                                         " WHERE processing = 'pending'").fetchone()[0]
                if pending == 0:
                    break
                time.sleep(0.1)
            self.assertEqual(pending, 0)
            with server.db() as db:
                scores = {r[0] for r in db.execute("SELECT score FROM questionnaire_responses")}
            self.assertEqual(scores, {9})
            self.assertEqual(server.stop(), 0)
        finally:
            server.cleanup()


if __name__ == "__main__":
    unittest.main()
