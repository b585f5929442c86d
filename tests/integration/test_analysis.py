"""Asynchronous image analysis end to end: uploads over HTTP become tasks in the SQLite queue, and
`trialhub worker` processes (real processes, sharing the database and the blob folder) run real
analyzers on them. The test checks what the issue asks for:

- with every worker stopped (`serve --workers 0`) a burst of uploads is all accepted and queued,
  and two worker processes started afterwards drain it, each task analyzed once, on its own image;
- a worker killed with SIGKILL mid-task leaves a lease that expires, and another worker redoes the
  task: one result, from the second run; a worker frozen (SIGSTOP) past its lease wakes up while
  another redoes the task, and cannot write its stale result;
- an analyzer that hangs is killed at the task's deadline (SIGTERM, then SIGKILL when it ignores
  SIGTERM; its whole process group), the task is retried and ends dead, saying why;
- an analyzer printing garbage fails with that reason; one that says it cannot read the image is
  dead at once; an answer larger than one read of the pipe, all written before the analyzer exits,
  is read whole;
- DELETE stops a running analyzer within a second, and nothing is written after it;
- a webhook receiver that answers 500 twice gets exactly one accepted delivery, signed with the
  trial's secret, and nothing after it;
- refused uploads (not DICOM, too large, wrong type, unknown subject, patient key) leave nothing in
  the blob folder, and an Idempotency-Key names one task;
- no patient data (the images carry PatientName "Doe^Jane") in any log, and no process is left.

The analyzers are the binary's own `trialhub analyze` and fake_analyzer.py (a Python stand-in that
misbehaves on request, per image). Images are written at test time by
tests/data/dicom/make_images.py (pydicom and dcmtk's img2dcm/dcmodify) with Debian's
/usr/bin/python3 (TH_DICOM_PYTHON).

The test process makes itself a child subreaper (prctl), so that analyzers orphaned by a killed
worker are re-parented to it: it can see them, reap them, and check that nothing is left.
TH_TEST_KEEP=1 keeps each class's folder (logs, database, blobs, the fake analyzer's run records).
"""
import concurrent.futures
import ctypes
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

from harness import BIN, Response, Server, make_key, seed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
MAKE_IMAGES = os.path.join(ROOT, "tests", "data", "dicom", "make_images.py")
FAKE = os.path.join(HERE, "fake_analyzer.py")
DICOM_PYTHON = os.environ.get("TH_DICOM_PYTHON", "/usr/bin/python3")

# Uploads in the drain test (proof 1): 500 are sent in about 1.5 s and drained in 5-20 s by the
# plain build on 2 cores (2.5 s and about 26 s under TSan, where the whole file takes about 90 s).
# TH_TEST_ANALYSIS_UPLOADS overrides it.
UPLOADS = int(os.environ.get("TH_TEST_ANALYSIS_UPLOADS", "500"))
DRAIN_LIMIT_S = 240
CT = "ct_explicit_signed.dcm"  # 64 x 48, signed 16 bits, Rescale Intercept -1024, Doe^Jane
# What make_images.py writes into every image; none of it may reach a log.
PATIENT_DATA = ("Doe^Jane", "Jane", "PID-0042-SECRET", "19700101")
DEADLINE_REASON = re.compile(r"did not finish within 2 s and was killed")
SANITIZER_MARKERS = ("Sanitizer", "runtime error")

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


# ---- processes ---------------------------------------------------------------------------------

def proc_stat(pid):
    """(state, ppid, pgid) of pid, or None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def gone(pid):
    """Whether pid has ended and been reaped. A zombie re-parented to this process (an orphan
    that died) is reaped here; any other zombie is not gone: its parent has not reaped it."""
    st = proc_stat(pid)
    if st is None:
        return True
    if st[0] == "Z" and st[1] == os.getpid():
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return proc_stat(pid) is None
    return False


def wait_gone(pid, limit_s):
    """Seconds until pid is gone (polled every 10 ms), or None if it outlived limit_s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if gone(pid):
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


def adopted(exclude=()):
    """Processes whose parent is this process, other than exclude: orphans re-parented to us.
    Zombies among them are reaped and reported too (they were orphaned before they died)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        st = proc_stat(pid)
        if st is None or st[1] != os.getpid() or pid in exclude:
            continue
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            cmd = "?"
        out.append((pid, st[0], cmd))
        if st[0] == "Z":
            gone(pid)
    return out


class Worker:
    """One `trialhub worker` process on a server's database and blob folder."""

    def __init__(self, server, blobs_url, args, name):
        self.name = name
        self.log_path = os.path.join(server.dir, "worker-%s.log" % name)
        self.log = open(self.log_path, "ab")
        self.argv = [BIN, "worker", "--database", server.db_url, "--blobs", blobs_url, *args]
        self.proc = subprocess.Popen(self.argv, env=server.env, stdout=self.log,
                                     stderr=self.log)
        self.pid = self.proc.pid
        self.rc = None

    def wait_started(self, limit_s=60):
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if '"worker started"' in self.read_log():
                return
            if self.proc.poll() is not None:
                raise AssertionError("worker %s exited with %s:\n%s" % (
                    self.name, self.proc.returncode, self.read_log()[-3000:]))
            time.sleep(0.02)
        raise AssertionError("worker %s did not start:\n%s" % (self.name, self.read_log()))

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc is None:
            return self.rc
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig != signal.SIGKILL:
                self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.rc = self.proc.wait()
        self.log.close()
        self.proc = None
        return self.rc

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_lines(self, msg):
        out = []
        for line in self.read_log().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("msg") == msg:
                out.append(doc)
        return out


# ---- images ------------------------------------------------------------------------------------

def make_images(out):
    subprocess.run([DICOM_PYTHON, MAKE_IMAGES, out], check=True, capture_output=True,
                   timeout=120)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["patient"]["PatientName"] == PATIENT_DATA[0], manifest["patient"]
    return {e["file"]: e for e in manifest["files"]}


def read(path):
    with open(path, "rb") as f:
        return f.read()


def with_last_pixel(ct, stored):
    """The CT image with its last stored value replaced: a different image (and blob) whose
    mean moves by a known amount. Pixel Data is the file's last element (6144 bytes, no pad)."""
    return ct[:-2] + int(stored).to_bytes(2, "little", signed=True)


def make_big_dicom(path, rows=1024, columns=1024):
    """A valid 16-bit CT of rows x columns (2 MiB of pixels at the default size), by pydicom."""
    script = r"""
import sys
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
rows, cols, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
meta = FileMetaDataset()
meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242.77"
meta.TransferSyntaxUID = ExplicitVRLittleEndian
meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
ds = Dataset()
ds.file_meta = meta
ds.is_little_endian, ds.is_implicit_VR = True, False
ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
ds.Modality, ds.PatientName, ds.PatientID = "CT", "Doe^Jane", "PID-0042-SECRET"
ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
ds.PixelData = (np.arange(rows * cols) % 3000).astype("<i2").tobytes()
ds.save_as(path, write_like_original=False)
"""
    subprocess.run([DICOM_PYTHON, "-c", script, str(rows), str(columns), path], check=True,
                   capture_output=True, timeout=120)


def blob_path(body):
    """Where the file backend keeps a committed blob: ab/cd/<sha256 hex> of its bytes."""
    digest = hashlib.sha256(body).hexdigest()
    return os.path.join(digest[:2], digest[2:4], digest)


def blob_files(root):
    """Every file under the blob folder (committed blobs and temporary files), relative."""
    out = set()
    for folder, _, files in os.walk(root):
        for name in files:
            out.add(os.path.relpath(os.path.join(folder, name), root))
    return out


# ---- HTTP --------------------------------------------------------------------------------------

def upload(server, body, key, trial="T1", subject="P001", callback=None, idem=None,
           ctype="application/dicom", chunked=False, timeout=60):
    path = "/v1/analyses?trial=%s&subject=%s" % (trial, subject)
    if callback:
        path += "&callback_url=" + urllib.parse.quote(callback, safe="")
    headers = {}
    if ctype:
        headers["Content-Type"] = ctype
    if idem:
        headers["Idempotency-Key"] = idem
    if key:
        headers["Authorization"] = "Bearer " + key
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        try:
            if chunked:
                # A streamed body without Content-Length: its size shows as it arrives.
                chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
                conn.request("POST", path, body=chunks, headers=headers, encode_chunked=True)
            else:
                conn.request("POST", path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end of the body: the answer was sent before it
        r = conn.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


# ---- the webhook receiver ----------------------------------------------------------------------

class Receiver:
    """A webhook endpoint: records every POST, answers the planned statuses per path in turn
    (then 200)."""

    def __init__(self, plans):
        self.plans = {path: list(statuses) for path, statuses in plans.items()}
        self.deliveries = []  # (path, headers dict lower-cased, body bytes, status, time)
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with receiver.lock:
                    plan = receiver.plans.get(self.path, [])
                    status = plan.pop(0) if plan else 200
                    receiver.deliveries.append((self.path, {k.lower(): v for k, v in
                                                            self.headers.items()},
                                                body, status, time.time()))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def to(self, path):
        with self.lock:
            return [d for d in self.deliveries if d[0] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def signature_ok(secret, header, body):
    """Verifies X-Trialhub-Signature "t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>"."""
    m = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", header or "")
    if not m:
        return False
    mac = hmac.new(secret.encode(), m.group(1).encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, m.group(2))


# ---- shared set-up -----------------------------------------------------------------------------

class Env:
    """A server with its database, blob folder, images, workers, and the checks every class
    makes when it ends (exit codes, sanitizer reports, patient data in logs, processes left)."""

    def __init__(self, server_args):
        self.dir = tempfile.mkdtemp(prefix="trialhub-analysis-")
        self.blobs_dir = os.path.join(self.dir, "blobs")
        self.blobs_url = "file://" + self.blobs_dir
        self.images_dir = os.path.join(self.dir, "images")
        self.manifest = make_images(self.images_dir)
        self.server = Server(["--blobs", self.blobs_url, *server_args], workdir=self.dir)
        self.workers = []
        self.secrets = []
        try:
            self.admin = self.server.token("--role", "admin")
            self.server.start()
            seed(self.server, self.admin)
        except BaseException:
            self.server.cleanup()
            raise

    def image(self, name):
        return read(os.path.join(self.images_dir, name))

    def start_worker(self, *args, name=None):
        w = Worker(self.server, self.blobs_url, args, name or "w%d" % (len(self.workers) + 1))
        self.workers.append(w)
        w.wait_started()
        return w

    def logs(self):
        out = [("server", self.server.read_log())]
        out += [("worker " + w.name, w.read_log()) for w in self.workers]
        return out

    def close(self):
        problems = []
        for w in self.workers:
            if w.proc is not None:
                rc = w.stop()
                if rc != 0:
                    problems.append("worker %s exit code %s:\n%s" % (w.name, rc,
                                                                      w.read_log()[-3000:]))
        if self.server.proc is not None:
            rc = self.server.stop()
            if rc != 0:
                problems.append("server exit code %s:\n%s" % (rc, self.server.read_log()[-4000:]))
        for name, log in self.logs():
            for marker in SANITIZER_MARKERS:
                if marker in log:
                    problems.append("%s log:\n%s" % (name, log[-6000:]))
            for needle in PATIENT_DATA + tuple(self.secrets):
                if needle in log:
                    line = next(l for l in log.splitlines() if needle in l)
                    problems.append("%r in the %s log: %s" % (needle, name, line[:400]))
        left = adopted()
        if left:
            problems.append("processes left behind: %s" % left)
            for pid, state, _ in left:  # ours by adoption: end them, by pid
                if state != "Z":
                    os.kill(pid, signal.SIGKILL)
                    wait_gone(pid, 5)
        if os.environ.get("TH_TEST_KEEP"):  # logs, database and blobs, to look at
            sys.stderr.write("files kept in %s\n" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return problems


def task_rows(db_path, kind="analysis"):
    """id -> row of the tasks table, read through a read-only connection."""
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in conn.execute(
            "SELECT id, kind, state, attempts, max_attempts, lease_owner, last_error, payload, "
            "result FROM tasks WHERE kind = ?", (kind,))}
    finally:
        conn.close()


def state_counts(db_path, ids):
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=30)
    try:
        counts = {}
        for tid, state in conn.execute("SELECT id, state FROM tasks WHERE kind = 'analysis'"):
            if tid in ids:
                counts[state] = counts.get(state, 0) + 1
        return counts
    finally:
        conn.close()


# ---- proof 1: the queue holds a burst while no worker runs, and two processes drain it --------

class Drain(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = None
        cls.env = Env(["--workers", "0"])

    @classmethod
    def tearDownClass(cls):
        if cls.env is not None:
            problems = cls.env.close()
            assert not problems, "\n".join(problems)

    def test_burst_queued_with_workers_stopped_then_drained_by_two_processes(self):
        env, server = self.env, self.env.server
        site_key = make_key(server, env.admin, role="site", trial="T1", site="S2")  # P002 at S2
        ct = env.image(CT)
        stored0 = int.from_bytes(ct[-2:], "little", signed=True)
        mean0 = env.manifest[CT]["expected"]["mean"]
        pixels = env.manifest[CT]["expected"]["pixels"]
        bodies = [with_last_pixel(ct, i) for i in range(UPLOADS)]

        def post(i):
            return upload(server, bodies[i], site_key, subject="P002")

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(post, range(UPLOADS)))
        upload_s = time.monotonic() - t0
        bad = [(i, r.status, r.body[:200]) for i, r in enumerate(answers) if r.status != 202]
        self.assertEqual(bad, [], "uploads not accepted")
        ids = []
        for r in answers:
            doc = r.json()
            self.assertEqual(doc["state"], "queued", doc)
            self.assertEqual(r.header("Location"), "/v1/analyses/" + doc["id"])
            ids.append(doc["id"])
        self.assertEqual(len(set(ids)), UPLOADS, "two uploads got the same task")
        index = {tid: i for i, tid in enumerate(ids)}

        # Nothing runs them: the queue holds every one, queued, never leased.
        time.sleep(0.5)
        rows = task_rows(server.db_path)
        self.assertEqual(set(rows), set(ids), "the queue's analysis tasks are not the uploads")
        self.assertEqual({(r["state"], r["attempts"]) for r in rows.values()}, {("queued", 0)})
        for tid in ids[::max(1, UPLOADS // 25)]:
            r = server.request("GET", "/v1/analyses/" + tid, key=site_key)
            self.assertEqual(r.status, 200, r.body)
            doc = r.json()
            self.assertEqual((doc["id"], doc["state"], doc["attempts"], doc["trial"],
                              doc["subject"], doc["modality"]),
                             (tid, "queued", 0, "T1", "P002", "CT"), doc)
            self.assertNotIn("result", doc)
        # Every upload is its own committed blob; no temporary file is left.
        files = blob_files(env.blobs_dir)
        self.assertEqual(len(files), UPLOADS, sorted(files)[:5])
        self.assertFalse([f for f in files if f.startswith("tmp")], files)

        # Two worker processes with the real analyzer drain it.
        t1 = time.monotonic()
        w1 = env.start_worker("--log-level", "debug")
        w2 = env.start_worker("--log-level", "debug")
        want = set(ids)
        while True:
            counts = state_counts(server.db_path, want)
            if counts.get("succeeded", 0) == UPLOADS:
                break
            if counts.get("dead") or counts.get("failed"):
                errors = {r["last_error"] for r in task_rows(server.db_path).values()
                          if r["state"] in ("dead", "failed")}
                self.fail("tasks failed: %s %s" % (counts, errors))
            self.assertLess(time.monotonic() - t1, DRAIN_LIMIT_S,
                            "not drained in %d s: %s" % (DRAIN_LIMIT_S, counts))
            time.sleep(0.25)
        drain_s = time.monotonic() - t1
        sys.stderr.write("proof 1: %d uploads in %.1f s, drained by 2 workers in %.1f s\n" % (
            UPLOADS, upload_s, drain_s))

        # Each ran once, on its own image: the mean moves with the one pixel that differs.
        owners = set()
        for tid, row in task_rows(server.db_path).items():
            self.assertEqual((row["state"], row["attempts"]), ("succeeded", 1), row)
            result = json.loads(row["result"])
            self.assertEqual((result["task"], result["rows"], result["columns"],
                              result["modality"]), (tid, 48, 64, "CT"), result)
            want_mean = mean0 + (index[tid] - stored0) / pixels
            self.assertAlmostEqual(result["mean"], want_mean, places=9, msg=tid)
            owners.add(int(row["lease_owner"].split(":")[2]))
        self.assertEqual(owners, {w1.pid, w2.pid}, "both worker processes take tasks")
        done = [d["task"] for w in (w1, w2) for d in w.log_lines("analysis succeeded")]
        self.assertEqual(sorted(done), sorted(ids), "each task succeeded once in the logs")
        r = server.request("GET", "/v1/analyses/" + ids[0], key=site_key)
        self.assertEqual(r.json()["state"], "succeeded")
        self.assertEqual(r.json()["result"]["task"], ids[0])
        for w in (w1, w2):
            self.assertEqual(w.stop(), 0, w.read_log()[-3000:])


# ---- proofs 2-8: faults, cancel, webhooks, refusals, logs --------------------------------------

class Faults(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = None
        cls.receiver = None
        try:
            cls.set_up()
        except BaseException:
            cls.tear_down()
            raise

    @classmethod
    def set_up(cls):
        cls.env = Env(["--workers", "0", "--upload-max-mb", "1", "--webhook-allow-private",
                       "--log-level", "debug"])
        env = cls.env
        cls.server = env.server
        cls.runs = os.path.join(env.dir, "runs")
        os.makedirs(cls.runs)
        cls.modes = {}
        cls.write_modes()
        cls.ct = env.image(CT)
        cls.next_variant = 1000
        cls.investigator = make_key(cls.server, env.admin, role="investigator", trial="T1")
        cls.patient_key = make_key(cls.server, env.admin, role="patient", trial="T1",
                                   patient="P001")
        cls.other_site_key = make_key(cls.server, env.admin, role="site", trial="T1", site="S2")
        cls.receiver = Receiver({"/hook/retry": [500, 500]})
        r = cls.server.request("POST", "/v1/trials/T1/webhook-secret", key=cls.investigator)
        assert r.status == 201, (r.status, r.body)
        cls.secret = r.json()["secret"]
        env.secrets.append(cls.secret)

    @classmethod
    def tearDownClass(cls):
        cls.tear_down()

    @classmethod
    def tear_down(cls):
        problems = []
        if cls.env is not None:
            problems = cls.env.close()
            cls.env = None
        if cls.receiver is not None:
            cls.receiver.close()
            cls.receiver = None
        assert not problems, "\n".join(problems)

    def setUp(self):
        self.posted = []
        self.nworkers = len(self.env.workers)

    def tearDown(self):
        # A test that failed half-way leaves nothing for the next: its workers stop (their
        # analyzers with them) and its tasks that could still run are canceled.
        for w in self.env.workers[self.nworkers:]:
            if w.proc is not None:
                w.stop()
        for tid in self.posted:
            r = self.server.request("GET", "/v1/analyses/" + tid, key=self.investigator)
            if r.status == 200 and r.json()["state"] in ("queued", "running", "failed"):
                self.server.request("DELETE", "/v1/analyses/" + tid, key=self.investigator)

    # ---- helpers -------------------------------------------------------------------------------

    @classmethod
    def write_modes(cls):
        path = os.path.join(cls.runs, "modes.json")
        with open(path + ".tmp", "w") as f:
            json.dump(cls.modes, f)
        os.rename(path + ".tmp", path)

    def image(self, **mode):
        """A CT image no other test uploads, which fake_analyzer.py treats as mode says."""
        Faults.next_variant += 1
        body = with_last_pixel(self.ct, Faults.next_variant)
        if mode:
            self.modes[hashlib.sha256(body).hexdigest()] = mode
            self.write_modes()
        return body

    def fake_worker(self, *args):
        analyzer = "%s %s %s" % (sys.executable, FAKE, self.runs)
        return self.env.start_worker("--analyzer", analyzer, "--webhook-allow-private",
                                     "--log-level", "debug", *args)

    def post(self, body, **kw):
        r = upload(self.server, body, kw.pop("key", self.investigator), **kw)
        self.assertEqual(r.status, 202, r.body)
        self.posted.append(r.json()["id"])
        return r.json()["id"]

    def get(self, tid, key=None):
        r = self.server.request("GET", "/v1/analyses/" + tid, key=key or self.investigator)
        self.assertEqual(r.status, 200, r.body)
        return r.json()

    def wait_doc(self, tid, pred, limit_s, what):
        deadline = time.monotonic() + limit_s
        while True:
            doc = self.get(tid)
            if pred(doc):
                return doc
            self.assertLess(time.monotonic(), deadline, "%s: not within %d s: %s" % (
                what, limit_s, doc))
            time.sleep(0.05)

    def runs_of(self, tid):
        out = []
        for name in os.listdir(self.runs):
            if name.startswith(tid + ".") and name.endswith(".json"):
                with open(os.path.join(self.runs, name)) as f:
                    out.append(json.load(f))
        return sorted(out, key=lambda r: r["run"])

    def wait_runs(self, tid, n, limit_s=60):
        deadline = time.monotonic() + limit_s
        while True:
            runs = self.runs_of(tid)
            if len(runs) >= n:
                return runs
            self.assertLess(time.monotonic(), deadline, "analyzer run %d of %s never started"
                            % (n, tid))
            time.sleep(0.01)

    # ---- proof 2 -------------------------------------------------------------------------------

    def test_a_worker_killed_mid_task_the_task_is_redone_once(self):
        body = self.image(mode="slow", seconds=2.5)
        w1 = self.fake_worker("--workers", "1", "--lease", "2")
        tid = self.post(body)
        first = self.wait_runs(tid, 1)[0]
        self.assertEqual(first["ppid"], w1.pid)
        self.assertEqual(first["pgid"], first["pid"], "the analyzer has its own process group")
        doc = self.get(tid)
        self.assertEqual((doc["state"], doc["attempts"]), ("running", 1), doc)

        t_kill = time.time()
        self.assertEqual(w1.stop(signal.SIGKILL), -signal.SIGKILL)
        # Its analyzer dies with it (PR_SET_PDEATHSIG): no analyzer outlives its worker.
        took = wait_gone(first["pid"], 3)
        sys.stderr.write("proof 2: the SIGKILLed worker's analyzer (pid %d) was gone after %s s\n"
                         % (first["pid"], "%.2f" % took if took is not None else "> 3"))
        self.assertIsNotNone(took, "the orphaned analyzer survived its worker")

        w2 = self.fake_worker("--workers", "1", "--lease", "2")
        doc = self.wait_doc(tid, lambda d: d["state"] not in ("queued", "running"), 60,
                            "the task redone")
        self.assertEqual((doc["state"], doc["attempts"]), ("succeeded", 2), doc)
        runs = self.runs_of(tid)
        self.assertEqual([r["run"] for r in runs], [1, 2], runs)
        second = runs[1]
        self.assertEqual(second["ppid"], w2.pid)
        # The lease expired (2 s) and the new worker took it soon after.
        self.assertLess(second["start"] - t_kill, 8.0, "re-leased %.1f s after the kill"
                        % (second["start"] - t_kill))
        self.assertEqual(doc["result"], {"task": tid, "pid": second["pid"], "run": 2,
                                         "mode": "slow", "fake": True})
        done = [d for d in w2.log_lines("analysis succeeded") if d["task"] == tid]
        self.assertEqual([d["attempt"] for d in done], [2], done)
        self.assertFalse([d for d in w2.log_lines("analysis result not written")
                          if d["task"] == tid])
        self.assertEqual(self.get(tid), doc, "the result changed after it was written")
        self.assertEqual(w2.stop(), 0, w2.read_log()[-3000:])
        self.assertTrue(gone(second["pid"]))

    def test_a_worker_stalled_past_its_lease_cannot_overwrite_the_result(self):
        # A worker frozen (a paused VM, a stuck disk) while its analyzer runs on: its lease
        # expires, another worker takes the task, and the frozen one wakes up, with the first
        # run's complete answer in its pipe, while the second run is still going.
        body = self.image(mode="slow", seconds=3)
        w1 = self.fake_worker("--workers", "1", "--lease", "2")
        tid = self.post(body)
        first = self.wait_runs(tid, 1)[0]
        os.kill(w1.pid, signal.SIGSTOP)
        try:
            w2 = self.fake_worker("--workers", "1", "--lease", "2")
            second = self.wait_runs(tid, 2, 30)[1]
            self.assertEqual(second["ppid"], w2.pid)
            # The first run ends (a zombie of the frozen w1, its answer waiting in the pipe).
            deadline = time.monotonic() + 10
            while proc_stat(first["pid"])[0] != "Z":
                self.assertLess(time.monotonic(), deadline, "the first run did not end")
                time.sleep(0.02)
            doc = self.get(tid)
            self.assertEqual((doc["state"], doc["attempts"]), ("running", 2), doc)
        finally:
            os.kill(w1.pid, signal.SIGCONT)
        doc = self.wait_doc(tid, lambda d: d["state"] not in ("queued", "running"), 60,
                            "the task's end")
        self.assertEqual((doc["state"], doc["attempts"]), ("succeeded", 2), doc)
        self.assertEqual(doc["result"]["pid"], second["pid"], "the stale run's result won")
        deadline = time.monotonic() + 10
        while not [d for d in w1.log_lines("analysis lease lost; analyzer stopped") +
                   w1.log_lines("analysis result not written") if d["task"] == tid]:
            self.assertLess(time.monotonic(), deadline, "w1 never noticed: " + w1.read_log())
            time.sleep(0.05)
        self.assertEqual(self.get(tid), doc, "the result changed after it was written")
        for msg in ("analysis succeeded", "analysis attempt failed"):
            self.assertFalse([d for d in w1.log_lines(msg) if d["task"] == tid], msg)
        self.assertTrue(gone(first["pid"]), "w1 did not reap its analyzer")
        self.assertEqual(len(self.runs_of(tid)), 2)
        self.assertEqual(w1.stop(), 0, w1.read_log()[-3000:])
        self.assertEqual(w2.stop(), 0, w2.read_log()[-3000:])

    # ---- proof 3 -------------------------------------------------------------------------------

    def test_b_hanging_analyzer_is_killed_at_the_deadline_and_retried_until_dead(self):
        # The first run ignores SIGTERM (only SIGKILL after the grace period ends it); every run
        # starts a child in its process group, which must go with it.
        body = self.image(mode="hang", ignore_term_first=True, child=True)
        w = self.fake_worker("--workers", "1", "--task-timeout", "2")
        tid = self.post(body)
        k = 1
        while True:
            run = self.wait_runs(tid, k, 60)[k - 1]
            self.assertEqual(run["run"], k)
            self.assertEqual(run["ppid"], w.pid)
            doc = self.get(tid)
            self.assertEqual((doc["state"], doc["attempts"]), ("running", k), doc)
            if k > 1:
                self.assertRegex(doc.get("error", ""), DEADLINE_REASON, doc)
            self.assertIsNotNone(wait_gone(run["pid"], 15),
                                 "run %d: the hanging analyzer was never killed" % k)
            age = time.time() - run["start"]
            # Killed at the deadline (2 s from just before its start: its "start" is taken
            # after Python's start-up), plus the 2 s grace when it ignored SIGTERM.
            lo, hi = (3.0, 5.5) if k == 1 else (1.0, 3.5)
            self.assertGreaterEqual(age, lo, "run %d killed after %.2f s" % (k, age))
            self.assertLessEqual(age, hi, "run %d killed after %.2f s" % (k, age))
            self.assertIsNotNone(wait_gone(run["child"], 2), "run %d: its child survived" % k)
            doc = self.wait_doc(tid, lambda d: d["state"] != "running" or d["attempts"] > k,
                                10, "run %d's end recorded" % k)
            if doc["state"] == "dead":
                break
            self.assertIn(doc["state"], ("failed", "running"), doc)
            self.assertRegex(doc.get("error", ""), DEADLINE_REASON, doc)
            k += 1
            self.assertLessEqual(k, 10, "retried forever")
        max_attempts = task_rows(self.server.db_path)[tid]["max_attempts"]
        self.assertEqual(doc["attempts"], max_attempts, doc)
        self.assertEqual(k, max_attempts)
        self.assertRegex(doc["error"], DEADLINE_REASON, doc)
        self.assertNotIn("result", doc)
        failed = [d for d in w.log_lines("analysis attempt failed") if d["task"] == tid]
        self.assertEqual([d["attempt"] for d in failed], list(range(1, max_attempts + 1)))
        self.assertEqual(w.stop(), 0, w.read_log()[-3000:])

    # ---- proof 4 -------------------------------------------------------------------------------

    def test_c_analyzer_output_that_is_not_a_result_fails_with_the_reason(self):
        garbage = self.post(self.image(mode="garbage"))
        array = self.post(self.image(mode="array"))
        unreadable = self.post(self.image(mode="unreadable"))
        w = self.fake_worker("--workers", "2")
        for tid in (garbage, array):
            doc = self.wait_doc(tid, lambda d: "error" in d, 30, "the garbage's failure")
            self.assertIn("not a JSON object", doc["error"], doc)
            self.assertIn(doc["state"], ("failed", "running", "dead"), doc)
            self.assertNotIn("result", doc)
            # It would be retried: cancel it.
            r = self.server.request("DELETE", "/v1/analyses/" + tid, key=self.investigator)
            self.assertEqual(r.status, 202, r.body)
            doc = self.wait_doc(tid, lambda d: d["state"] == "canceled", 10, "canceled")
            self.assertIn("not a JSON object", doc.get("error", ""), doc)
        # "I cannot read this image" (exit 3) is not worth retrying.
        doc = self.wait_doc(unreadable, lambda d: d["state"] not in ("queued", "running"), 30,
                            "the unreadable image's end")
        self.assertEqual((doc["state"], doc["attempts"]), ("dead", 1), doc)
        self.assertIn("exited with code 3", doc["error"])
        # The analyzer's own message is not kept (it may quote the image's header): the exit
        # code is the reason.
        self.assertIn("exited with code 3", doc["error"])
        self.assertNotIn("fake: cannot read this image", doc["error"])
        self.assertEqual(len(self.runs_of(unreadable)), 1)
        self.assertEqual(w.stop(), 0, w.read_log()[-3000:])

    def test_c_whole_answer_is_read_when_the_analyzer_exits_right_after_writing_it(self):
        # An answer larger than one read of the pipe (16 KiB), all written, and the analyzer
        # gone, before the worker reads any of it: what a fast analyzer looks like to a worker
        # on a busy machine. Made certain by stopping the worker (SIGSTOP) while the analyzer
        # writes and exits. All below the 64 KiB a result may hold.
        w = self.fake_worker("--workers", "1")
        for n in (20000, 60000):
            go = "go-%d" % n
            tid = self.post(self.image(mode="big", bytes=n, go=go))
            run = self.wait_runs(tid, 1)[0]
            os.kill(w.pid, signal.SIGSTOP)
            try:
                open(os.path.join(self.runs, go), "w").close()
                deadline = time.monotonic() + 10
                while proc_stat(run["pid"])[0] != "Z":
                    self.assertLess(time.monotonic(), deadline, "the analyzer did not exit")
                    time.sleep(0.01)
            finally:
                os.kill(w.pid, signal.SIGCONT)
            doc = self.wait_doc(tid, lambda d: d["state"] not in ("queued", "running"), 30,
                                "the %d-byte answer" % n)
            self.assertEqual((doc["state"], doc["attempts"]), ("succeeded", 1),
                             "%d-byte answer: %s" % (n, doc))
            self.assertEqual(len(doc["result"]["padding"]), n)
        self.assertEqual(w.stop(), 0, w.read_log()[-3000:])

    # ---- proof 5 -------------------------------------------------------------------------------

    def test_d_cancel_stops_a_running_analyzer_within_a_second(self):
        body = self.image(mode="slow", seconds=60)
        w = self.fake_worker("--workers", "1")
        tid = self.post(body, callback=self.receiver.url("/hook/cancel"))
        run = self.wait_runs(tid, 1)[0]
        self.assertEqual(self.get(tid)["state"], "running")
        t0 = time.monotonic()
        r = self.server.request("DELETE", "/v1/analyses/" + tid, key=self.investigator)
        self.assertEqual(r.status, 202, r.body)
        self.assertEqual(r.json()["state"], "canceled", r.body)
        stopped = wait_gone(run["pid"], 10)
        self.assertIsNotNone(stopped, "the analyzer runs on after the cancel")
        stopped = time.monotonic() - t0
        sys.stderr.write("proof 5: analyzer gone %.3f s after DELETE\n" % stopped)
        self.assertLessEqual(stopped, 1.25, "the cancel took %.3f s to stop the analyzer"
                             % stopped)
        doc = self.get(tid)
        self.assertEqual(doc["state"], "canceled", doc)
        self.assertNotIn("result", doc)
        # Nothing is written after it, and a second DELETE changes nothing.
        time.sleep(1.0)
        self.assertEqual(self.get(tid), doc)
        r = self.server.request("DELETE", "/v1/analyses/" + tid, key=self.investigator)
        self.assertEqual(r.status, 202, r.body)
        self.assertEqual(self.get(tid)["state"], "canceled")
        stops = [d for d in w.log_lines("analysis canceled; analyzer stopped")
                 if d["task"] == tid]
        self.assertEqual(len(stops), 1, w.read_log()[-3000:])
        self.assertEqual(stops[0]["pid"], run["pid"])
        self.assertEqual(len(self.runs_of(tid)), 1, "a canceled task was run again")
        # The callback hears of it once (the API and the worker both queue it: one delivery).
        deadline = time.monotonic() + 20
        while not self.receiver.to("/hook/cancel"):
            self.assertLess(time.monotonic(), deadline, "no webhook for the cancel")
            time.sleep(0.05)
        path, headers, hook_body, status, _ = self.receiver.to("/hook/cancel")[0]
        self.assertTrue(signature_ok(self.secret, headers.get("x-trialhub-signature"),
                                     hook_body), headers)
        hook = json.loads(hook_body)
        self.assertEqual((hook["id"], hook["state"]), (tid, "canceled"), hook)
        self.assertEqual(w.stop(), 0, w.read_log()[-3000:])

    # ---- proof 6 -------------------------------------------------------------------------------

    def test_e_webhook_retried_after_500s_is_accepted_once_with_a_valid_signature(self):
        body = self.image()  # "ok"
        path = "/hook/retry"
        w = self.fake_worker("--workers", "1")
        tid = self.post(body, callback=self.receiver.url(path))
        doc = self.wait_doc(tid, lambda d: d["state"] == "succeeded", 30, "the analysis")
        deadline = time.monotonic() + 40  # two retries: at most 2 s + 4 s of backoff
        while not [d for d in self.receiver.to(path) if d[3] == 200]:
            self.assertLess(time.monotonic(), deadline, "never delivered: %s" % [
                d[3] for d in self.receiver.to(path)])
            time.sleep(0.05)
        time.sleep(4.0)  # nothing may follow the accepted delivery
        got = self.receiver.to(path)
        self.assertEqual([d[3] for d in got], [500, 500, 200], "deliveries")
        for _, headers, hook_body, _, at in got:
            self.assertEqual(headers.get("content-type"), "application/json")
            self.assertEqual(headers.get("x-trialhub-event"), "task.succeeded")
            sig = headers.get("x-trialhub-signature")
            self.assertTrue(signature_ok(self.secret, sig, hook_body), (sig, hook_body))
            self.assertFalse(signature_ok(self.secret + "x", sig, hook_body))
            self.assertFalse(signature_ok(self.secret, sig, hook_body + b" "))
            t = int(re.match(r"t=(\d+)", sig).group(1))
            self.assertLess(abs(t - at), 60, "signature time %d, received at %.0f" % (t, at))
        self.assertEqual(len({d[1].get("x-trialhub-delivery") for d in got}), 1,
                         "one delivery, retried")
        hook = json.loads(got[-1][2])
        self.assertEqual((hook["id"], hook["state"], hook["trial"], hook["subject"],
                          hook["attempts"]), (tid, "succeeded", "T1", "P001", 1), hook)
        self.assertEqual(hook["result"], doc["result"])
        hooks = [r for r in task_rows(self.server.db_path, "webhook").values()
                 if json.loads(r["payload"])["task"] == tid]
        self.assertEqual([(r["state"], r["attempts"]) for r in hooks], [("succeeded", 3)], hooks)
        # A finished analysis cannot be canceled.
        r = self.server.request("DELETE", "/v1/analyses/" + tid, key=self.investigator)
        self.assertEqual(r.status, 409, r.body)
        self.assertEqual(w.stop(), 0, w.read_log()[-3000:])

    # ---- proof 7 -------------------------------------------------------------------------------

    def test_f_refused_uploads_leave_no_blob(self):
        env, s = self.env, self.server
        big = os.path.join(env.dir, "big.dcm")
        make_big_dicom(big)
        big_body = read(big)
        self.assertGreater(len(big_body), 1 << 20)

        def refused(status, body, reason=None, **kw):
            before = blob_files(env.blobs_dir)
            r = upload(s, body, kw.pop("key", self.investigator), **kw)
            self.assertEqual(r.status, status, (kw, r.body[:300]))
            if reason:
                self.assertRegex(r.body.decode(), reason)
            # Whatever was written is gone: no blob, no temporary file (allow the server a
            # moment after its answer to drop the request's state).
            deadline = time.monotonic() + 2
            while blob_files(env.blobs_dir) != before and time.monotonic() < deadline:
                time.sleep(0.02)
            self.assertEqual(blob_files(env.blobs_dir), before,
                             "files left by a refused upload (%d, %s)" % (status, kw))
            return r

        not_dicom = env.image("not_dicom.dcm")
        refused(422, not_dicom, r"DICOM")
        refused(422, not_dicom, r"DICOM", chunked=True)
        refused(422, env.image("img2dcm_no_modality.dcm"), r"Modality")
        refused(422, self.ct[:300])
        refused(413, big_body)
        refused(413, big_body, chunked=True)
        refused(415, self.ct, ctype="application/octet-stream")
        refused(415, self.ct, ctype="text/plain")
        refused(404, self.ct, subject="P999")
        refused(404, self.ct, trial="T2")
        refused(403, self.ct, key=self.patient_key)
        refused(403, self.ct, key=self.other_site_key)  # P001 is at S1
        refused(401, self.ct, key="th_not_a_key")
        refused(400, self.ct, callback="ftp://127.0.0.1/hook")
        r = s.request("POST", "/v1/analyses?subject=P001", body=self.ct,
                      headers={"Content-Type": "application/dicom"}, key=self.investigator)
        self.assertEqual(r.status, 400, r.body)

        # The same Idempotency-Key names one task; with another image it is refused.
        before = blob_files(env.blobs_dir)
        body, conflicting = self.image(), self.image()
        first = upload(s, body, self.investigator, idem="scan-0001")
        again = upload(s, body, self.investigator, idem="scan-0001")
        self.assertEqual((first.status, again.status), (202, 202), (first.body, again.body))
        tid = first.json()["id"]
        self.assertEqual(again.json()["id"], tid)
        self.assertEqual(again.header("Location"), "/v1/analyses/" + tid)
        r = upload(s, conflicting, self.investigator, idem="scan-0001")
        self.assertEqual(r.status, 409, r.body)
        other = upload(s, body, self.investigator, idem="scan-0002")
        self.assertEqual(other.status, 202, other.body)
        self.assertNotEqual(other.json()["id"], tid)
        # One blob for the accepted image (content-addressed: shared by its two tasks). The
        # refused one's blob may stay too: it is committed before the key is checked, and a
        # content-addressed blob cannot simply be deleted (another upload may share it).
        added = blob_files(env.blobs_dir) - before
        self.assertIn(blob_path(body), added)
        self.assertLessEqual(added, {blob_path(body), blob_path(conflicting)}, added)
        ids = [tid, other.json()["id"]]
        self.posted += ids
        rows = task_rows(s.db_path)
        self.assertEqual([rows[t]["state"] for t in ids], ["queued", "queued"])
        for t in ids:  # no worker is running; leave nothing queued for the next test
            self.assertEqual(s.request("DELETE", "/v1/analyses/" + t,
                                       key=self.investigator).status, 202)
        # Reading: the patient's own key may not; a site key of another site may not.
        self.assertEqual(s.request("GET", "/v1/analyses/" + tid, key=self.patient_key).status,
                         403)
        self.assertEqual(s.request("GET", "/v1/analyses/" + tid,
                                   key=self.other_site_key).status, 403)
        self.assertEqual(s.request("GET", "/v1/analyses/tffffffffffffffff",
                                   key=self.investigator).status, 404)
        # Webhook secrets: admins and the trial's investigators only.
        self.assertEqual(s.request("POST", "/v1/trials/T1/webhook-secret",
                                   key=self.patient_key).status, 403)

    # ---- proof 8 -------------------------------------------------------------------------------

    def test_g_real_analyzer_no_patient_data_in_logs_or_answers(self):
        env = self.env
        names = ["ct_explicit_signed.dcm", "img2dcm_rgb.dcm", "mr_multiframe.dcm",
                 "ct_big_endian.dcm"]
        for name in names:
            self.assertIn(b"Doe^Jane", env.image(name), name)
        w = env.start_worker("--webhook-allow-private", "--log-level", "debug", name="real")
        ids = {name: self.post(env.image(name), idem="real-" + name,
                               callback=self.receiver.url("/hook/real")) for name in names}
        answers = []
        for name, tid in ids.items():
            doc = self.wait_doc(tid, lambda d: d["state"] not in ("queued", "running"), 60, name)
            answers.append(json.dumps(doc))
            exp = env.manifest[name]
            if exp["read"] == "ok":
                self.assertEqual(doc["state"], "succeeded", doc)
                self.assertEqual((doc["result"]["rows"], doc["result"]["columns"]),
                                 (exp["expected"]["rows"], exp["expected"]["columns"]))
                self.assertAlmostEqual(doc["result"]["mean"], exp["expected"]["mean"], places=9)
            else:  # big endian: valid DICOM the analyzer does not decode (exit 3): not retried
                self.assertEqual((doc["state"], doc["attempts"]), ("dead", 1), doc)
                self.assertIn("exited with code 3", doc["error"])
        deadline = time.monotonic() + 30
        while len(self.receiver.to("/hook/real")) < len(names):
            self.assertLess(time.monotonic(), deadline, "webhooks of the real analyses")
            time.sleep(0.05)
        answers += [d[2].decode() for d in self.receiver.to("/hook/real")]
        self.assertEqual(w.stop(), 0, w.read_log()[-3000:])
        for text in answers:
            for needle in PATIENT_DATA:
                self.assertNotIn(needle, text)
        for name, log in env.logs():
            for needle in PATIENT_DATA + (self.secret,):
                self.assertNotIn(needle, log, "%r in the %s log" % (needle, name))

    # ---- at the end ----------------------------------------------------------------------------

    def test_z_nothing_left_running(self):
        for w in self.env.workers:
            if w.proc is not None:
                self.assertEqual(w.stop(), 0, w.read_log()[-3000:])
        pids = []
        for name in os.listdir(self.runs):
            if name.endswith(".json") and name != "modes.json":
                with open(os.path.join(self.runs, name)) as f:
                    run = json.load(f)
                pids += [run["pid"]] + ([run["child"]] if run["child"] else [])
        self.assertTrue(pids)
        self.assertEqual([p for p in pids if not gone(p)], [], "analyzer processes left")
        self.assertEqual(adopted(exclude={self.server.proc.pid}), [])
        # No delivery beyond the ones each test expected.
        counts = {}
        for d in self.receiver.deliveries:
            counts[d[0]] = counts.get(d[0], 0) + 1
        self.assertEqual(counts, {"/hook/cancel": 1, "/hook/retry": 3, "/hook/real": 4})


if __name__ == "__main__":
    become_subreaper()
    unittest.main()
