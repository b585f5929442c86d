#!/usr/bin/python3
"""make bench-analysis: image uploads (POST /v1/analyses), the task queue with a no-op analyzer,
and an analysis end to end.

Images: made at start with pydicom, CT, 16 bits signed, explicit VR little endian: 512x512
(512 KiB of pixels) and 4096x4096 (32 MiB). Each upload changes the last 8 bytes of the pixel data
(a counter), so that every upload is a new blob, as every hospital upload is (--same-image sends
identical bytes: the store then keeps one blob).

Each part runs `trialhub serve` on a free loopback port in a fresh temp folder (SQLite database,
blob folder, server log), seeded with trial T1, site S1, patient P001 and an admin key
(`trialhub token create --role admin`, then the admin API).

1. Uploads: `serve --workers 0` (tasks are queued, none run). N client threads (http.client, one
   keep-alive connection each) post the image back to back for --upload-seconds after a warm-up;
   uploads/s and MB/s count the 202s that completed in that window. The server's VmRSS is sampled
   every 100 ms; VmHWM is reset (/proc/PID/clear_refs) before each cell and read after it. Cells:
   the small image at 16 and 64 connections, the large one at 16. Server and client CPU are
   given as a share of one core, to show which side was the limit, and the server's per upload.
2. Queue: M tasks are queued by uploading the small image with `serve --workers 0`; the server
   is stopped and the database kept as a template. Per cell a copy of it (fresh each time) is
   worked by `trialhub worker` processes running bench/analysis/noop.sh (reads stdin, prints
   `{}`): W processes of one thread each, and one process of W threads, W in 1, 2, 4. The time
   runs from the spawn of the workers until every task has succeeded, counted every 20 ms in the
   tasks table with a read-only sqlite3 connection. The steady rate is the one between 10% and
   90% done; CPU per task is the workers' own, and their analyzer children's.
3. End to end: uploads of the small image at a fixed rate (--e2e-rate, default 20/s for 30 s),
   analysed by the real `trialhub analyze` in 2 workers: embedded (`serve --workers 2`), and in a
   `trialhub worker --workers 2` process beside `serve --workers 0`. Per upload: the time from
   sending it to the GET /v1/analyses/{id} (polled every 20 ms) that shows `succeeded`, and its
   parts: until the 202; from the task's created_at to its updated_at (queued to succeeded, the
   server's clock, ms); within that, the workers' "analysis succeeded" log's seconds (analyzer
   run and result committed); and from updated_at to the GET that saw it. Polling costs the
   server one GET per outstanding task every 20 ms (GETs/s in the table): little while the
   workers keep up, much when a backlog builds.

The machine may be shared: every cell gives the share of its time in which some task of the
machine waited for a CPU and for I/O (Linux PSI, /proc/pressure/{cpu,io} "some").

Prints Markdown tables. Every process started here is stopped by its pid; temp folders are
removed (BENCH_KEEP=1 keeps them). Run with Debian's /usr/bin/python3 (python3-pydicom,
python3-numpy); it re-runs itself with that interpreter when needed.
"""
import os
import sys

try:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
except ImportError:
    PY = "/usr/bin/python3"
    if os.path.realpath(sys.executable) != os.path.realpath(PY) and os.path.exists(PY):
        os.execv(PY, [PY] + sys.argv)
    sys.exit("bench-analysis: needs pydicom and numpy (Debian: python3-pydicom python3-numpy)")

import argparse
import calendar
import concurrent.futures
import http.client
import itertools
import json
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
NOOP = os.path.join(HERE, "noop.sh")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UPLOAD = "/v1/analyses?trial=T1&subject=P001"
CLK_TCK = os.sysconf("SC_CLK_TCK")

started = []  # processes started here and not yet reaped; stopped by pid on the way out


# ---- helpers ---------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kb(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cpu_s(pid):
    """(own user+system, waited-for children's user+system) CPU seconds of a live process."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return own, children


def reset_hwm(pid):
    """Resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def stop_proc(proc, timeout=60):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc in started:
        started.remove(proc)


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def pressure_us():
    """PSI totals (µs some task waited): {"cpu": ..., "io": ...}; empty without PSI."""
    out = {}
    for res in ("cpu", "io"):
        try:
            with open("/proc/pressure/" + res) as f:
                out[res] = int(f.readline().rsplit("total=", 1)[1])
        except (OSError, IndexError, ValueError):
            pass
    return out


def pressure_share(p0, p1, seconds):
    """Share of the time some task of the machine waited for the CPU / for I/O (PSI)."""
    return {k: (p1[k] - p0[k]) / 1e6 / seconds for k in p0 if k in p1}


def fmt_psi(psi):
    return "%.0f%% / %.0f%%" % (psi["cpu"] * 100, psi["io"] * 100) if psi else "-"


# ---- images ----------------------------------------------------------------------------------

def make_image(path, rows, cols, seed):
    """A CT slice, 16 bits signed, Rescale Intercept -1024: noise around soft tissue with a
    bone disc, so that the analyzer's windows see more than one value."""
    rng = np.random.default_rng(seed)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.7700.%d" % rows
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Bench^Patient"
    ds.PatientID = "BENCH-0001"
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    stored = rng.integers(900, 1200, size=(rows, cols), dtype=np.int16)  # -124..175 HU
    r = rows // 8
    stored[rows // 2 - r:rows // 2 + r, cols // 2 - r:cols // 2 + r] += 1000  # bone
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, write_like_original=False)
    with open(path, "rb") as f:
        data = f.read()
    # The last 8 bytes are pixels (4 values) that each upload overwrites with a counter.
    assert data.endswith(stored.astype("<i2").tobytes()[-8:])
    return data


class Image:
    def __init__(self, name, data, unique):
        self.name = name
        self.data = data
        self.prefix = memoryview(data)[:-8]
        self.tail = data[-8:]
        self.unique = unique

    def size(self):
        return len(self.data)


counter = itertools.count(1)  # next() on it is atomic under the GIL


# ---- server ----------------------------------------------------------------------------------

class Server:
    """One `trialhub serve` on its own database and blob folder in `folder`; stopped by pid."""

    def __init__(self, binary, folder, workers=0, analyzer=None):
        self.binary = binary
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.db_path = os.path.join(folder, "trialhub.db")
        self.blob_path = os.path.join(folder, "blobs")
        self.log_path = os.path.join(folder, "server.log")
        self.env = dict(os.environ, TRIALHUB_DATABASE_URL="sqlite://" + self.db_path,
                        TRIALHUB_BLOB_URL="file://" + self.blob_path)
        self.workers = workers
        self.analyzer = analyzer
        self.proc = None
        self.port = None
        self.log = None

    def token(self, *args):
        return subprocess.run([self.binary, "token", "create", *args], env=self.env,
                              capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()

    def start(self):
        self.port = free_port()
        self.log = open(self.log_path, "ab")
        argv = [self.binary, "serve", "--listen", "127.0.0.1:%d" % self.port,
                "--workers", str(self.workers)]
        if self.analyzer:
            argv += ["--analyzer", self.analyzer]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=self.log)
        started.append(self.proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s; log: %s" % (self.proc.returncode,
                                                                        self.log_path))
            try:
                if self.request("GET", "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not come up; log: " + self.log_path)

    def stop(self):
        if self.proc is None:
            return
        stop_proc(self.proc)
        self.proc = None
        self.log.close()

    def request(self, method, path, body=None, key=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {}
            if key:
                headers["Authorization"] = "Bearer " + key
            if body is not None:
                body = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def seed(self):
        """T1 with site S1 and patient P001; returns an admin key. Starts the server."""
        admin = self.token("--role", "admin")
        self.start()
        for path, body in (
                ("/v1/trials", {"id": "T1", "name": "Trial one", "arms": ["A", "B"],
                                "schedule_weeks": [0, 2, 4, 8, 12]}),
                ("/v1/trials/T1/sites", {"id": "S1", "name": "Site one"}),
                ("/v1/trials/T1/patients", {"id": "P001", "site": "S1", "arm": "A",
                                            "enrolled_on": "2026-11-01"})):
            status, answer = self.request("POST", path, body, key=admin)
            assert status == 201, (path, status, answer)
        # The upload checks the patient in the roster, which follows the store within moments.
        deadline = time.monotonic() + 10
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            status, _ = upload(conn, admin, image_for_probe)
            conn.close()
            if status == 202 or time.monotonic() > deadline:
                assert status == 202, status
                break
            time.sleep(0.05)
        return admin


def upload(conn, key, image):
    """POSTs the image on conn (keep-alive); returns (status, body)."""
    conn.putrequest("POST", UPLOAD, skip_accept_encoding=True)
    conn.putheader("Authorization", "Bearer " + key)
    conn.putheader("Content-Type", "application/dicom")
    conn.putheader("Content-Length", str(image.size()))
    conn.endheaders()
    conn.send(image.prefix)
    conn.send(struct.pack("<Q", next(counter)) if image.unique else image.tail)
    r = conn.getresponse()
    return r.status, r.read()


image_for_probe = None  # a small valid image, for seed()'s roster probe


# ---- part 1: uploads -------------------------------------------------------------------------

class RssSampler(threading.Thread):
    def __init__(self, pid, interval=0.1):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.samples.append(proc_status_kb(self.pid, "VmRSS"))
            self.done.wait(self.interval)

    def stop(self):
        self.done.set()
        self.join()
        return max(self.samples) if self.samples else 0


def upload_cell(server, key, image, conns, seconds, warmup):
    """conns threads post back to back; counts what completes in [warm-up end, + seconds]."""
    pid = server.proc.pid
    rss_before = proc_status_kb(pid, "VmRSS")
    reset = reset_hwm(pid)
    sampler = RssSampler(pid)
    sampler.start()
    t_begin = time.monotonic()
    t_measure = t_begin + warmup
    t_end = t_measure + seconds
    marks = {}
    records = [[] for _ in range(conns)]  # per thread: (completed at, latency s, status)
    errors = []

    def client(i):
        conn = None
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            try:
                status, _ = upload(conn, key, image)
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
                conn.close()
                conn = None
                time.sleep(0.01)
                continue
            done = time.monotonic()
            records[i].append((done, done - now, status))
        if conn is not None:
            conn.close()

    def mark():  # CPU of both sides over the measured window
        time.sleep(max(0.0, t_measure - time.monotonic()))
        marks["t0"] = time.monotonic()
        marks["srv0"] = proc_cpu_s(pid)[0]
        marks["cli0"] = sum(os.times()[:2])
        marks["psi0"] = pressure_us()
        time.sleep(max(0.0, t_end - time.monotonic()))
        marks["t1"] = time.monotonic()
        marks["srv1"] = proc_cpu_s(pid)[0]
        marks["cli1"] = sum(os.times()[:2])
        marks["psi1"] = pressure_us()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(conns)]
    marker = threading.Thread(target=mark)
    marker.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    marker.join()
    peak_sampled = sampler.stop()
    hwm = proc_status_kb(pid, "VmHWM")
    window = marks["t1"] - marks["t0"]
    inside = [r for rs in records for r in rs if marks["t0"] <= r[0] < marks["t1"]]
    ok = [r for r in inside if r[2] == 202]
    statuses = {}
    for r in inside:
        if r[2] != 202:
            statuses[r[2]] = statuses.get(r[2], 0) + 1
    lat = [r[1] for r in ok]
    return {
        "image": image.name, "bytes": image.size(), "conns": conns, "window": window,
        "uploads": len(ok), "rate": len(ok) / window, "mbs": len(ok) * image.size() / window / 1e6,
        "other": statuses, "errors": len(errors), "p50": percentile(lat, 0.5) * 1e3,
        "p99": percentile(lat, 0.99) * 1e3,
        "srv_cpu": (marks["srv1"] - marks["srv0"]) / window,
        "cli_cpu": (marks["cli1"] - marks["cli0"]) / window,
        "srv_ms": (marks["srv1"] - marks["srv0"]) / len(ok) * 1e3 if ok else float("nan"),
        "psi": pressure_share(marks["psi0"], marks["psi1"], window),
        "rss_before": rss_before, "rss_peak": peak_sampled, "hwm": hwm, "reset": reset,
    }


def part_uploads(args, work, small, large):
    server = Server(args.trialhub, os.path.join(work, "uploads"))
    results = []
    try:
        key = server.seed()
        print("uploads: server pid %d, port %d" % (server.proc.pid, server.port), flush=True)
        cells = [(small, c) for c in args.conns] + [(large, c) for c in args.large_conns]
        for image, conns in cells:
            r = upload_cell(server, key, image, conns, args.upload_seconds, args.warmup)
            results.append(r)
            print("  %s x %d connections: %.1f uploads/s, %.1f MB/s, p50 %.1f ms, p99 %.1f ms,"
                  " server CPU %.2f (%.2f ms/upload), client CPU %.2f, CPU/IO pressure %s, RSS"
                  " %.1f -> peak %.1f MiB (VmHWM %.1f)%s"
                  % (image.name, conns, r["rate"], r["mbs"], r["p50"], r["p99"], r["srv_cpu"],
                     r["srv_ms"], r["cli_cpu"], fmt_psi(r["psi"]), r["rss_before"] / 1024,
                     r["rss_peak"] / 1024, r["hwm"] / 1024,
                     "; other statuses %s, errors %d" % (r["other"], r["errors"])
                     if r["other"] or r["errors"] else ""), flush=True)
    finally:
        server.stop()
    return results


# ---- part 2: the queue -----------------------------------------------------------------------

def enqueue(server, key, image, count, conns=16):
    """count uploads over conns connections; returns when all were answered 202."""
    remaining = itertools.count()
    failures = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        while next(remaining) < count:
            status, body = upload(conn, key, image)
            if status != 202:
                failures.append((status, body[:200]))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError("enqueue: %d uploads failed, e.g. %s" % (len(failures), failures[0]))


def task_states(con):
    return dict(con.execute("SELECT state, count(*) FROM tasks WHERE kind = 'analysis'"
                            " GROUP BY state").fetchall())


def queue_cell(args, template, folder, procs, threads, ntasks):
    os.makedirs(folder)
    db = os.path.join(folder, "trialhub.db")
    shutil.copyfile(template.db_path, db)
    env = dict(os.environ, TRIALHUB_DATABASE_URL="sqlite://" + db,
               TRIALHUB_BLOB_URL="file://" + template.blob_path)
    con = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=30)
    assert task_states(con).get("queued") == ntasks, task_states(con)
    workers, logs = [], []
    t0 = time.monotonic()
    psi0 = pressure_us()
    marks = {}
    try:
        for i in range(procs):
            log = open(os.path.join(folder, "worker%d.log" % i), "ab")
            logs.append(log)
            p = subprocess.Popen([args.trialhub, "worker", "--workers", str(threads),
                                  "--analyzer", args.noop], env=env, stdout=log, stderr=log)
            started.append(p)
            workers.append(p)
        deadline = t0 + args.queue_timeout
        while True:
            states = task_states(con)
            done = states.get("succeeded", 0) + states.get("dead", 0) + \
                states.get("canceled", 0)
            now = time.monotonic()
            for q in (0.1, 0.9):
                if q not in marks and done >= q * ntasks:
                    marks[q] = now
            if done >= ntasks:
                break
            if now > deadline:
                raise RuntimeError("queue: %d of %d done after %.0f s (%s)" % (
                    done, ntasks, now - t0, states))
            for p in workers:
                if p.poll() is not None:
                    raise RuntimeError("worker exited with %s; log in %s" % (p.returncode, folder))
            time.sleep(0.02)
        t_done = time.monotonic()
        psi = pressure_share(psi0, pressure_us(), t_done - t0)
        cpu = [proc_cpu_s(p.pid) for p in workers]
    finally:
        for p in workers:
            stop_proc(p)
        for log in logs:
            log.close()
        con.close()
    elapsed = t_done - t0
    steady = 0.8 * ntasks / (marks[0.9] - marks[0.1]) if marks[0.9] > marks[0.1] else float("nan")
    return {"procs": procs, "threads": threads, "tasks": ntasks, "elapsed": elapsed,
            "rate": ntasks / elapsed, "steady": steady, "states": states, "psi": psi,
            "worker_cpu_ms": sum(c[0] for c in cpu) / ntasks * 1e3,
            "analyzer_cpu_ms": sum(c[1] for c in cpu) / ntasks * 1e3}


def part_queue(args, work, small):
    template = Server(args.trialhub, os.path.join(work, "queue-template"))
    try:
        key = template.seed()
        t0 = time.monotonic()
        enqueue(template, key, small, args.queue_tasks - 1)  # seed() queued one already
        print("queue: %d tasks queued in %.1f s (server pid %d)" % (
            args.queue_tasks, time.monotonic() - t0, template.proc.pid), flush=True)
    finally:
        template.stop()
    con = sqlite3.connect(template.db_path, timeout=30)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    results = []
    n = 0
    for shape in args.queue_shapes:
        for w in args.queue_workers:
            procs, threads = (w, 1) if shape == "procs" else (1, w)
            if shape == "threads" and w == 1 and "procs" in args.queue_shapes:
                continue  # the same cell as 1 process of 1 thread
            n += 1
            r = queue_cell(args, template, os.path.join(work, "queue-%d" % n), procs, threads,
                           args.queue_tasks)
            results.append(r)
            print("  %d process(es) x %d thread(s): %d tasks in %.2f s: %.1f tasks/s (steady"
                  " %.1f); worker CPU %.2f ms/task, analyzer %.2f ms/task; CPU/IO pressure %s;"
                  " %s" % (procs, threads, r["tasks"], r["elapsed"], r["rate"], r["steady"],
                           r["worker_cpu_ms"], r["analyzer_cpu_ms"], fmt_psi(r["psi"]),
                           r["states"]), flush=True)
            if not BENCH_KEEP:
                shutil.rmtree(os.path.join(work, "queue-%d" % n), ignore_errors=True)
    return results


# ---- part 3: end to end ----------------------------------------------------------------------

def iso_s(text):
    """Seconds since the epoch of the server's "YYYY-MM-DDTHH:MM:SS.mmmZ"."""
    return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + int(text[20:23]) / 1e3


def e2e_one(port, key, image, poll_s, timeout_s):
    """One upload, then GETs every poll_s until it has succeeded. Returns a dict."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    wall0 = time.time()
    try:
        status, body = upload(conn, key, image)
        t_accepted = time.monotonic()
        if status != 202:
            return {"t0": t0, "error": "upload %d" % status}
        task = json.loads(body)["id"]
        gets = 0
        while True:
            time.sleep(poll_s)
            gets += 1
            conn.request("GET", "/v1/analyses/" + task,
                         headers={"Authorization": "Bearer " + key})
            r = conn.getresponse()
            answer = r.read()
            now = time.monotonic()
            if r.status != 200:
                return {"t0": t0, "error": "GET %d" % r.status}
            doc = json.loads(answer)
            state = doc["state"]
            if state == "succeeded":
                # The server's clock is this machine's: created_at is the enqueue's commit time,
                # updated_at the finish's (ms resolution).
                seen = wall0 + (now - t0)
                created, finished = iso_s(doc["created_at"]), iso_s(doc["updated_at"])
                return {"t0": t0, "accepted": t_accepted - t0, "total": now - t0,
                        "queued_to_done": finished - created, "done_to_seen": seen - finished,
                        "attempts": doc.get("attempts", 1), "gets": gets}
            if state in ("dead", "canceled"):
                return {"t0": t0, "error": "state " + state}
            if now - t0 > timeout_s:
                return {"t0": t0, "error": "timeout (%s)" % state}
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"t0": t0, "error": repr(e)}
    finally:
        conn.close()


def e2e_cell(args, work, small, mode):
    folder = os.path.join(work, "e2e-" + mode)
    embedded = mode == "embedded"
    server = Server(args.trialhub, folder, workers=args.e2e_workers if embedded else 0)
    worker, log = None, None
    try:
        key = server.seed()
        if not embedded:
            log = open(os.path.join(folder, "worker.log"), "ab")
            worker = subprocess.Popen([args.trialhub, "worker", "--workers",
                                       str(args.e2e_workers)], env=server.env, stdout=log,
                                      stderr=log)
            started.append(worker)
        time.sleep(0.5)
        print("end to end (%s): server pid %d%s, %g uploads/s for %g s" % (
            mode, server.proc.pid, ", worker pid %d" % worker.pid if worker else "",
            args.e2e_rate, args.e2e_seconds), flush=True)
        total = int(args.e2e_rate * args.e2e_seconds)
        lag = 0.0
        psi0, t_psi = pressure_us(), time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.e2e_threads) as pool:
            futures = []
            t_start = time.monotonic() + 0.1
            for i in range(total):
                due = t_start + i / args.e2e_rate
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                lag = max(lag, time.monotonic() - due)
                futures.append(pool.submit(e2e_one, server.port, key, small,
                                           args.poll_ms / 1e3, args.e2e_timeout))
            results = [f.result() for f in futures]
        elapsed = time.monotonic() - t_psi
        psi = pressure_share(psi0, pressure_us(), elapsed)
        srv_log = open(server.log_path, "rb").read().decode("utf-8", "replace")
        worker_log = open(os.path.join(folder, "worker.log"), "rb").read().decode(
            "utf-8", "replace") if worker else ""
    finally:
        if worker is not None:
            stop_proc(worker)
            log.close()
        server.stop()
    ok = [r for r in results if "error" not in r]
    errors = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    tot = [r["total"] * 1e3 for r in ok]
    acc = [r["accepted"] * 1e3 for r in ok]
    q2d = [r["queued_to_done"] * 1e3 for r in ok]
    d2s = [r["done_to_seen"] * 1e3 for r in ok]
    failed_attempts = (srv_log + worker_log).count('"analysis attempt failed"')
    # The workers' own time per task: from starting the analyzer to the result committed.
    run_ms = []
    for line in (srv_log + worker_log).splitlines():
        if '"analysis succeeded"' in line:
            try:
                run_ms.append(float(json.loads(line)["seconds"]) * 1e3)
            except (ValueError, KeyError):
                pass
    out = {"mode": mode, "n": len(results), "ok": len(ok), "errors": errors, "lag_ms": lag * 1e3,
           "p50": percentile(tot, 0.5), "p90": percentile(tot, 0.9),
           "p99": percentile(tot, 0.99), "max": max(tot) if tot else float("nan"),
           "acc_p50": percentile(acc, 0.5), "acc_p99": percentile(acc, 0.99),
           "q2d_p50": percentile(q2d, 0.5), "q2d_p99": percentile(q2d, 0.99),
           "d2s_p50": percentile(d2s, 0.5), "failed_attempts": failed_attempts,
           "run_p50": percentile(run_ms, 0.5), "run_p99": percentile(run_ms, 0.99),
           "retried": sum(1 for r in ok if r["attempts"] > 1), "psi": psi,
           "gets_per_s": sum(r["gets"] for r in ok) / elapsed}
    print("  %d/%d succeeded; upload to succeeded p50 %.0f ms, p90 %.0f, p99 %.0f, max %.0f;"
          " upload to 202 p50 %.1f ms, p99 %.1f; queued to succeeded p50 %.0f ms, p99 %.0f"
          " (of which analyzer run + finish p50 %.0f ms, p99 %.0f); succeeded to seen p50 %.0f"
          " ms; %.0f GETs/s; schedule lag max %.1f ms; CPU/IO pressure %s%s" % (
              out["ok"], out["n"], out["p50"], out["p90"], out["p99"], out["max"],
              out["acc_p50"], out["acc_p99"], out["q2d_p50"], out["q2d_p99"], out["run_p50"],
              out["run_p99"], out["d2s_p50"], out["gets_per_s"], out["lag_ms"], fmt_psi(psi),
              "; errors %s" % errors if errors else ""), flush=True)
    if not BENCH_KEEP:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def part_e2e(args, work, small):
    return [e2e_cell(args, work, small, mode) for mode in args.e2e_modes]


# ---- main ------------------------------------------------------------------------------------

BENCH_KEEP = bool(os.environ.get("BENCH_KEEP"))


def csv_ints(text):
    return [int(v) for v in text.split(",") if v]


def main():
    global image_for_probe
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trialhub", default=os.path.join(ROOT, "build-bench", "trialhub"))
    ap.add_argument("--parts", default="uploads,queue,e2e")
    ap.add_argument("--small", default="512x512", help="rows x columns of the small image")
    ap.add_argument("--large", default="4096x4096", help="rows x columns of the large image")
    ap.add_argument("--conns", type=csv_ints, default=[16, 64],
                    help="connections for the small image's uploads")
    ap.add_argument("--large-conns", type=csv_ints, default=[16],
                    help="connections for the large image's uploads")
    ap.add_argument("--upload-seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--same-image", action="store_true",
                    help="send identical bytes every time (one blob) instead of a new image")
    ap.add_argument("--queue-tasks", type=int, default=2000)
    ap.add_argument("--queue-workers", type=csv_ints, default=[1, 2, 4])
    ap.add_argument("--queue-shapes", default="procs,threads",
                    help="procs: W processes of 1 thread; threads: 1 process of W threads")
    ap.add_argument("--queue-timeout", type=float, default=300.0)
    ap.add_argument("--noop", default=NOOP, help="the queue part's analyzer (no spaces in it)")
    ap.add_argument("--e2e-rate", type=float, default=20.0, help="uploads per second")
    ap.add_argument("--e2e-seconds", type=float, default=30.0)
    ap.add_argument("--e2e-workers", type=int, default=2)
    ap.add_argument("--e2e-modes", default="embedded,process",
                    help="embedded: serve --workers N; process: a trialhub worker process")
    ap.add_argument("--e2e-threads", type=int, default=128, help="client threads")
    ap.add_argument("--e2e-timeout", type=float, default=120.0)
    ap.add_argument("--poll-ms", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true",
                    help="3 s per upload cell, 300 tasks, 8 s end to end (~1 min)")
    args = ap.parse_args()
    if args.quick:
        args.upload_seconds, args.warmup = 3.0, 1.0
        args.queue_tasks = 300
        args.e2e_seconds = 8.0
    args.queue_shapes = [s for s in args.queue_shapes.split(",") if s]
    args.e2e_modes = [s for s in args.e2e_modes.split(",") if s]
    parts = set(args.parts.split(","))
    # A SIGTERM unwinds like Ctrl-C, so the finally blocks stop the processes started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench-analysis: terminated"))
    if not os.path.exists(args.trialhub):
        sys.exit("bench-analysis: %s not found (make bench-analysis builds it)" % args.trialhub)
    if not os.access(args.noop, os.X_OK):
        sys.exit("bench-analysis: %s is not executable" % args.noop)
    began = time.monotonic()
    work = tempfile.mkdtemp(prefix="bench-analysis-")
    print("bench-analysis: %s, %d cores, load average %s, %s" % (
        time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(), loadavg(),
        "quick" if args.quick else "full"), flush=True)
    up, queue, e2e = [], [], []
    try:
        rs, cs = (int(v) for v in args.small.split("x"))
        rl, cl = (int(v) for v in args.large.split("x"))
        unique = not args.same_image
        small = Image("%dx%d (%s)" % (rs, cs, human_bytes(rs * cs * 2)),
                      make_image(os.path.join(work, "small.dcm"), rs, cs, 1), unique)
        image_for_probe = Image("probe", small.data, unique)
        if "uploads" in parts:
            large = Image("%dx%d (%s)" % (rl, cl, human_bytes(rl * cl * 2)),
                          make_image(os.path.join(work, "large.dcm"), rl, cl, 2), unique)
            up = part_uploads(args, work, small, large)
            large = None
            if not BENCH_KEEP:
                shutil.rmtree(os.path.join(work, "uploads"), ignore_errors=True)
        if "queue" in parts:
            same = Image(small.name, small.data, False)  # one blob: the no-op never reads it
            queue = part_queue(args, work, same)
        if "e2e" in parts:
            e2e = part_e2e(args, work, small)
    finally:
        for proc in list(started):
            stop_proc(proc)
        if BENCH_KEEP:
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    if up:
        print()
        print("Uploads (POST /v1/analyses, `serve --workers 0`), %g s per cell after a %g s "
              "warm-up; %s image per upload. CPU: share of one core over the cell (2 cores in "
              "all). RSS: before the cell, highest 100 ms sample, VmHWM after a reset." % (
                  args.upload_seconds, args.warmup,
                  "a new" if not args.same_image else "the same"))
        print()
        print("| image | connections | uploads/s | MB/s | p50 ms | p99 ms | server CPU |"
              " server CPU ms/upload | client CPU | CPU / IO pressure | RSS before MiB |"
              " peak RSS MiB (sampled) | VmHWM MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in up:
            print("| %s | %d | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f | %s | %.1f | %.1f |"
                  " %.1f%s |" % (
                      r["image"], r["conns"], r["rate"], r["mbs"], r["p50"], r["p99"],
                      r["srv_cpu"], r["srv_ms"], r["cli_cpu"], fmt_psi(r["psi"]),
                      r["rss_before"] / 1024, r["rss_peak"] / 1024, r["hwm"] / 1024,
                      "" if r["reset"] else " (no reset)"))
        other = [r for r in up if r["other"] or r["errors"]]
        for r in other:
            print("%s x %d: other statuses %s, connection errors %d" % (
                r["image"], r["conns"], r["other"], r["errors"]))
    if queue:
        print()
        print("Queue: %d tasks, no-op analyzer (%s), `trialhub worker` processes; time from "
              "their spawn to the last task succeeded." % (args.queue_tasks,
                                                           os.path.relpath(args.noop, ROOT)))
        print()
        print("| processes x threads | time s | tasks/s | steady tasks/s (10-90%) |"
              " worker CPU ms/task | analyzer CPU ms/task | CPU / IO pressure | states |")
        print("|---|---|---|---|---|---|---|---|")
        for r in queue:
            print("| %d x %d | %.2f | %.1f | %.1f | %.2f | %.2f | %s | %s |" % (
                r["procs"], r["threads"], r["elapsed"], r["rate"], r["steady"],
                r["worker_cpu_ms"], r["analyzer_cpu_ms"], fmt_psi(r["psi"]),
                ", ".join("%s %d" % kv for kv in sorted(r["states"].items()))))
    if e2e:
        print()
        print("End to end: %s uploads/s of the small image for %g s, %d workers running "
              "`trialhub analyze`; from sending the upload to the GET (every %g ms) showing "
              "succeeded." % (args.e2e_rate, args.e2e_seconds, args.e2e_workers, args.poll_ms))
        print()
        print("| workers | uploads | succeeded | p50 ms | p90 ms | p99 ms | max ms |"
              " to 202 p50 / p99 ms | queued to succeeded p50 / p99 ms | analyzer run + finish"
              " p50 / p99 ms | succeeded to seen p50 ms | polling GETs/s | CPU / IO pressure |"
              " failed attempts | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in e2e:
            print("| %s | %d | %d | %.0f | %.0f | %.0f | %.0f | %.1f / %.1f | %.0f / %.0f |"
                  " %.0f / %.0f | %.0f | %.0f | %s | %d | %s |" % (
                      "serve --workers %d" % args.e2e_workers if r["mode"] == "embedded"
                      else "worker --workers %d (process)" % args.e2e_workers,
                      r["n"], r["ok"], r["p50"], r["p90"], r["p99"], r["max"], r["acc_p50"],
                      r["acc_p99"], r["q2d_p50"], r["q2d_p99"], r["run_p50"], r["run_p99"],
                      r["d2s_p50"], r["gets_per_s"], fmt_psi(r["psi"]),
                      r["failed_attempts"],
                      ", ".join("%s: %d" % kv for kv in r["errors"].items()) or "-"))
    print()
    print("bench-analysis: %.0f s in all, load average %s" % (time.monotonic() - began,
                                                              loadavg()))


def human_bytes(n):
    if n >= 1024 * 1024:
        return "%g MiB" % (n / 1048576)
    if n >= 1024:
        return "%g KiB" % (n / 1024)
    return "%d B" % n


if __name__ == "__main__":
    sys.exit(main())
