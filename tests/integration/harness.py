"""Integration-test harness: starts the real trialhub binary on a free loopback port with its own
temporary SQLite file, and speaks HTTP to it. Used by every tests/integration/test_*.py.

The binary comes from TRIALHUB_BIN (set by CTest to the build's binary, so the sanitizer builds
test their own). Servers are stopped by pid, never by name.
"""
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
BIN = os.environ.get("TRIALHUB_BIN", os.path.join(HERE, "..", "..", "build", "trialhub"))

PHQ9_ITEMS = ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5",
              "44253-3", "44260-8"]
GAD7_ITEMS = ["69725-0", "68509-9", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7"]
ANSWERS = ["LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phq9(patient, scores, ident=None, authored="2026-11-20T10:00:00+01:00", week=None,
         canonical="http://loinc.org/q/44249-1"):
    """A PHQ-9 QuestionnaireResponse with the given nine item scores (0-3)."""
    items = [{"linkId": link, "answer": [{"valueCoding": {
        "system": "http://loinc.org", "code": ANSWERS[s], "display": "answer"}}]}
        for link, s in zip(PHQ9_ITEMS, scores)]
    qr = {"resourceType": "QuestionnaireResponse", "status": "completed",
          "questionnaire": canonical, "subject": {"reference": "Patient/" + patient},
          "authored": authored, "item": items}
    if ident is not None:
        qr["identifier"] = {"system": "https://app.example.org/submission", "value": ident}
    if week is not None:
        qr["extension"] = [{"url": "https://trialhub.dev/fhir/StructureDefinition/visit-week",
                            "valueInteger": week}]
    return qr


def gad7(patient, scores, ident=None):
    items = [{"linkId": link, "answer": [{"valueCoding": {
        "system": "http://loinc.org", "code": ANSWERS[s]}}]} for link, s in zip(GAD7_ITEMS, scores)]
    qr = {"resourceType": "QuestionnaireResponse", "status": "completed",
          "questionnaire": "http://loinc.org/q/69737-5",
          "subject": {"reference": "Patient/" + patient},
          "authored": "2026-11-20T10:00:00Z", "item": items}
    if ident is not None:
        qr["identifier"] = {"system": "https://app.example.org/submission", "value": ident}
    return qr


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class Server:
    """One trialhub process with its own database folder."""

    def __init__(self, extra_args=(), env=None, workdir=None):
        self.dir = workdir or tempfile.mkdtemp(prefix="trialhub-test-")
        self.db_path = os.path.join(self.dir, "trialhub.db")
        self.db_url = "sqlite://" + self.db_path
        self.extra_args = list(extra_args)
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.env["TRIALHUB_DATABASE_URL"] = self.db_url
        self.proc = None
        self.port = None
        self.log_path = os.path.join(self.dir, "server.log")

    def token(self, *args):
        out = subprocess.run([BIN, "token", "create", *args], env=self.env, check=True,
                             capture_output=True, text=True, timeout=60)
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 1, out.stdout
        return lines[0]

    def start(self, wait=True):
        self.port = free_port()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:%d" % self.port, *self.extra_args],
            env=self.env, stdout=self.log, stderr=self.log)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited with %s:\n%s" % (self.proc.returncode,
                                                                      self.read_log()))
            try:
                if self.request("GET", "/healthz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not come up:\n" + self.read_log())

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def request(self, method, path, body=None, headers=None, key=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if key:
                hdrs["Authorization"] = "Bearer " + key
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return Response(r.status, r.getheaders(), r.read())
        finally:
            conn.close()

    def post_fhir(self, qr, key, headers=None):
        h = {"Content-Type": "application/fhir+json"}
        h.update(headers or {})
        body = qr if isinstance(qr, bytes) else json.dumps(qr).encode()
        return self.request("POST", "/fhir/QuestionnaireResponse", body=body, headers=h, key=key)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Stops the server by pid and returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        self.proc = None
        return rc

    def db(self):
        return sqlite3.connect(self.db_path, timeout=30)

    def cleanup(self):
        if self.proc is not None:
            self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def seed(server, admin, patients=("P001", "P002", "P003"), sites=("S1", "S2")):
    """Creates trial T1 with sites and patients (P001 at S1, P002 at S2, P003 at S1)."""
    r = server.request("POST", "/v1/trials", {"id": "T1", "name": "Trial one", "arms": ["A", "B"],
                                              "schedule_weeks": [0, 2, 4, 8, 12]}, key=admin)
    assert r.status == 201, (r.status, r.body)
    for s in sites:
        r = server.request("POST", "/v1/trials/T1/sites", {"id": s, "name": "Site " + s},
                           key=admin)
        assert r.status == 201, (r.status, r.body)
    for i, p in enumerate(patients):
        r = server.request("POST", "/v1/trials/T1/patients",
                           {"id": p, "site": sites[i % len(sites)], "arm": "A",
                            "enrolled_on": "2026-11-01"}, key=admin)
        assert r.status == 201, (r.status, r.body)


def make_key(server, admin, **scope):
    r = server.request("POST", "/v1/keys", scope, key=admin)
    assert r.status == 201, (r.status, r.body)
    return r.json()["key"]


class ServerTest(unittest.TestCase):
    """A test case with one seeded server for the whole class."""
    server_args = ()
    server_env = None

    @classmethod
    def setUpClass(cls):
        cls.server = Server(cls.server_args, cls.server_env)
        cls.admin = cls.server.token("--role", "admin")
        cls.server.start()
        seed(cls.server, cls.admin)

    @classmethod
    def tearDownClass(cls):
        rc = cls.server.stop()
        log = cls.server.read_log()
        cls.server.cleanup()
        assert rc == 0, "server exit code %s:\n%s" % (rc, log[-4000:])
        for marker in ("Sanitizer", "runtime error"):
            assert marker not in log, log[-4000:]


def parallel(n, fn):
    """Runs fn(i) on n threads at once and returns the results in order."""
    results = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
