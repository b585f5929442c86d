#!/usr/bin/env python3
"""make bench-collect: one multi-site collection of 200 sites x 500 records (5 pages of 100, each
page after a random 0-200 ms delay) into a fresh trialhub, for each in-flight bound K
(`serve --collect-max-in-flight K`; 1, 4, 16 and 64 by default): total time, records/s, the
server's peak memory and the per-site durations.

One bench/collect/sites.py process serves every site, each on its own loopback port, for the whole
run (its delays are drawn per site and page from a seeded RNG, so every K sees the same ones).
Per K and run, in a fresh temp folder: `trialhub serve --collect-allow-http
--collect-max-in-flight K` on a free loopback port creates trial T1 (arms A, B; weeks 0, 2, 4, 8,
12) and the sites S1..S200 with `PUT /v1/trials/T1/sites/S<i>` (fhir_base_url
http://127.0.0.1:<port>/fhir), and is stopped; the patients (P<i>-<n>, 100 per site) go straight
into its SQLite file with Python's sqlite3, as tests/integration/test_report.py's enrol() does;
then the server is started again. Then `POST /v1/trials/T1/collections?timeout=10m` and
`GET /v1/collections/{id}` every POLL_MS until it is no longer running.

Reported per K: total seconds (the collection's own `started` to `finished`; the client's wall
time from the POST to the first GET that sees it done is printed beside it while it runs),
records accepted, duplicates and rejected (summed over the sites), records/s (accepted / total),
the server's peak RSS (VmHWM from /proc/PID/status, read after the collection: the server has run
nothing else since it started), the server's CPU seconds during the collection (utime + stime),
the per-site duration (the collection's duration_ms: from the site's first request to its last
page handled) p50 and p99, and the most page requests the sites saw open at once. Each run must
store all 100,000 records: the bench checks accepted == sites x records and rejected == 0, and
counts the stored rows in the stopped server's file; it prints a WARNING otherwise (exit 1).
Beside the table, each run's line gives the server's CPU by thread (sampled from /proc/PID/task
at every poll), its commits and mean batch, progress-cache rebuilds and responses scored (deltas
of its /metrics over the collection).

--perf DIR records the server with `perf record --call-graph dwarf,32768 -F 250`
(--perf-record-args) during the largest K's collection (first run) and writes perf.data and two
`perf report --stdio` views into DIR: self.txt (self time by thread, library and function) and
children.txt (inclusive time by thread and function). BENCH_KEEP=1 keeps the temp folder
(databases, server logs, the collections' JSON and the final /metrics).
"""
import argparse
import datetime
import http.client
import json
import os
import select
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
WEEKS = [0, 2, 4, 8, 12]
CLK_TCK = os.sysconf("SC_CLK_TCK")

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


def cpu_s(pid):
    """utime + stime of every thread of pid, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid, seen, baseline=False):
    """Updates seen {tid: [name, cpu s at the first sample, at the last]} from /proc/PID/task.
    Threads seen first in a baseline sample count from then, later ones from zero (they started
    after it); threads that end keep their last sample."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if tid in seen:
            seen[tid][2] = cpu
        else:
            seen[tid] = [name, cpu if baseline else 0.0, cpu]


def cpu_by_thread_name(seen):
    out = {}
    for name, first, last in seen.values():
        out[name] = out.get(name, 0.0) + last - first
    return sorted(((n, c) for n, c in out.items() if c >= 0.05), key=lambda x: -x[1])


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def parse_time(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


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


def http_json(port, method, path, body=None, key=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {}
        if key:
            headers["Authorization"] = "Bearer " + key
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, data
    finally:
        conn.close()


class Sites:
    """bench/collect/sites.py: every site in one process."""

    def __init__(self, args, enrolled_on):
        cmd = [sys.executable, os.path.join(HERE, "sites.py"), "--sites", str(args.sites),
               "--records", str(args.records), "--pages", str(args.pages),
               "--patients", str(args.patients), "--max-delay-ms", str(args.max_delay_ms),
               "--enrolled-on", enrolled_on, "--seed", str(args.seed)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(self.proc)
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError("sites.py did not print its ports")
        doc = json.loads(line)
        self.ports = doc["sites"]
        self.control = doc["control"]

    def stats(self, reset=False):
        return json.loads(http_json(self.control, "GET", "/reset" if reset else "/stats")[1])

    def stop(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_proc(self.proc, timeout=10)


class Server:
    """One `trialhub serve` on its own database in `folder`; stopped by pid."""

    def __init__(self, binary, folder, max_in_flight):
        self.binary = binary
        self.folder = folder
        self.db_path = os.path.join(folder, "trialhub.db")
        self.log_path = os.path.join(folder, "server.log")
        self.env = dict(os.environ, TRIALHUB_DATABASE_URL="sqlite://" + self.db_path)
        self.max_in_flight = max_in_flight
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
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--listen", "127.0.0.1:%d" % self.port,
             "--collect-allow-http", "--collect-max-in-flight", str(self.max_in_flight)],
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
            return None
        stop_proc(self.proc)
        rc = self.proc.returncode
        self.proc = None
        self.log.close()
        return rc

    def request(self, method, path, body=None, key=None, timeout=60):
        return http_json(self.port, method, path, body, key, timeout)


def seed(server, sites, args, enrolled_on):
    """T1 and its sites through the API; the patients straight into the stopped server's file."""
    admin = server.token("--role", "admin")
    server.start()
    status, body = server.request("POST", "/v1/trials", {
        "id": "T1", "name": "Trial one", "arms": ["A", "B"], "schedule_weeks": WEEKS}, key=admin)
    assert status == 201, (status, body)
    for i, port in enumerate(sites.ports, 1):
        status, body = server.request("PUT", "/v1/trials/T1/sites/S%d" % i, {
            "name": "Site %d" % i, "fhir_base_url": "http://127.0.0.1:%d/fhir" % port},
            key=admin)
        assert status in (200, 201), (status, body)
    server.stop()
    con = sqlite3.connect(server.db_path, timeout=30)
    con.executemany("INSERT INTO patients(id, trial_id, site_id, arm, enrolled_on)"
                    " VALUES(?, 'T1', ?, ?, ?)",
                    [("P%d-%d" % (i, n), "S%d" % i, "AB"[n % 2], enrolled_on)
                     for i in range(1, len(sites.ports) + 1) for n in range(args.patients)])
    con.commit()
    con.close()
    server.start()
    return admin


def collect(server, sites, admin, args, perf_dir):
    """One collection: (summary dict, the final collection document)."""
    pid = server.proc.pid
    rss_before = proc_status_kb(pid, "VmRSS")
    sites.stats(reset=True)
    perf = None
    if perf_dir:
        os.makedirs(perf_dir, exist_ok=True)
        perf = subprocess.Popen(["perf", "record", *args.perf_record_args.split(), "-o",
                                 os.path.join(perf_dir, "perf.data"), "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(perf)
        time.sleep(1.0)  # perf attaches to every thread first
    _, counters0 = server_counters(server, admin)
    cpu0, fixture_cpu0 = cpu_s(pid), cpu_s(sites.proc.pid)
    load = float(open("/proc/loadavg").read().split()[0])
    threads = {}
    thread_cpu(pid, threads, baseline=True)
    t0 = time.monotonic()
    status, body = server.request("POST", "/v1/trials/T1/collections?timeout=10m", key=admin)
    if status != 202:
        raise RuntimeError("POST collections: %d %s" % (status, body[:300]))
    cid = json.loads(body)["id"]
    polls = 0
    while True:
        time.sleep(args.poll_ms / 1000.0)
        status, body = server.request("GET", "/v1/collections/" + cid, key=admin)
        polls += 1
        thread_cpu(pid, threads)
        if status != 200:
            raise RuntimeError("GET collection: %d %s" % (status, body[:300]))
        doc = json.loads(body)
        if doc["state"] != "running":
            break
        if time.monotonic() - t0 > 700:
            raise RuntimeError("collection still running after 700 s")
    wall = time.monotonic() - t0
    cpu1, fixture_cpu1 = cpu_s(pid), cpu_s(sites.proc.pid)
    thread_cpu(pid, threads)
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=120)
        started.remove(perf)
        # Flat (self time per thread, library, function) and inclusive (per thread, function).
        for name, opts in (("self.txt", ["--no-children", "--sort", "comm,dso,sym"]),
                           ("children.txt", ["--children", "--sort", "comm,sym"])):
            with open(os.path.join(perf_dir, name), "w") as f:
                subprocess.run(["perf", "report", "-i", os.path.join(perf_dir, "perf.data"),
                                "--stdio", "-g", "none", *opts], stdout=f,
                               stderr=subprocess.DEVNULL, timeout=600)
    hwm = proc_status_kb(pid, "VmHWM")
    metrics_text, counters1 = server_counters(server, admin)
    if os.environ.get("BENCH_KEEP"):
        with open(os.path.join(server.folder, "metrics.txt"), "w") as f:
            f.write(metrics_text)
    counters = {k: counters1[k] - counters0[k] for k in counters0}
    fixture = sites.stats()
    total = parse_time(doc["finished"]) - parse_time(doc["started"])
    sums = {k: sum(s[k] for s in doc["sites"])
            for k in ("received", "accepted", "duplicates", "rejected", "pages")}
    durations = [s["duration_ms"] for s in doc["sites"]]
    states = {}
    for s in doc["sites"]:
        states[s["state"]] = states.get(s["state"], 0) + 1
    reasons = sorted({r for s in doc["sites"] for r in s["reasons"]})
    return {"total_s": total, "wall_s": wall, "polls": polls, "state": doc["state"],
            "load": load, "counters": counters,
            "site_states": states, "reasons": reasons[:5], "rss_before_kb": rss_before,
            "hwm_kb": hwm, "cpu_s": cpu1 - cpu0, "threads": cpu_by_thread_name(threads),
            "fixture_cpu_s": fixture_cpu1 - fixture_cpu0,
            "p50_ms": percentile(durations, 0.5), "p99_ms": percentile(durations, 0.99),
            "max_ms": max(durations) if durations else float("nan"),
            "inflight_peak": fixture["inflight_peak"], "conns_peak": fixture["conns_peak"],
            "conns_total": fixture["conns_total"], "requests": fixture["requests"],
            **sums}, doc


def metric_sum(text, name, labels=""):
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def server_counters(server, admin):
    """A few of the server's own counters: what else the records cost."""
    text = server.request("GET", "/metrics", key=admin)[1].decode()
    return text, {
        "commits": metric_sum(text, "trialhub_writer_batch_size_count"),
        "batched": metric_sum(text, "trialhub_writer_batch_size_sum"),
        "progress_rebuilds": metric_sum(text, "trialhub_progress_events_total",
                                        'event="rebuild"'),
        "progress_dropped": metric_sum(text, "trialhub_progress_events_total",
                                       'event="dropped"'),
        "scored": metric_sum(text, "trialhub_scored_total"),
    }


def stored_rows(db_path):
    con = sqlite3.connect(db_path, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM questionnaire_responses"
                           " WHERE trial_id = 'T1'").fetchone()[0]
    finally:
        con.close()


def one_run(args, sites, k, run, work, enrolled_on, perf_dir):
    folder = os.path.join(work, "k%d-run%d" % (k, run))
    os.makedirs(folder)
    server = Server(args.trialhub, folder, k)
    try:
        t0 = time.monotonic()
        admin = seed(server, sites, args, enrolled_on)
        setup_s = time.monotonic() - t0
        res, doc = collect(server, sites, admin, args, perf_dir)
        if os.environ.get("BENCH_KEEP"):
            with open(os.path.join(folder, "collection.json"), "w") as f:
                json.dump(doc, f, indent=1)
    finally:
        rc = server.stop()
    res["exit"] = rc
    res["stored"] = stored_rows(server.db_path)
    res["setup_s"] = setup_s
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(folder, ignore_errors=True)
    return res


def check(res, expected):
    problems = []
    if res["accepted"] != expected:
        problems.append("accepted %d, not %d" % (res["accepted"], expected))
    if res["rejected"] != 0:
        problems.append("rejected %d" % res["rejected"])
    if res["stored"] != expected:
        problems.append("%d rows stored, not %d" % (res["stored"], expected))
    if res["state"] != "done" or set(res["site_states"]) != {"done"}:
        problems.append("collection %s, sites %s" % (res["state"], res["site_states"]))
    if res["exit"] != 0:
        problems.append("server exit code %s" % res["exit"])
    if res["reasons"]:
        problems.append("reasons: %s" % "; ".join(res["reasons"]))
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trialhub", default=os.path.join(ROOT, "build-bench", "trialhub"))
    ap.add_argument("--ks", default="1,4,16,64", help="in-flight bounds, comma-separated")
    ap.add_argument("--runs", type=int, default=1, help="collections per K (alternating Ks)")
    ap.add_argument("--sites", type=int, default=200)
    ap.add_argument("--records", type=int, default=500, help="records per site")
    ap.add_argument("--pages", type=int, default=5, help="pages per site")
    ap.add_argument("--patients", type=int, default=100, help="patients per site")
    ap.add_argument("--max-delay-ms", type=float, default=200.0,
                    help="each page comes after a uniform random delay of 0 to this")
    ap.add_argument("--poll-ms", type=int, default=100, help="GET /v1/collections/{id} interval")
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--perf", metavar="DIR",
                    help="perf record the server during the largest K's first collection")
    ap.add_argument("--perf-record-args", default="--call-graph dwarf,32768 -F 250",
                    help="perf record's options with --perf (frame pointers, -g, lose most "
                    "callers in the -O3 libraries)")
    args = ap.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so the finally blocks stop the processes started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench-collect: terminated"))
    ks = [int(k) for k in args.ks.split(",")]
    if not os.path.exists(args.trialhub):
        sys.exit("bench-collect: %s not found (make bench-collect builds it)" % args.trialhub)
    expected = args.sites * args.records
    # Enrolled 120 days ago: every visit (weeks 0-12) is in the past, whatever the date.
    enrolled_on = (datetime.date.today() - datetime.timedelta(days=120)).isoformat()
    work = tempfile.mkdtemp(prefix="bench-collect-")
    began = time.monotonic()
    print("bench-collect: %s, %d cores, load average %s; %d sites x %d records (%d pages, "
          "0-%g ms before each), K %s, %d run(s)" % (
              time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(),
              " ".join(open("/proc/loadavg").read().split()[:3]), args.sites, args.records,
              args.pages, args.max_delay_ms, args.ks, args.runs), flush=True)
    results = {}  # (k, run) -> result
    warnings = []
    sites = None
    try:
        t0 = time.monotonic()
        sites = Sites(args, enrolled_on)
        delay_sum = sites.stats()["delay_sum_s"]
        print("  sites.py: %d ports, pages generated in %.1f s (pid %d); the page delays sum to "
              "%.1f s: K sites at once need at least %.1f s / K" % (
                  len(sites.ports), time.monotonic() - t0, sites.proc.pid, delay_sum, delay_sum),
              flush=True)
        for run in range(1, args.runs + 1):
            order = ks if run % 2 else list(reversed(ks))
            for k in order:
                perf_dir = args.perf if args.perf and run == 1 and k == max(ks) else None
                res = one_run(args, sites, k, run, work, enrolled_on, perf_dir)
                results[(k, run)] = res
                problems = check(res, expected)
                print("  K=%-3d run %d: %7.2f s (client %.2f s), accepted %d, dup %d, rejected "
                      "%d, stored %d, %6.0f rec/s, VmHWM %.1f MiB, server CPU %.1f s, sites.py "
                      "CPU %.1f s, site p50 %.0f ms p99 %.0f ms, open requests peak %d, "
                      "connections %d (setup %.1f s)" % (
                          k, run, res["total_s"], res["wall_s"], res["accepted"],
                          res["duplicates"], res["rejected"], res["stored"],
                          res["accepted"] / res["total_s"], res["hwm_kb"] / 1024,
                          res["cpu_s"], res["fixture_cpu_s"], res["p50_ms"], res["p99_ms"],
                          res["inflight_peak"], res["conns_total"], res["setup_s"]), flush=True)
                c = res["counters"]
                print("        load average %.1f; server CPU by thread: %s; commits %d (mean "
                      "batch %.1f), progress rebuilds %d (notes dropped %d), scored %d" % (
                          res["load"], ", ".join("%s %.1f s" % t for t in res["threads"]),
                          c["commits"], c["batched"] / c["commits"] if c["commits"] else 0,
                          c["progress_rebuilds"], c["progress_dropped"], c["scored"]),
                      flush=True)
                for p in problems:
                    msg = "WARNING: K=%d run %d: %s" % (k, run, p)
                    warnings.append(msg)
                    print("  " + msg, flush=True)
    finally:
        if sites:
            sites.stop()
        for proc in list(started):
            stop_proc(proc)
        if os.environ.get("BENCH_KEEP"):
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("%d sites x %d records (%d pages of %d, each after 0-%g ms), one collection per row "
          "into a fresh server; total = the collection's started..finished; records/s = accepted"
          " / total; VmHWM = the server's peak RSS; open requests = the most page requests the "
          "sites saw at once." % (args.sites, args.records, args.pages,
                                  -(-args.records // args.pages), args.max_delay_ms))
    print()
    print("| K | run | total s | accepted | rejected | records/s | peak VmHWM MiB | server CPU s |"
          " site p50 ms | site p99 ms | open requests peak | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        for run in range(1, args.runs + 1):
            r = results.get((k, run))
            if r is None:
                continue
            print("| %d | %d | %.2f | %d | %d | %.0f | %.1f | %.1f | %.0f | %.0f | %d | %.1f |" % (
                k, run, r["total_s"], r["accepted"], r["rejected"], r["accepted"] / r["total_s"],
                r["hwm_kb"] / 1024, r["cpu_s"], r["p50_ms"], r["p99_ms"], r["inflight_peak"],
                r["load"]))
    if args.perf:
        print()
        print("perf: %s/perf.data; %s/self.txt and children.txt" % (args.perf, args.perf))
    for w in warnings:
        print(w)
    print()
    print("bench-collect: %.0f s in all" % (time.monotonic() - began))
    return 1 if warnings else 0


if __name__ == "__main__":
    sys.exit(main())
