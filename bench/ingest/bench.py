#!/usr/bin/env python3
"""make bench-ingest: trialhub's durable ingestion against the Go peer (../shared/peers/go-seed),
and its HTTP layer against nginx, side by side on this machine, alternating runs.

Sections (each starts fresh servers with fresh databases):
  post     POST /fhir/QuestionnaireResponse, new identifier per request (fhir_post.lua)
  get      GET of one stored QuestionnaireResponse (trialhub only: the peer has no read)
  healthz  GET /healthz (trialhub, the peer) and a fixed body from nginx: the HTTP ceiling
For every concurrency: a 2 s warm-up per server, then RUNS rounds of `wrk -t1 -cN -dD --latency`,
alternating which server goes first. Prints medians (RPS, p50, p99) and each server's peak RSS
(VmHWM), and, for POST at the highest concurrency, one extra counted run giving the status codes.
wrk and the servers share the machine's cores, as in the peer's README.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
PEER_SRC = os.path.abspath(os.path.join(ROOT, "..", "shared", "peers", "go-seed"))


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


def vmhwm_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def parse_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    v = float(m.group(1))
    return v / 1000.0 if m.group(2) == "us" else v * 1000.0 if m.group(2) == "s" else v


def wrk(url, conns, duration, script=None, env=None):
    cmd = ["wrk", "-t1", "-c%d" % conns, "-d%ds" % duration, "--latency"]
    if script:
        cmd += ["-s", os.path.join(HERE, script)]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = parse_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    counts = re.search(r"status_counts(.*)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "counts": counts.group(1).strip() if counts else "", "raw": out}


class Trialhub:
    name = "trialhub"

    def __init__(self, binary, workdir):
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="th-bench-", dir=workdir)
        self.env = dict(os.environ, TRIALHUB_DATABASE_URL="sqlite://%s/bench.db" % self.dir)
        self.port = free_port()
        self.key = subprocess.run([binary, "token", "create", "--role", "admin"], env=self.env,
                                  capture_output=True, text=True, check=True).stdout.strip()
        self.log = open(os.path.join(self.dir, "server.log"), "wb")
        self.proc = subprocess.Popen([binary, "serve", "--demo", "--listen",
                                      "127.0.0.1:%d" % self.port], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.base = "http://127.0.0.1:%d" % self.port
        wait_http(self.base + "/healthz")

    def stop(self):
        try:  # the server's own view of the run, kept with BENCH_KEEP=1
            with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r, \
                    open(os.path.join(self.dir, "metrics.txt"), "wb") as f:
                f.write(r.read())
        except OSError:
            pass
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()
        if os.environ.get("BENCH_KEEP"):
            print("  kept %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class GoSeed:
    name = "go-seed"

    def __init__(self, binary, workdir):
        self.dir = tempfile.mkdtemp(prefix="go-bench-", dir=workdir)
        self.port = free_port()
        self.key = "unused"
        self.proc = subprocess.Popen([binary, "-addr", "127.0.0.1:%d" % self.port, "-db",
                                      os.path.join(self.dir, "bench.db")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = "http://127.0.0.1:%d" % self.port
        wait_http(self.base + "/healthz")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx:
    name = "nginx"

    def __init__(self, workdir):
        self.dir = tempfile.mkdtemp(prefix="nginx-bench-", dir=workdir)
        self.port = free_port()
        self.key = "unused"
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write("""daemon off; worker_processes 2; pid %(d)s/nginx.pid;
error_log %(d)s/error.log; events { worker_connections 4096; }
http { access_log off; client_body_temp_path %(d)s; proxy_temp_path %(d)s;
  fastcgi_temp_path %(d)s; uwsgi_temp_path %(d)s; scgi_temp_path %(d)s;
  server { listen 127.0.0.1:%(p)d; location / { return 200 "ok\\n"; } } }
""" % {"d": self.dir, "p": self.port})
        self.proc = subprocess.Popen(["nginx", "-c", conf, "-p", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = "http://127.0.0.1:%d" % self.port
        wait_http(self.base + "/healthz")

    def stop(self):
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def peak_rss(server):
    """VmHWM of the server's process tree (nginx: master plus workers)."""
    pids = [server.proc.pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                             text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    return sum(vmhwm_mib(p) for p in pids)


def section(name, servers, path, script, conns, runs, duration, results):
    for c in conns:
        for s in servers:
            wrk(s.base + path(s), c, 2, script, dict(os.environ, FHIR_KEY=s.key))
        for r in range(runs):
            order = servers if r % 2 == 0 else list(reversed(servers))
            for s in order:
                res = wrk(s.base + path(s), c, duration, script, dict(os.environ, FHIR_KEY=s.key))
                results.setdefault((name, s.name, c), []).append(res)
                print("  %-8s %-9s c%-4d run %d: %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms%s" % (
                    name, s.name, c, r + 1, res["rps"], res["p50"], res["p99"],
                    "  non-2xx %d" % res["non2xx"] if res["non2xx"] else ""), flush=True)
        for s in servers:
            results.setdefault(("rss", name, s.name, c), peak_rss(s))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trialhub", default=os.path.join(ROOT, "build-bench", "trialhub"))
    ap.add_argument("--peer", default=os.path.join(ROOT, "build-bench", "go-seed"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", default="64,512")
    ap.add_argument("--sections", default="post,get,healthz")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    work = tempfile.mkdtemp(prefix="bench-ingest-")  # BENCH_KEEP=1 keeps it (server logs)
    have_peer = os.path.exists(args.peer)
    have_nginx = shutil.which("nginx") is not None
    print("bench-ingest: %s, %d cores, %s" % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(),
                                              "peer built" if have_peer else "NO peer"))
    results = {}
    try:
        for name in args.sections.split(","):
            servers = [Trialhub(args.trialhub, work)]
            if name in ("post", "healthz") and have_peer:
                servers.append(GoSeed(args.peer, work))
            if name == "healthz" and have_nginx:
                servers.append(Nginx(work))
            try:
                if name == "post":
                    section(name, servers, lambda s: "/fhir/QuestionnaireResponse",
                            "fhir_post.lua", conns, args.runs, args.duration, results)
                    for s in servers:
                        res = wrk(s.base + "/fhir/QuestionnaireResponse", max(conns), 5,
                                  "fhir_post.lua",
                                  dict(os.environ, FHIR_KEY=s.key, FHIR_COUNT_STATUS="1"))
                        results[("counts", s.name)] = res["counts"]
                        print("  statuses at c%d, %s: %s" % (max(conns), s.name, res["counts"]))
                elif name == "get":
                    th = servers[0]
                    req = urllib.request.Request(
                        th.base + "/fhir/QuestionnaireResponse", method="POST",
                        data=open(os.path.join(ROOT, "examples", "phq9-response.json"),
                                  "rb").read(),
                        headers={"Authorization": "Bearer " + th.key,
                                 "Content-Type": "application/fhir+json"})
                    with urllib.request.urlopen(req) as r:
                        location = r.headers["Location"]
                    section(name, servers, lambda s: location, "get_auth.lua", conns, args.runs,
                            args.duration, results)
                else:
                    section(name, servers, lambda s: "/healthz", None, conns, args.runs,
                            args.duration, results)
            finally:
                for s in servers:
                    s.stop()
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("| endpoint | server | conns | req/s median (min-max) | p50 ms | p99 ms median (min-max)"
          " | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        if key[0] in ("rss", "counts"):
            continue
        name, server, c = key
        rps = [r["rps"] for r in runs]
        p99 = [r["p99"] for r in runs]
        print("| %s | %s | %d | %.0f (%.0f-%.0f) | %.2f | %.2f (%.2f-%.2f) | %.1f |" % (
            name, server, c, statistics.median(rps), min(rps), max(rps),
            statistics.median(r["p50"] for r in runs), statistics.median(p99), min(p99),
            max(p99), results[("rss", name, server, c)]))
    for (kind, *rest), value in results.items():
        if kind == "counts":
            print("statuses at c%d (%s): %s" % (max(conns), rest[0], value))
    ratios = []
    for c in conns:
        th, go = results.get(("post", "trialhub", c)), results.get(("post", "go-seed", c))
        if th and go:
            ratios.append("c%d %.2fx" % (c, statistics.median(r["rps"] for r in th) /
                                          statistics.median(r["rps"] for r in go)))
        th, ng = results.get(("healthz", "trialhub", c)), results.get(("healthz", "nginx", c))
        if th and ng:
            ratios.append("healthz/nginx c%d %.0f%%" % (c, 100 * statistics.median(
                r["rps"] for r in th) / statistics.median(r["rps"] for r in ng)))
    if ratios:
        print("ratios (medians): trialhub/go-seed POST " + ", ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())
