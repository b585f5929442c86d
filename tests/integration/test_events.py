"""Live events over WebSocket: GET /v1/events (RFC 6455) and POST /v1/events/ticket, against the
real binary. The client is the `ws` package (tests/node/ws_client.mjs, driven over stdin/stdout),
plus raw sockets where a client must misbehave in ways `ws` never would (never answer a ping).

Covers: 401 without a key or with a bad, used or expired ticket; handshake errors (400/426);
subscriptions allowed and refused per role; scope filtering of delivered events (site keys see
only their site); delivery of a real submission.accepted after a POST through the API;
system.stats; malformed messages, too many topics, oversized and binary frames; subprotocol echo;
keepalive (a silent client is dropped, a live one outlives the HTTP idle timeout); a slow client
is closed (1008, counted) instead of slowing the server; the connection and ticket caps (503);
and a clean shutdown with clients connected (1001, exit 0)."""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import unittest

from harness import Server, make_key, phq9, seed

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_CLIENT = os.path.join(HERE, "..", "node", "ws_client.mjs")


class WsDriver:
    """One node process running tests/node/ws_client.mjs; connections are named by the test."""

    def __init__(self):
        self.proc = subprocess.Popen(["node", NODE_CLIENT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.cond = threading.Condition()
        self.events = {}   # id -> [event, ...]
        self.cursor = {}   # id -> index of the first event wait() has not consumed
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait(None, lambda e: e["event"] == "ready")

    def _read(self):
        for line in self.proc.stdout:
            ev = json.loads(line)
            with self.cond:
                self.events.setdefault(ev.get("id"), []).append(ev)
                self.cond.notify_all()

    def cmd(self, **kw):
        self.proc.stdin.write(json.dumps(kw) + "\n")
        self.proc.stdin.flush()

    def open(self, conn_id, url, key=None, protocols=None):
        self.cmd(op="open", id=conn_id, url=url, key=key, protocols=protocols or [])

    def send(self, conn_id, obj):
        self.cmd(op="send", id=conn_id, data=obj if isinstance(obj, str) else json.dumps(obj))

    def wait(self, conn_id, pred, timeout=15):
        """Returns the next event of conn_id matching pred, consuming everything before it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                evs = self.events.get(conn_id, [])
                for i in range(self.cursor.get(conn_id, 0), len(evs)):
                    if pred(evs[i]):
                        self.cursor[conn_id] = i + 1
                        return evs[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%s: no matching event in %ss; got %s" % (
                        conn_id, timeout, evs[-8:]))
                self.cond.wait(left)

    def wait_message(self, conn_id, pred=lambda m: True, timeout=15):
        ev = self.wait(conn_id, lambda e: e["event"] in ("message", "close") and (
            e["event"] == "close" or pred(json.loads(e["data"]))), timeout)
        if ev["event"] == "close":
            raise AssertionError("%s closed: %s" % (conn_id, ev))
        return json.loads(ev["data"])

    def messages(self, conn_id):
        with self.cond:
            return [json.loads(e["data"]) for e in self.events.get(conn_id, [])
                    if e["event"] == "message"]

    def closed(self, conn_id):
        with self.cond:
            return [e for e in self.events.get(conn_id, []) if e["event"] == "close"]

    def connect(self, conn_id, url, key=None, protocols=None):
        """Opens and waits for the handshake; returns the open event."""
        self.open(conn_id, url, key, protocols)
        ev = self.wait(conn_id, lambda e: e["event"] in ("open", "unexpected", "error", "close"))
        assert ev["event"] == "open", ev
        return ev

    def subscribe(self, conn_id, topics):
        """Subscribes; returns (subscribed list, {refused topic: reason})."""
        with self.cond:
            start = self.cursor.get(conn_id, 0)
        self.send(conn_id, {"subscribe": topics})
        ack = self.wait_message(conn_id, lambda m: "subscribed" in m)
        refused = {}
        with self.cond:
            answers = self.events[conn_id][start:self.cursor[conn_id]]
        for e in answers:
            if e["event"] == "message":
                m = json.loads(e["data"])
                if "error" in m and "topic" in m["error"]:
                    refused[m["error"]["topic"]] = m["error"]["reason"]
        return ack["subscribed"], refused

    def close(self):
        try:
            self.cmd(op="exit")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        self.proc.stdin.close()
        self.proc.stdout.close()


def raw_handshake(port, path, key=None, rcvbuf=None):
    """A WebSocket handshake over a plain socket; returns (socket, status line, rest)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    nonce = base64.b64encode(os.urandom(16)).decode()
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n" % (path, nonce))
    if key:
        req += "Authorization: Bearer %s\r\n" % key
    s.sendall((req + "\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return s, head.decode().split("\r\n")[0], rest


def parse_frames(data):
    """Server frames (unmasked) in data: [(opcode, payload)], stopping at an incomplete one."""
    frames = []
    while len(data) >= 2:
        opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + n:
            break
        frames.append((opcode, data[at:at + n]))
        data = data[at + n:]
    return frames


def metric(server, name, labels=""):
    text = server.request("GET", "/metrics").body.decode()
    m = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(fn, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


class EventsServerTest(unittest.TestCase):
    """A seeded server and a node client driver shared by the class."""
    server_args = ()

    @classmethod
    def setUpClass(cls):
        cls.server = Server(cls.server_args)
        cls.admin = cls.server.token("--role", "admin")
        cls.server.start()
        seed(cls.server, cls.admin)
        cls.url = "ws://127.0.0.1:%d/v1/events" % cls.server.port
        cls.ws = WsDriver()

    @classmethod
    def tearDownClass(cls):
        cls.ws.close()
        rc = cls.server.stop()
        log = cls.server.read_log()
        cls.server.cleanup()
        assert rc == 0, "server exit code %s:\n%s" % (rc, log[-4000:])
        for marker in ("Sanitizer", "runtime error"):
            assert marker not in log, log[-4000:]
        assert "tkt_" not in log, "a ticket reached the log"

    def ticket(self, key):
        r = self.server.request("POST", "/v1/events/ticket", key=key)
        self.assertEqual(r.status, 201, r.body)
        return r.json()


class Events(EventsServerTest):
    # Short keepalive and ticket lifetime so that the tests can wait them out; an HTTP idle
    # timeout shorter than the keepalive test proves upgraded connections are exempt from it.
    server_args = ("--ws-ping-interval-ms", "300", "--ws-ticket-ttl-s", "2", "--idle-timeout", "2")

    def test_unauthenticated_is_401(self):
        self.ws.open("noauth", self.url)
        ev = self.ws.wait("noauth", lambda e: e["event"] == "unexpected")
        self.assertEqual(ev["status"], 401)
        self.assertEqual(json.loads(ev["body"])["status"], 401)
        self.ws.open("badkey", self.url, key="thk_not_a_key")
        self.assertEqual(self.ws.wait("badkey", lambda e: e["event"] == "unexpected")["status"],
                         401)
        self.ws.open("badticket", self.url + "?ticket=tkt_" + "A" * 43)
        self.assertEqual(
            self.ws.wait("badticket", lambda e: e["event"] == "unexpected")["status"], 401)
        r = self.server.request("POST", "/v1/events/ticket")
        self.assertEqual(r.status, 401)

    def test_handshake_errors(self):
        r = self.server.request("GET", "/v1/events", key=self.admin)
        self.assertEqual(r.status, 426)
        self.assertEqual(r.header("Upgrade"), "websocket")
        self.assertEqual(r.header("Content-Type"), "application/problem+json")
        base = {"Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        r = self.server.request("GET", "/v1/events", key=self.admin,
                                headers=dict(base, **{"Sec-WebSocket-Version": "8"}))
        self.assertEqual(r.status, 426)
        self.assertEqual(r.header("Sec-WebSocket-Version"), "13")
        r = self.server.request("GET", "/v1/events", key=self.admin,
                                headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                         "Sec-WebSocket-Version": "13"})
        self.assertEqual(r.status, 400)
        r = self.server.request("GET", "/v1/events", key=self.admin,
                                headers=dict(base, **{"Sec-WebSocket-Version": "13",
                                                      "Connection": "keep-alive"}))
        self.assertEqual(r.status, 400)

    def test_accept_header_is_rfc6455(self):
        # The example of RFC 6455 section 1.3, and a Connection header listing more tokens.
        s = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        s.sendall(("GET /v1/events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   "Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Authorization: Bearer %s\r\n\r\n" % self.admin).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        s.close()
        self.assertIn(b"HTTP/1.1 101", data)
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", data)

    def test_ticket_is_single_use_and_expires(self):
        t = self.ticket(self.admin)
        self.assertRegex(t["ticket"], r"^tkt_[A-Za-z0-9_-]{43}$")  # 32 bytes, url-safe
        self.assertEqual(t["expires_in_s"], 2)
        url = self.url + "?ticket=" + t["ticket"]
        self.ws.connect("t1", url)
        subscribed, _ = self.ws.subscribe("t1", ["alerts"])  # the ticket carries the admin key
        self.assertEqual(subscribed, ["alerts"])
        self.ws.open("t1again", url)
        self.assertEqual(self.ws.wait("t1again", lambda e: e["event"] == "unexpected")["status"],
                         401)
        late = self.ticket(self.admin)["ticket"]
        time.sleep(2.3)
        self.ws.open("late", self.url + "?ticket=" + late)
        self.assertEqual(self.ws.wait("late", lambda e: e["event"] == "unexpected")["status"], 401)
        # A refused handshake does not use a ticket up.
        fresh = self.ticket(self.admin)["ticket"]
        r = self.server.request("GET", "/v1/events?ticket=" + fresh)
        self.assertEqual(r.status, 426)
        self.ws.connect("fresh", self.url + "?ticket=" + fresh)
        self.ws.cmd(op="close", id="t1")
        self.ws.cmd(op="close", id="fresh")

    def test_subscriptions_per_role(self):
        investigator = make_key(self.server, self.admin, role="investigator", trial="T1")
        site = make_key(self.server, self.admin, role="site", trial="T1", site="S1")
        patient = make_key(self.server, self.admin, role="patient", trial="T1", patient="P001")
        everything = ["trial:T1", "trial:T2", "alerts", "tasks", "system"]

        self.ws.connect("r-admin", self.url, key=self.admin)
        subscribed, refused = self.ws.subscribe("r-admin", everything + ["weather"])
        self.assertEqual(subscribed, everything)
        self.assertEqual(refused, {"weather": "unknown topic"})

        self.ws.connect("r-inv", self.url, key=investigator)
        subscribed, refused = self.ws.subscribe("r-inv", everything)
        self.assertEqual(subscribed, ["trial:T1", "alerts", "tasks", "system"])
        self.assertEqual(list(refused), ["trial:T2"])

        self.ws.connect("r-site", self.url, key=site)
        subscribed, refused = self.ws.subscribe("r-site", everything)
        self.assertEqual(subscribed, ["trial:T1", "alerts"])
        self.assertEqual(sorted(refused), ["system", "tasks", "trial:T2"])

        self.ws.connect("r-patient", self.url, key=patient)
        subscribed, refused = self.ws.subscribe("r-patient", everything)
        self.assertEqual(subscribed, [])
        self.assertEqual(sorted(refused), sorted(everything))

        # Subscribing again adds topics; unsubscribing removes them.
        subscribed, _ = self.ws.subscribe("r-site", ["alerts"])
        self.assertEqual(subscribed, ["alerts"])
        self.ws.send("r-inv", {"unsubscribe": ["system"]})
        self.assertEqual(self.ws.wait_message("r-inv", lambda m: "unsubscribed" in m),
                         {"unsubscribed": ["system"]})
        for conn_id in ("r-admin", "r-inv", "r-site", "r-patient"):
            self.ws.cmd(op="close", id=conn_id)

    def test_system_stats(self):
        investigator = make_key(self.server, self.admin, role="investigator", trial="T1")
        self.ws.connect("stats", self.url, key=investigator)
        self.ws.subscribe("stats", ["system"])
        stats = self.ws.wait_message("stats", lambda m: m.get("type") == "system.stats")
        self.assertEqual(stats["topic"], "system")
        self.assertRegex(stats["at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(set(stats["pool"]), {"threads", "busy", "queued", "rejected"})
        self.assertEqual(stats["pool"]["threads"], 2)
        self.assertTrue({"queued", "batches", "commit_ms"} <= set(stats["writer"]))
        self.assertGreaterEqual(stats["ws"]["connections"], 1)
        t0 = time.monotonic()
        self.ws.wait_message("stats", lambda m: m.get("type") == "system.stats")
        self.assertLess(time.monotonic() - t0, 3)  # one a second
        self.ws.cmd(op="close", id="stats")

    def test_submission_is_delivered_within_scope(self):
        investigator = make_key(self.server, self.admin, role="investigator", trial="T1")
        site1 = make_key(self.server, self.admin, role="site", trial="T1", site="S1")
        patients = {p: make_key(self.server, self.admin, role="patient", trial="T1", patient=p)
                    for p in ("P001", "P002", "P003")}
        for conn_id, key in (("d-admin", self.admin), ("d-inv", investigator),
                             ("d-site", site1)):
            self.ws.connect(conn_id, self.url, key=key)
            self.assertIn("trial:T1", self.ws.subscribe(conn_id, ["trial:T1"])[0])

        def submitted(conn_id, patient):
            return self.ws.wait_message(conn_id, lambda m: m.get("type") == "submission.accepted"
                                        and m.get("patient") == patient)

        # P001 (site S1), then P002 (site S2), then P003 (site S1).
        locations = {}
        for i, p in enumerate(("P001", "P002", "P003")):
            r = self.server.post_fhir(phq9(p, [1] * 9, ident="ev-%d-%s" % (os.getpid(), p)),
                                      patients[p])
            self.assertEqual(r.status, 201, r.body)
            locations[p] = r.header("Location").lstrip("/").replace("fhir/", "")
        for p in ("P001", "P002", "P003"):
            ev = submitted("d-admin", p)
            self.assertEqual(ev["topic"], "trial:T1")
            self.assertEqual(ev["trial"], "T1")
            self.assertEqual(ev["resource"], locations[p])
            submitted("d-inv", p)
        submitted("d-site", "P001")
        submitted("d-site", "P003")  # events reach a connection in order: P002's would be before
        seen = [m.get("patient") for m in self.ws.messages("d-site")
                if m.get("type") == "submission.accepted"]
        self.assertNotIn("P002", seen)
        for conn_id in ("d-admin", "d-inv", "d-site"):
            self.ws.cmd(op="close", id=conn_id)

    def test_bad_messages(self):
        self.ws.connect("bad", self.url, key=self.admin)
        self.ws.send("bad", "{not json")
        self.assertIn("malformed", self.ws.wait_message("bad", lambda m: "error" in m)
                      ["error"]["reason"])
        self.ws.send("bad", {"subscribe": "alerts"})
        self.assertIn("reason", self.ws.wait_message("bad", lambda m: "error" in m)["error"])
        self.ws.send("bad", {"subscribe": ["alerts"], "extra": 1})
        self.ws.wait_message("bad", lambda m: "error" in m)
        self.assertEqual(self.ws.subscribe("bad", ["alerts"])[0], ["alerts"])  # still open

        cases = (("many", {"subscribe": ["trial:T%d" % i for i in range(17)]}, False, 1008),
                 ("huge", "x" * 5000, False, 1009),
                 ("binary", "abc", True, 1003))
        for conn_id, data, binary, code in cases:
            self.ws.connect(conn_id, self.url, key=self.admin)
            self.ws.cmd(op="send", id=conn_id, binary=binary,
                        data=data if isinstance(data, str) else json.dumps(data))
            ev = self.ws.wait(conn_id, lambda e: e["event"] == "close")
            self.assertEqual(ev["code"], code, conn_id)
        # 16 topics over two messages are fine; the 17th closes.
        self.ws.connect("grow", self.url, key=self.admin)
        self.assertEqual(len(self.ws.subscribe("grow", ["trial:A%d" % i for i in range(10)])[0]),
                         10)
        self.assertEqual(len(self.ws.subscribe("grow", ["trial:B%d" % i for i in range(6)])[0]), 6)
        self.ws.send("grow", {"subscribe": ["alerts"]})
        self.assertEqual(self.ws.wait("grow", lambda e: e["event"] == "close")["code"], 1008)
        self.ws.cmd(op="close", id="bad")

    def test_subprotocol_is_echoed(self):
        ev = self.ws.connect("proto", self.url, key=self.admin, protocols=["trialhub.v1", "x"])
        self.assertEqual(ev["protocol"], "trialhub.v1")
        ev = self.ws.connect("noproto", self.url, key=self.admin)
        self.assertEqual(ev["protocol"], "")
        self.ws.cmd(op="close", id="proto")
        self.ws.cmd(op="close", id="noproto")

    def test_keepalive(self):
        before = metric(self.server, "trialhub_ws_closed_total", '{reason="timeout"}')
        # A client that never answers pings is dropped after two intervals (0.6 s here).
        s, status, rest = raw_handshake(self.server.port, "/v1/events", key=self.admin)
        self.assertIn(" 101 ", status)
        # A `ws` client answers pings by itself and stays, past the HTTP idle timeout (2 s).
        self.ws.connect("alive", self.url, key=self.admin)
        data, t0 = rest, time.monotonic()
        s.settimeout(0.5)
        while time.monotonic() - t0 < 5:
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                break
            data += chunk
        s.close()
        dropped_after = time.monotonic() - t0
        opcodes = [op for op, _ in parse_frames(data)]
        self.assertIn(0x9, opcodes)  # pinged
        self.assertEqual(opcodes[-1], 0x8)  # then a close frame
        self.assertLess(dropped_after, 3)
        self.assertGreaterEqual(
            metric(self.server, "trialhub_ws_closed_total", '{reason="timeout"}'), before + 1)
        time.sleep(max(0, 2.6 - (time.monotonic() - t0)))
        self.assertEqual(self.ws.closed("alive"), [])
        self.assertEqual(self.ws.subscribe("alive", ["alerts"])[0], ["alerts"])
        self.ws.cmd(op="close", id="alive")

    def test_connections_gauge(self):
        self.ws.connect("g1", self.url, key=self.admin)
        self.ws.subscribe("g1", ["alerts"])
        self.assertGreaterEqual(metric(self.server, "trialhub_ws_connections"), 1)
        self.ws.cmd(op="close", id="g1")
        self.ws.wait("g1", lambda e: e["event"] == "close")


class EventsLimits(EventsServerTest):
    # system.stats every millisecond floods a client that stops reading; small caps everywhere.
    server_args = ("--ws-stats-interval-ms", "1", "--ws-send-queue", "8",
                   "--ws-max-connections", "3", "--ws-max-tickets", "2")

    def test_slow_client_is_closed(self):
        before = metric(self.server, "trialhub_ws_closed_total", '{reason="slow"}')
        self.ws.connect("slow", self.url, key=self.admin)
        self.ws.subscribe("slow", ["system"])
        self.ws.wait_message("slow", lambda m: m.get("type") == "system.stats")
        self.ws.cmd(op="pause", id="slow")
        t0 = time.monotonic()
        # The server must stay responsive meanwhile: this polling goes through it.
        wait_until(lambda: metric(self.server, "trialhub_ws_closed_total", '{reason="slow"}')
                   > before, 20, "the slow client to be closed")
        self.assertLess(time.monotonic() - t0, 20)
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)
        self.ws.cmd(op="resume", id="slow")
        ev = self.ws.wait("slow", lambda e: e["event"] == "close")
        self.assertEqual((ev["code"], ev["reason"]), (1008, "send queue overflow"))

    def test_connection_cap(self):
        for i in range(3):
            self.ws.connect("cap%d" % i, self.url, key=self.admin)
        self.ws.open("cap3", self.url, key=self.admin)
        ev = self.ws.wait("cap3", lambda e: e["event"] == "unexpected")
        self.assertEqual(ev["status"], 503)
        self.ws.cmd(op="close", id="cap0")
        self.ws.wait("cap0", lambda e: e["event"] == "close")
        wait_until(lambda: metric(self.server, "trialhub_ws_connections") == 2, 5,
                   "the closed connection to be gone")
        self.ws.connect("cap4", self.url, key=self.admin)
        for conn_id in ("cap1", "cap2", "cap4"):
            self.ws.cmd(op="close", id=conn_id)
            self.ws.wait(conn_id, lambda e: e["event"] == "close")

    def test_ticket_cap(self):
        wait_until(lambda: metric(self.server, "trialhub_ws_connections") == 0, 5,
                   "connections of other tests to be gone")
        first = self.ticket(self.admin)["ticket"]
        self.ticket(self.admin)
        r = self.server.request("POST", "/v1/events/ticket", key=self.admin)
        self.assertEqual(r.status, 503)
        self.assertEqual(r.header("Retry-After"), "1")
        self.ws.connect("capt", self.url + "?ticket=" + first)  # redeeming frees a place
        self.ticket(self.admin)
        self.ws.cmd(op="close", id="capt")
        self.ws.wait("capt", lambda e: e["event"] == "close")


class Shutdown(unittest.TestCase):
    def test_sigterm_closes_websockets_with_1001(self):
        server = Server()
        admin = server.token("--role", "admin")
        server.start()
        ws = WsDriver()
        try:
            url = "ws://127.0.0.1:%d/v1/events" % server.port
            ws.connect("a", url, key=admin)
            ws.subscribe("a", ["system"])
            ws.connect("b", url, key=admin)
            t0 = time.monotonic()
            rc = server.stop(signal.SIGTERM, timeout=30)
            self.assertEqual(rc, 0, server.read_log()[-4000:])
            self.assertLess(time.monotonic() - t0, 10)
            for conn_id in ("a", "b"):
                ev = ws.wait(conn_id, lambda e: e["event"] == "close")
                self.assertEqual((ev["code"], ev["reason"]), (1001, "server shutting down"))
            log = server.read_log()
            for marker in ("Sanitizer", "runtime error"):
                self.assertNotIn(marker, log)
        finally:
            ws.close()
            server.cleanup()


if __name__ == "__main__":
    unittest.main()
