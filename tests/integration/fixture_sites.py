"""Broken FHIR servers for the collector's test, all in one process, each on its own loopback port
(so each is a separate site base URL, http://127.0.0.1:PORT/fhir):

  hang     accepts and reads the request, never answers (until the client goes away)
  error500 answers 500 with an OperationOutcome
  drop     sends headers with a Content-Length larger than what follows, then closes
  badjson  answers 200 with a body that is not JSON
  forever  pages forever: every page has one valid-looking entry for an unknown patient and a
           `next` link to the following page
  slow     answers an empty searchset after 2 s
  offhost  answers a page whose `next` link points at another host (127.0.0.2), where a trap
           listens: a collector that follows it would hand the site's credential to a stranger
  control  GET /stats: what each fixture saw (requests, Authorization headers, paths, open
           connections now, trap hits) and the peak number of requests the fixtures held at
           once (from a request's arrival to the first byte of its answer)

It prints {"hang": port, ..., "control": port} as one JSON line on stdout when every server
listens, and stops when its stdin closes or on SIGTERM. The 500/drop/badjson/offhost answers come
after a short delay (FIXTURE_DELAY_MS, 300 by default) so that a collector ignoring its in-flight
limit would be seen holding them all at once.
"""
import json
import os
import select
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import phq9  # noqa: E402

DELAY_S = int(os.environ.get("FIXTURE_DELAY_MS", "300")) / 1000.0
FOREVER_PAGE_DELAY_S = int(os.environ.get("FIXTURE_FOREVER_PAGE_MS", "20")) / 1000.0
SLOW_S = int(os.environ.get("FIXTURE_SLOW_MS", "2000")) / 1000.0
# In every entry the forever site serves: never to be echoed in a reason, a log or an answer.
SECRET_ANSWER = "FIXTURE-SECRET-ANSWER-7731"
UNKNOWN_PATIENT = "PZ99"

lock = threading.Lock()
stats = {}
inflight = {"now": 0, "peak": 0}
stopping = threading.Event()


def site_stats(name):
    return stats.setdefault(name, {"requests": 0, "auth": [], "paths": [], "open": 0,
                                   "closed_by_client": 0, "pages": 0})


def now_rfc3339():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def bundle(entries, next_url=None, total=None):
    doc = {"resourceType": "Bundle", "type": "searchset",
           "link": [{"relation": "self", "url": "about:self"}],
           "entry": entries}
    if total is not None:
        doc["total"] = total
    if next_url:
        doc["link"].append({"relation": "next", "url": next_url})
    return json.dumps(doc).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: open connections = requests

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        name = self.server.fixture
        self.counted = name not in ("control", "trap")
        with lock:
            s = site_stats(name)
            s["requests"] += 1
            s["open"] += 1
            s["auth"].append(self.headers.get("Authorization", ""))
            if len(s["paths"]) < 50:
                s["paths"].append(self.path)
            if self.counted:
                inflight["now"] += 1
                inflight["peak"] = max(inflight["peak"], inflight["now"])
        try:
            getattr(self, "site_" + name)()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.answering()
            with lock:
                s["open"] -= 1

    def answering(self):
        """Ends this request's in-flight span: called before the first byte of the answer goes
        out, so that a client starting its next request on receipt is never counted twice."""
        if self.counted:
            self.counted = False
            with lock:
                inflight["now"] -= 1

    def send(self, status, body, ctype="application/fhir+json"):
        self.answering()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def base(self):
        return "http://127.0.0.1:%d/fhir" % self.server.server_address[1]

    def wait(self, seconds):
        """Sleeps, but returns False early if the client closes the connection."""
        deadline = time.monotonic() + seconds
        while not stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    if self.connection.recv(1) == b"":
                        with lock:
                            stats[self.server.fixture]["closed_by_client"] += 1
                        return False
                except OSError:
                    return False
        return False

    def site_hang(self):
        self.wait(3600)

    def site_error500(self):
        if self.wait(DELAY_S):
            self.send(500, json.dumps({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "exception",
                 "diagnostics": "fixture: internal error"}]}).encode())

    def site_drop(self):
        if not self.wait(DELAY_S):
            return
        body = bundle([], total=0)
        self.answering()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (len(body) + 5000))
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def site_badjson(self):
        if self.wait(DELAY_S):
            self.send(200, b'{"resourceType": "Bundle", "type": "searchset", "entry": [ }')

    def site_forever(self):
        query = parse_qs(urlsplit(self.path).query)
        page = int(query.get("page", ["1"])[0])
        if not self.wait(FOREVER_PAGE_DELAY_S):
            return
        qr = phq9(UNKNOWN_PATIENT, [1] * 9, ident="forever-%d" % page,
                  authored="2026-11-21T10:00:00Z")
        qr["item"][0]["answer"][0]["valueCoding"]["display"] = SECRET_ANSWER
        qr["id"] = "f%d" % page
        qr["meta"] = {"versionId": "1", "lastUpdated": now_rfc3339()}
        entry = {"fullUrl": self.base() + "/QuestionnaireResponse/f%d" % page, "resource": qr,
                 "search": {"mode": "match"}}
        with lock:
            stats["forever"]["pages"] = max(stats["forever"]["pages"], page)
        self.send(200, bundle([entry], self.base() + "/QuestionnaireResponse?page=%d&_count=1"
                              % (page + 1)))

    def site_slow(self):
        if self.wait(SLOW_S):
            self.send(200, bundle([], total=0))

    def site_offhost(self):
        if self.wait(DELAY_S):
            self.send(200, bundle([], "http://127.0.0.2:%d/fhir/QuestionnaireResponse?page=2"
                                  % self.server.trap_port, total=1))

    def site_trap(self):
        self.send(200, bundle([], total=0))

    def site_control(self):
        with lock:
            doc = {"sites": json.loads(json.dumps(stats)), "peak_in_flight": inflight["peak"],
                   "in_flight": inflight["now"]}
        self.send(200, json.dumps(doc).encode(), "application/json")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main():
    servers = {}
    trap = Server(("127.0.0.2", 0), Handler)
    trap.fixture = "trap"
    servers["trap"] = trap
    for name in ("hang", "error500", "drop", "badjson", "forever", "slow", "offhost", "control"):
        srv = Server(("127.0.0.1", 0), Handler)
        srv.fixture = name
        srv.trap_port = trap.server_address[1]
        servers[name] = srv
    for name in servers:
        site_stats(name)
    threads = [threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                daemon=True) for srv in servers.values()]
    for t in threads:
        t.start()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def watch_stdin():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        stopping.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    ports = {name: srv.server_address[1] for name, srv in servers.items()}
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    while not stopping.wait(0.2):
        pass
    for srv in servers.values():
        srv.shutdown()
        srv.server_close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
