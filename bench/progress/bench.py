#!/usr/bin/env python3
"""make bench-progress: GET /v1/trials/T1/progress (the progress cache) against GET /healthz (the
HTTP ceiling), alone and with a second wrk posting submissions, on trialhub (th_snapshot
readers), trialhub-rwlock (the same server built with -DTH_PROGRESS_RWLOCK=ON: readers take a
pthread_rwlock_t) and the Go peer (../shared/peers/go-seed: a map under sync.RWMutex).

Each round starts all three afresh (new temp folder, new database, free loopback port) and
seeds them. trialhub gets trial T1 with sites S1-S3 and patients P0001-P1000 (arms A/B,
enrolled over three months, like `serve --demo`) through its admin API, and an investigator key
for T1 that the readers use; the peer seeds T1 itself (4 sites, P0001-P9999; it ignores the
key). Both then take 1 s of POSTs, so the document has counts, scores and alerts before the
first read. The servers are loaded one at a time: per connection count a 2 s warm-up of
progress reads each, then, cell by cell, each server in turn (the first one rotates):
  healthz          wrk -tT -cN -dD -H 'Authorization: ...' GET /healthz: the ceiling
  progress         the same on /v1/trials/T1/progress
  progress+writer  the same, while a second wrk (-t1 -cW) POSTs /fhir/QuestionnaireResponse
                   (writer.lua = ../ingest/fhir_post.lua, flat out or paced with
                   --writer-delay-ms); it starts 0.5 s before the readers, ends 0.5 s after.
Before each cell every server must be idle (the previous cell's tail done), and the script
waits up to --quiet-wait seconds for the rest of the machine to be quiet. /healthz does not
look at the key; the readers' requests are static (no Lua). Medians over the rounds of: req/s,
p50, p99, the share of non-2xx answers (and socket errors), the writer's rate and non-2xx share,
server CPU per answer, CPU seconds of the server, the wrk processes, softirq and everything
else on the machine, and the server's peak RSS during the cell (VmHWM, reset before each cell
through /proc/PID/clear_refs). wrk and the servers share the machine's cores.
"""
import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
POST_SCRIPT = os.path.join(ROOT, "bench", "ingest", "fhir_post.lua")
WRITER_SCRIPT = os.path.join(HERE, "writer.lua")
PROGRESS = "/v1/trials/T1/progress"
SCENARIOS = ("healthz", "progress", "progress+writer")

started = []  # every process this script started and has not yet reaped: stopped by pid on exit


def spawn(cmd, **kw):
    proc = subprocess.Popen(cmd, **kw)
    started.append(proc)
    return proc


def reap(proc, sig=signal.SIGTERM, timeout=60):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in started:
        started.remove(proc)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("not up: " + url)


def proc_status(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak(pid):
    """Resets VmHWM to the current RSS (Linux clear_refs value 5), so the next read is this
    cell's own peak. Returns False where the kernel does not allow it (then VmHWM is cumulative)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parse_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    v = float(m.group(1))
    return v / 1000.0 if m.group(2) == "us" else v * 1000.0 if m.group(2) == "s" else v


def wrk_cmd(url, conns, duration, threads, key, script=None):
    """wrk's command line. Without a script the request is static, with the key in a header;
    the writer's script sets its own headers (FHIR_KEY)."""
    cmd = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % duration, "--latency"]
    if script:
        cmd += ["-s", script]
    else:
        cmd += ["-H", "Authorization: Bearer " + key]
    return cmd + [url]


def parse_wrk(out):
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError("wrk failed:\n" + out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(m.group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
            "p99": parse_ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": sum(int(g) for g in errors.groups()) if errors else 0}


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu(pid):
    """CPU seconds (user + system, all threads) a running process has used so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu():
    """Busy and softirq seconds of the whole machine so far (the /proc/stat cpu line). Softirq
    time (loopback TCP delivery, for a good part) is charged to no process."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v[:8]) - v[3] - v[4]) / hz, v[6] / hz


def finish(proc, timeout):
    """Waits for a wrk run; returns its parsed output with the CPU seconds it used. Only this
    thread reaps children, so the RUSAGE_CHILDREN difference is this one's."""
    before = children_cpu()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        reap(proc, signal.SIGKILL)
    res = parse_wrk(out)
    res["cpu"] = children_cpu() - before
    return res


def wrk(cmd, duration, env=None):
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return finish(proc, duration + 60)


def writer_env(key, delay_ms):
    env = dict(os.environ, FHIR_KEY=key, FHIR_POST_SCRIPT=POST_SCRIPT)
    if delay_ms:
        env["FHIR_DELAY_MS"] = str(delay_ms)
    return env


def drop(folder):
    """A stopped server's folder (database, request log: large after a run) goes at once, or
    stays for a look with BENCH_KEEP=1."""
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(folder, ignore_errors=True)


class Trialhub:
    def __init__(self, name, binary, workdir, sites=3, patients=1000):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="th-progress-", dir=workdir)
        self.env = dict(os.environ, TRIALHUB_DATABASE_URL="sqlite://%s/bench.db" % self.dir)
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        self.admin = subprocess.run([binary, "token", "create", "--role", "admin"], env=self.env,
                                    capture_output=True, text=True, check=True).stdout.strip()
        self.log = open(os.path.join(self.dir, "server.log"), "wb")
        self.proc = spawn([binary, "serve", "--listen", "127.0.0.1:%d" % self.port],
                          env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)
        wait_http(self.base + "/healthz")
        self.seed(sites, patients)

    def call(self, conn, method, path, body):
        conn.request(method, path, body=json.dumps(body),
                     headers={"Authorization": "Bearer " + self.admin,
                              "Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 201:
            raise RuntimeError("%s %s: %d %s" % (method, path, r.status, data[:300]))
        return json.loads(data) if data else None

    def seed(self, nsites, npatients):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.call(conn, "POST", "/v1/trials",
                  {"id": "T1", "name": "Bench trial: weekly PHQ-9", "arms": ["A", "B"],
                   "schedule_weeks": [0, 2, 4, 8, 12]})
        for s in range(1, nsites + 1):
            self.call(conn, "POST", "/v1/trials/T1/sites", {"id": "S%d" % s, "name": "Site %d" % s})
        errors = []

        def enrol(first):  # 8 clients at once: the writer commits them in groups
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                for i in range(first, npatients + 1, 8):
                    self.call(c, "POST", "/v1/trials/T1/patients",
                              {"id": "P%04d" % i, "site": "S%d" % ((i - 1) % nsites + 1),
                               "arm": "A" if i % 2 else "B",
                               "enrolled_on": "2026-%02d-%02d" % (9 + i % 3, 1 + i % 28)})
            except Exception as e:  # reported after the join
                errors.append(e)
            finally:
                c.close()
        threads = [threading.Thread(target=enrol, args=(k,)) for k in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self.key = self.call(conn, "POST", "/v1/keys",
                             {"role": "investigator", "trial": "T1"})["key"]
        conn.close()

    def stop(self):
        reap(self.proc)
        self.log.close()
        drop(self.dir)


class GoSeed:
    def __init__(self, name, binary, workdir):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="go-progress-", dir=workdir)
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        self.admin = self.key = "unused-by-the-peer"
        self.proc = spawn([binary, "-addr", "127.0.0.1:%d" % self.port,
                           "-db", os.path.join(self.dir, "bench.db")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.base + "/healthz")

    def stop(self):
        reap(self.proc)
        drop(self.dir)


def body_len(srv):
    req = urllib.request.Request(srv.base + PROGRESS,
                                 headers={"Authorization": "Bearer " + srv.key})
    with urllib.request.urlopen(req, timeout=10) as r:
        return len(r.read())


def prepare(srv, results):
    """1 s of submissions, so the documents have counts, scores and alerts before the first
    read; then the document's size."""
    wrk(wrk_cmd(srv.base + "/fhir/QuestionnaireResponse", 16, 1, 1, srv.admin, WRITER_SCRIPT),
        1, writer_env(srv.admin, 0))
    time.sleep(1.0)  # the progress documents catch up (trialhub publishes every 250 ms)
    results.setdefault(("bytes", srv.name), []).append(body_len(srv))


def settle(servers, quiet_wait_s):
    """Waits until every server is idle (below 5% of a core over 0.25 s: no cell pays for the
    previous one's tail of scoring, checkpoints, publishes; at most 5 s) and, for at most
    quiet_wait_s more, until the rest of the machine is quiet too (below a quarter of a core):
    the machine is shared, and other people's builds come in bursts. Returns whether it was."""
    deadline = time.time() + 5.0
    quiet_deadline = None
    while True:
        ours0, machine0 = sum(proc_cpu(s.proc.pid) for s in servers), machine_cpu()[0]
        time.sleep(0.25)
        ours = sum(proc_cpu(s.proc.pid) for s in servers) - ours0
        others = machine_cpu()[0] - machine0 - ours
        now = time.time()
        if ours < 0.0125 or now >= deadline:
            quiet_deadline = quiet_deadline or now + quiet_wait_s
            if others < 0.0625:
                return True
            if now >= quiet_deadline:
                return False


def cell(srv, c, scen, args):
    """One measured cell: readers at c connections for args.duration seconds, on /healthz or on
    the progress document, with or without the writer. Returns the readers' result."""
    path = "/healthz" if scen == "healthz" else PROGRESS
    peak_ok = reset_peak(srv.proc.pid)
    writer = None
    if scen == "progress+writer":
        writer = spawn(wrk_cmd(srv.base + "/fhir/QuestionnaireResponse", args.writer_conns,
                               args.duration + 1, 1, srv.admin, WRITER_SCRIPT),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=writer_env(srv.admin, args.writer_delay_ms))
        time.sleep(0.5)
    cpu0, machine0 = proc_cpu(srv.proc.pid), machine_cpu()
    try:
        res = wrk(wrk_cmd(srv.base + path, c, args.duration, args.wrk_threads, srv.key),
                  args.duration)
        if writer:
            res["writer"] = finish(writer, args.duration + 60)
    finally:
        if writer:
            reap(writer, signal.SIGKILL)
    res["server_cpu"] = proc_cpu(srv.proc.pid) - cpu0
    machine1 = machine_cpu()
    res["softirq"] = machine1[1] - machine0[1]
    ours = res["server_cpu"] + res["cpu"] + (res["writer"]["cpu"] if writer else 0.0)
    # everything else on the machine meanwhile: other processes, kernel threads
    res["rest"] = max(machine1[0] - machine0[0] - res["softirq"] - ours, 0.0)
    # server CPU per request answered (reads, plus the writer's POSTs when it runs)
    answered = res["requests"] + (res["writer"]["requests"] if writer else 0)
    res["us_per_req"] = 1e6 * res["server_cpu"] / max(answered, 1)
    res["rss"] = proc_status(srv.proc.pid, "VmHWM")
    res["rss_cell"] = peak_ok
    return res


def log_cell(name, c, scen, res):
    w = res.get("writer")
    print("  %-15s c%-4d %-15s %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms  non-2xx %d%s%s"
          "  RSS %.1f MiB  CPU-s server %.1f (%.1f us/req) wrk %.1f%s softirq %.1f others %.1f" % (
              name, c, scen, res["rps"], res["p50"], res["p99"], res["non2xx"],
              "  errors %d" % res["errors"] if res["errors"] else "",
              "  | writer %.0f req/s non-2xx %d" % (w["rps"], w["non2xx"]) if w else "",
              res["rss"], res["server_cpu"], res["us_per_req"], res["cpu"],
              " writer %.1f" % w["cpu"] if w else "", res["softirq"], res["rest"]), flush=True)


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def share(runs, key="non2xx"):
    total = sum(r["requests"] for r in runs)
    bad = sum(r[key] for r in runs)
    return "0" if bad == 0 else "%.2f%%" % (100.0 * bad / max(total, 1))


def ratio(a, b, key):
    return med(a, key) / med(b, key)


def report(results, args, names):
    """One Markdown table, then the goals. Ratios are of medians. A run in which the machine's
    other users took more than --noise-limit of the cell's CPU is left out of the medians when
    the cell has at least one run below it (the table says how many runs it used)."""
    limit = args.noise_limit * os.cpu_count() * args.duration

    def get(key):
        runs = results.get(key)
        if not runs:
            return runs
        clean = [r for r in runs if r["rest"] <= limit]
        return clean or runs

    print()
    print("| server | conns | load | runs | req/s median (min-max) | vs own healthz | vs go-seed |"
          " p50 / p99 ms | non-2xx | writer req/s (non-2xx) | server CPU us/req |"
          " CPU-s server / wrk / writer / softirq / others | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for c in args.conns:
            ceiling = get((name, c, "healthz"))
            for scen in SCENARIOS:
                runs = get((name, c, scen))
                if not runs:
                    continue
                used = "%d/%d" % (len(runs), len(results[(name, c, scen)]))
                rps = [r["rps"] for r in runs]
                vs_h = vs_go = ""
                if ceiling and scen != "healthz":
                    vs_h = "%.0f%%" % (100 * ratio(runs, ceiling, "rps"))
                go = get(("go-seed", c, scen))
                if go and name != "go-seed" and scen != "healthz":
                    vs_go = "%.2fx" % ratio(runs, go, "rps")
                errs = sum(r["errors"] for r in runs)
                bad = share(runs) + (" (+%d socket errors)" % errs if errs else "")
                ws = [r["writer"] for r in runs if "writer" in r]
                wcol = "%.0f (%s)" % (med(ws, "rps"), share(ws)) if ws else ""
                cpu = "%.1f / %.1f / %s / %.1f / %.1f" % (
                    med(runs, "server_cpu"), med(runs, "cpu"),
                    "%.1f" % med(ws, "cpu") if ws else "-", med(runs, "softirq"),
                    med(runs, "rest"))
                print("| %s | %d | %s | %s | %.0f (%.0f-%.0f) | %s | %s | %.2f / %.2f | %s | %s |"
                      " %.1f | %s | %.1f |" % (
                          name, c, scen, used, statistics.median(rps), min(rps), max(rps), vs_h,
                          vs_go, med(runs, "p50"), med(runs, "p99"), bad, wcol,
                          med(runs, "us_per_req"), cpu, med(runs, "rss")))
    sizes = ", ".join("%s %d B" % (n, statistics.median(results[("bytes", n)]))
                      for n in names if ("bytes", n) in results)
    cells = [r for k, runs in results.items() if k[0] != "bytes" for r in runs]
    print()
    print("Progress document: %s. CPU-s: of the %d that %d cores give per %d s cell; softirq is"
          " the kernel's (mostly loopback TCP), charged to no process; others: every other process"
          " and kernel thread (what the machine's other users took from the cell). Server CPU"
          " us/req: per answer, the writer's POSTs included. Peak RSS: VmHWM %s. Runs: those used"
          " / those made; a run is left out when the others took more than %.0f%% of its CPU and"
          " a cleaner one exists. Cells started on a quiet machine: %d of %d." % (
              sizes, os.cpu_count() * args.duration, os.cpu_count(), args.duration,
              "during the cell" if all(r.get("rss_cell") for r in cells)
              else "since the server started", 100 * args.noise_limit,
              sum(1 for r in cells if r.get("quiet_start")), len(cells)))
    for c in args.conns:
        for name in names:
            if name == "go-seed":
                continue
            h, p = get((name, c, "healthz")), get((name, c, "progress"))
            pw, go = get((name, c, "progress+writer")), get(("go-seed", c, "progress"))
            bits = []
            for label, a, b, goal in (("alone", p, h, 0.9), ("with writer", pw, h, 0.8)):
                if a and b:
                    r = ratio(a, b, "rps")
                    verdict = "met" if r >= goal else "MISSED, goal %.0f%%" % (100 * goal)
                    bits.append("%s %.0f%% of healthz (%s)" % (label, 100 * r, verdict))
            if p and go:
                r = ratio(p, go, "rps")
                bits.append("%.2fx go-seed (%s)" % (r, "met" if r >= 1.5 else "MISSED, goal 1.5x"))
            if bits:
                print("goals %s c%d: %s" % (name, c, "; ".join(bits)))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trialhub", default=os.path.join(ROOT, "build-bench", "trialhub"))
    ap.add_argument("--trialhub-rwlock",
                    default=os.path.join(ROOT, "build-bench-rwlock", "trialhub"))
    ap.add_argument("--peer", default=os.path.join(ROOT, "build-bench", "go-seed"))
    ap.add_argument("--servers", default="trialhub,trialhub-rwlock,go-seed",
                    help="which servers, comma-separated (default: all three)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; medians over them (default 3)")
    ap.add_argument("--duration", type=int, default=8, help="seconds per cell (default 8)")
    ap.add_argument("--conns", default="64,512", help="reader connections (default 64,512)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="reader wrk -t (default 1)")
    ap.add_argument("--writer-conns", type=int, default=16, help="writer connections (16)")
    ap.add_argument("--quiet-wait", type=float, default=2.0,
                    help="before a cell, wait at most this long for other load to stop (2 s)")
    ap.add_argument("--noise-limit", type=float, default=0.125,
                    help="leave out runs in which other processes took more than this share of"
                    " the CPU, when the cell has a cleaner run (0.125)")
    ap.add_argument("--writer-delay-ms", type=int, default=0,
                    help="writer pace: each connection waits this long per request (0: flat out)")
    args = ap.parse_args()
    args.conns = [int(c) for c in args.conns.split(",")]
    binaries = {"trialhub": args.trialhub, "trialhub-rwlock": args.trialhub_rwlock,
                "go-seed": args.peer}
    names = []
    for name in args.servers.split(","):
        if name not in binaries:
            ap.error("unknown server " + name)
        if os.path.exists(binaries[name]):
            names.append(name)
        else:
            print("bench-progress: %s not built (%s): skipped" % (name, binaries[name]))
    work = tempfile.mkdtemp(prefix="bench-progress-")  # BENCH_KEEP=1 keeps it (server logs)
    t0 = time.time()
    print("bench-progress: %s, %d cores, load average %s; %d rounds of %d s cells; readers "
          "wrk -t%d, writer wrk -t1 -c%d%s" % (
              time.strftime("%Y-%m-%d %H:%M %Z"), os.cpu_count(),
              " ".join("%.2f" % x for x in os.getloadavg()), args.runs, args.duration,
              args.wrk_threads, args.writer_conns,
              " paced %d ms" % args.writer_delay_ms if args.writer_delay_ms else " flat out"),
          flush=True)

    def log(line):
        print(line, flush=True)

    results = {}
    turn = 0  # rotates which server goes first, cell after cell
    try:
        for r in range(args.runs):
            print("round %d: fresh servers (%s)" % (r + 1, ", ".join(names)), flush=True)
            servers = []
            try:
                for name in names:
                    cls = GoSeed if name == "go-seed" else Trialhub
                    servers.append(cls(name, binaries[name], work))
                    prepare(servers[-1], results)
                for c in args.conns:
                    for srv in servers:
                        settle(servers, 0)
                        wrk(wrk_cmd(srv.base + PROGRESS, c, 2, args.wrk_threads, srv.key), 2)
                    for scen in SCENARIOS:
                        order = servers[turn % len(servers):] + servers[:turn % len(servers)]
                        turn += 1
                        for srv in order:
                            quiet = settle(servers, args.quiet_wait)
                            res = cell(srv, c, scen, args)
                            res["quiet_start"] = quiet
                            results.setdefault((srv.name, c, scen), []).append(res)
                            log_cell(srv.name, c, scen, res)
            finally:
                for srv in servers:
                    srv.stop()
    finally:
        for proc in list(started):  # only what this script started, by pid
            reap(proc, signal.SIGKILL)
        if os.environ.get("BENCH_KEEP"):
            print("kept " + work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(results, args, names)
    print("bench-progress: %.0f s" % (time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
