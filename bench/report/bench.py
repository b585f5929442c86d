#!/usr/bin/env python3
"""make bench-report: interim reports (GET /v1/trials/T1/report?format=json|pdf) on trials of
10k, 100k and 1M responses: time as the client sees it, response size, the server's memory peak,
and how fast a report stops when its client goes away.

Per size, in a fresh temp folder: `trialhub serve` on a free loopback port creates trial T1
(arms A, B; schedule weeks 0, 2, 4, 8, 12; sites S1-S3) through the admin API and is stopped;
the patients (responses/10, at least 1000, at most 100,000; arms alternate, sites round-robin)
and the responses (PHQ-9 and GAD-7 in turn with random scores, each patient's visits from the
schedule, ~1% alerts) go straight into its SQLite file with Python's sqlite3, as
tests/integration/test_report.py does; then the server is started again. The server's VmHWM at
that point is the baseline. Per format: VmHWM is reset (/proc/PID/clear_refs, 5), one warm-up
report, RUNS timed reports (wall time from sending the request to the last byte of the answer),
then VmHWM is read again: the peak of that format's reports.

Cancellation, on the largest size: CANCELS times, a raw socket sends the GET (format=pdf by
default) and is closed after a random 50-300 ms (--cancel-delay-ms); the bench waits for the
server to end the computation (trialhub_reports_total grows) before the next one. The latency
(from the cancel to the last work done on it) comes from the server's log line `report canceled`
(cancel_latency_ms: exact p50, p99, max, and the slowest five with their close delay and stage)
and from the histogram trialhub_report_cancel_latency_seconds (bucket counts over the run).

Prints one Markdown table per part. BENCH_KEEP=1 keeps the temp folder (databases, server logs).
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
PHQ9 = "http://loinc.org/q/44249-1"
GAD7 = "http://loinc.org/q/69737-5"
WEEKS = [0, 2, 4, 8, 12]
SITES = ["S1", "S2", "S3"]
REPORT = "/v1/trials/T1/report"

started = []  # processes started here and not yet reaped; stopped by pid on the way out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class Server:
    """One `trialhub serve` on its own database in `folder`; stopped by pid."""

    def __init__(self, binary, folder, report_threads):
        self.binary = binary
        self.folder = folder
        self.db_path = os.path.join(folder, "trialhub.db")
        self.log_path = os.path.join(folder, "server.log")
        self.env = dict(os.environ, TRIALHUB_DATABASE_URL="sqlite://" + self.db_path)
        self.report_threads = report_threads
        self.proc = None
        self.port = None

    def token(self, *args):
        return subprocess.run([self.binary, "token", "create", *args], env=self.env,
                              capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()

    def start(self):
        self.port = free_port()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--listen", "127.0.0.1:%d" % self.port,
             "--report-threads", str(self.report_threads)],
            env=self.env, stdout=self.log, stderr=self.log)
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

    def request(self, method, path, body=None, key=None, timeout=300):
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

    def metrics(self):
        return self.request("GET", "/metrics", timeout=30)[1].decode()

    def log_lines(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace").splitlines()


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


def metric_sum(text, name, labels=""):
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def histogram_buckets(text, name):
    """{le: cumulative count} of a histogram without labels."""
    out = {}
    for line in text.splitlines():
        m = re.match(name + r'_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def seed(server, nresponses, rng):
    """T1 through the API, then patients and responses straight into the stopped server's file."""
    admin = server.token("--role", "admin")
    server.start()
    status, body = server.request("POST", "/v1/trials", {
        "id": "T1", "name": "Trial one", "arms": ["A", "B"], "schedule_weeks": WEEKS}, key=admin)
    assert status == 201, (status, body)
    for s in SITES:
        status, body = server.request("POST", "/v1/trials/T1/sites",
                                      {"id": s, "name": "Site " + s}, key=admin)
        assert status == 201, (status, body)
    server.stop()

    npatients = min(max(nresponses // 10, 1000), 100000)
    patients = ["P%06d" % i for i in range(npatients)]
    t0 = time.monotonic()
    con = sqlite3.connect(server.db_path, timeout=30)
    con.execute("PRAGMA synchronous=OFF")
    con.executemany("INSERT INTO patients(id, trial_id, site_id, arm, enrolled_on)"
                    " VALUES(?, 'T1', ?, ?, '2026-08-01')",
                    [(p, SITES[i % 3], "AB"[i % 2]) for i, p in enumerate(patients)])
    rand = rng.random

    def rows():
        # Row i: patient (i // 10) % npatients, instrument i % 2, visit week (i // 2) % 5: every
        # patient has both instruments at every visit (more when responses > 10 x patients).
        for i in range(nresponses):
            p = (i // 10) % npatients
            instr, top = (PHQ9, 28) if i % 2 == 0 else (GAD7, 22)
            yield (SITES[p % 3], patients[p], instr, instr, "T1-%d" % i, WEEKS[(i // 2) % 5],
                   int(rand() * top), 1 if rand() < 0.01 else 0)

    con.executemany(
        "INSERT INTO questionnaire_responses(trial_id, site_id, patient_id, questionnaire,"
        " instrument, identifier_system, identifier_value, status, authored, authored_s,"
        " visit_week, body, body_sha256, received_ms, processing, score, score_is_int, band,"
        " alert) VALUES('T1',?,?,?,?,'urn:bench',?,'completed','2026-11-20T10:00:00Z',"
        " 1763632800,?,x'7b7d',x'00',1763632800000,'scored',?,1,'none',?)", rows())
    con.execute("INSERT INTO alerts(qr_id, trial_id, site_id, patient_id, kind, created_ms)"
                " SELECT id, trial_id, site_id, patient_id, 'safety', received_ms"
                " FROM questionnaire_responses WHERE alert = 1")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    insert_s = time.monotonic() - t0
    t0 = time.monotonic()
    server.start()
    start_s = time.monotonic() - t0
    status, body = server.request("POST", "/v1/keys", {"role": "investigator", "trial": "T1"},
                                  key=admin)
    assert status == 201, (status, body)
    return json.loads(body)["key"], npatients, insert_s, start_s


def timed_report(server, key, fmt):
    t0 = time.monotonic()
    status, body = server.request("GET", "%s?format=%s&timeout=120s" % (REPORT, fmt), key=key)
    elapsed = time.monotonic() - t0
    if status != 200:
        raise RuntimeError("report %s: %d %s" % (fmt, status, body[:300]))
    return elapsed, len(body)


def reset_hwm(pid):
    """Resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_size(server, key, size, formats, runs):
    out = {}
    pid = server.proc.pid
    out["baseline_kb"] = proc_status_kb(pid, "VmHWM")
    for fmt in formats:
        before_rss = proc_status_kb(pid, "VmRSS")
        reset = reset_hwm(pid)
        before_hwm = proc_status_kb(pid, "VmHWM")
        timed_report(server, key, fmt)  # warm-up: page cache, allocator, fonts
        times, nbytes = [], 0
        for r in range(runs):
            elapsed, nbytes = timed_report(server, key, fmt)
            times.append(elapsed)
            print("  %7d %-4s run %d: %8.3f s  %9d bytes" % (size, fmt, r + 1, elapsed, nbytes),
                  flush=True)
        after_hwm = proc_status_kb(pid, "VmHWM")
        out[fmt] = {"times": times, "bytes": nbytes, "rss_before_kb": before_rss,
                    "hwm_before_kb": before_hwm, "hwm_after_kb": after_hwm, "reset": reset}
    return out


class LogTail:
    """The `report canceled` lines the server has logged since the last call."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            self.offset = f.tell()
        self.partial = b""

    def new_cancels(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            if b'"report canceled"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


def cancel_experiment(server, key, count, fmt, rng, delay_ms):
    """count reports started over a raw socket and abandoned after a random delay (ms range).
    Reports run one at a time: the next starts when the server has ended the previous one."""
    reports_total = "trialhub_reports_total"
    hist = "trialhub_report_cancel_latency_seconds"
    text0 = server.metrics()
    buckets0 = histogram_buckets(text0, hist)
    done0 = metric_sum(text0, reports_total)

    def logged(text):  # computations that log `report canceled`
        return sum(metric_sum(text, reports_total, 'outcome="%s"' % o) -
                   metric_sum(text0, reports_total, 'outcome="%s"' % o)
                   for o in ("client_canceled", "timed_out"))
    tail = LogTail(server.log_path)
    request = ("GET %s?format=%s&timeout=120s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Authorization: Bearer %s\r\n\r\n" % (REPORT, fmt, key)).encode()
    records = []  # per report: delay ms, and the log line if it logged one
    nlogged = 0
    for i in range(count):
        delay = rng.uniform(delay_ms[0], delay_ms[1]) / 1000.0
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(request)
        time.sleep(delay)
        sock.close()
        deadline = time.monotonic() + 120
        while True:  # the computation has ended (canceled, or completed before the close)
            text = server.metrics()
            if metric_sum(text, reports_total) >= done0 + i + 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("report %d never ended" % i)
            time.sleep(0.005)
        want = logged(text)  # the log line follows the metrics by microseconds
        recs = []
        while nlogged + len(recs) < want and time.monotonic() < deadline:
            recs += tail.new_cancels()
            if nlogged + len(recs) < want:
                time.sleep(0.002)
        nlogged += len(recs)
        records.append((delay * 1e3, recs[-1] if recs else None))
        if (i + 1) % 10 == 0:
            print("  cancel %d/%d" % (i + 1, count), flush=True)
    text1 = server.metrics()
    outcomes = {}
    for outcome in ("client_canceled", "completed", "timed_out", "failed", "overloaded"):
        n = metric_sum(text1, reports_total, 'outcome="%s"' % outcome) - \
            metric_sum(text0, reports_total, 'outcome="%s"' % outcome)
        if n:
            outcomes[outcome] = int(n)
    buckets1 = histogram_buckets(text1, hist)
    buckets = [(le, int(buckets1[le] - buckets0.get(le, 0))) for le in buckets1]
    latencies, stages, by_stage, slowest = [], {}, {}, []
    for delay, rec in records:
        if rec and rec.get("reason") == "client" and "cancel_latency_ms" in rec:
            ms = float(rec["cancel_latency_ms"])
            latencies.append(ms)
            stage = rec.get("stage", "?")
            stages[stage] = stages.get(stage, 0) + 1
            by_stage.setdefault(stage, []).append(ms)
            slowest.append((ms, delay, stage))
    slowest.sort(reverse=True)
    return {"outcomes": outcomes, "buckets": buckets, "latencies": latencies, "stages": stages,
            "by_stage": by_stage, "slowest": slowest[:5], "count": count}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trialhub", default=os.path.join(ROOT, "build-bench", "trialhub"))
    ap.add_argument("--sizes", help="responses per trial, comma-separated (default "
                    "10000,100000,1000000)")
    ap.add_argument("--runs", type=int, default=5, help="timed reports per size and format")
    ap.add_argument("--formats", default="json,pdf")
    ap.add_argument("--cancels", type=int, help="abandoned reports on the largest size "
                    "(default 100)")
    ap.add_argument("--cancel-format", default="pdf")
    ap.add_argument("--cancel-delay-ms", default="50,300",
                    help="the socket is closed after a uniform random delay in this range")
    ap.add_argument("--report-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--quick", action="store_true", help="10k and 100k only, 20 cancels")
    args = ap.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench-report: terminated"))
    if args.sizes is None:
        args.sizes = "10000,100000" if args.quick else "10000,100000,1000000"
    if args.cancels is None:
        args.cancels = 20 if args.quick else 100
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = args.formats.split(",")
    delay_ms = [float(v) for v in args.cancel_delay_ms.split(",")]
    if not os.path.exists(args.trialhub):
        sys.exit("bench-report: %s not found (make bench-report builds it)" % args.trialhub)
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="bench-report-")
    began = time.monotonic()
    print("bench-report: %s, %d cores, load average %s, sizes %s, %d runs, %d cancels" % (
        time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(),
        " ".join(open("/proc/loadavg").read().split()[:3]), args.sizes, args.runs, args.cancels),
        flush=True)
    results, seeding, cancel = {}, {}, None
    try:
        for n, size in enumerate(sizes):
            server = Server(args.trialhub, os.path.join(work, "n%d" % size), args.report_threads)
            os.makedirs(server.folder)
            try:
                key, npatients, insert_s, start_s = seed(server, size, rng)
                seeding[size] = (npatients, insert_s, start_s)
                print("  %7d responses, %d patients: inserted in %.1f s, server up in %.1f s"
                      " (pid %d)" % (size, npatients, insert_s, start_s, server.proc.pid),
                      flush=True)
                results[size] = measure_size(server, key, size, formats, args.runs)
                if n == len(sizes) - 1 and args.cancels > 0:
                    cancel = cancel_experiment(server, key, args.cancels, args.cancel_format, rng,
                                               delay_ms)
                    cancel["size"] = size
            finally:
                server.stop()
            if not os.environ.get("BENCH_KEEP"):
                shutil.rmtree(server.folder, ignore_errors=True)
    finally:
        for proc in list(started):
            stop_proc(proc)
        if os.environ.get("BENCH_KEEP"):
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("Reports: wall time as the client sees it, median (min-max) over %d runs after one "
          "warm-up; peak RSS (VmHWM) of the server during that format's reports, after a reset "
          "to the RSS before them." % args.runs)
    print()
    print("| responses | patients | format | time s median (min-max) | size | baseline VmHWM MiB"
          " | RSS before MiB | peak VmHWM MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        res = results[size]
        for fmt in formats:
            r = res[fmt]
            t = r["times"]
            print("| %d | %d | %s | %.3f (%.3f-%.3f) | %s | %.1f | %.1f | %.1f%s |" % (
                size, seeding[size][0], fmt, statistics.median(t), min(t), max(t),
                human_bytes(r["bytes"]), res["baseline_kb"] / 1024, r["rss_before_kb"] / 1024,
                r["hwm_after_kb"] / 1024, "" if r["reset"] else " (no reset)"))
    print()
    print("Seeding: " + ", ".join("%d: insert %.1f s, start %.1f s" % (s, v[1], v[2])
                                  for s, v in seeding.items()))
    if cancel:
        lat = cancel["latencies"]
        print()
        print("Cancellation: %d reports (format=%s) on %d responses, socket closed after "
              "%g-%g ms; outcomes %s; stage at the cancel %s." % (
                  cancel["count"], args.cancel_format, cancel["size"], delay_ms[0],
                  delay_ms[1],
                  ", ".join("%s %d" % kv for kv in sorted(cancel["outcomes"].items())),
                  ", ".join("%s %d" % kv for kv in sorted(cancel["stages"].items())) or "-"))
        print()
        print("| source | n | p50 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|")
        if lat:
            print("| log `report canceled` cancel_latency_ms | %d | %.3f | %.3f | %.3f |" % (
                len(lat), percentile(lat, 0.5), percentile(lat, 0.99), max(lat)))
            if len(cancel["by_stage"]) > 1:
                for stage, v in sorted(cancel["by_stage"].items()):
                    print("| log, stage %s | %d | %.3f | %.3f | %.3f |" % (
                        stage, len(v), percentile(v, 0.5), percentile(v, 0.99), max(v)))
        else:
            print("| log | 0 | - | - | - | (no `report canceled` lines with cancel_latency_ms:"
                  " exact percentiles need one)")
        if cancel["slowest"]:
            print()
            print("Slowest (latency, when the socket was closed, stage): " + ", ".join(
                "%.1f ms (%.0f ms, %s)" % v for v in cancel["slowest"]))
        print()
        print("| histogram le (s) | count | cumulative |")
        print("|---|---|---|")
        prev = 0
        for le, cum in cancel["buckets"]:
            print("| %s | %d | %d |" % (le, cum - prev, cum))
            prev = cum
    print()
    print("bench-report: %.0f s in all" % (time.monotonic() - began))


def human_bytes(n):
    if n >= 1024 * 1024:
        return "%.2f MiB" % (n / 1048576)
    if n >= 1024:
        return "%.1f KiB" % (n / 1024)
    return "%d B" % n


if __name__ == "__main__":
    sys.exit(main())
