"""The HTTP layer on its own: health, readiness, metrics that promtool accepts, routing answers
(404, 405 with Allow), request ids, keep-alive, connection limits and the slow-client deadline."""
import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

from harness import Server, ServerTest, phq9


class Http(ServerTest):
    server_args = ("--idle-timeout", "2", "--request-timeout", "2",
                   "--max-connections-per-ip", "40")

    def test_health_and_ready(self):
        r = self.server.request("GET", "/healthz")
        self.assertEqual((r.status, r.body), (200, b"ok\n"))
        self.assertEqual(self.server.request("GET", "/readyz").status, 200)

    def test_unknown_route_is_404_problem(self):
        r = self.server.request("GET", "/v1/nothing-here", key=self.admin)
        self.assertEqual(r.status, 404)
        self.assertEqual(r.header("Content-Type"), "application/problem+json")
        self.assertEqual(r.json()["status"], 404)
        r = self.server.request("GET", "/fhir/Nothing")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json()["resourceType"], "OperationOutcome")

    def test_body_to_unknown_route_or_bodiless_route(self):
        r = self.server.request("POST", "/v1/nothing", body=b'{"a":1}' * 1000,
                                headers={"Content-Type": "application/json"}, key=self.admin)
        self.assertEqual(r.status, 404)
        r = self.server.request("DELETE", "/v1/keys/x", body=b"junk",
                                headers={"Content-Type": "text/plain"}, key=self.admin)
        self.assertEqual(r.status, 400)
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)

    def test_wrong_method_is_405_with_allow(self):
        r = self.server.request("DELETE", "/fhir/QuestionnaireResponse", key=self.admin)
        self.assertEqual(r.status, 405)
        self.assertEqual(r.header("Allow"), "POST, GET")  # create and search
        r = self.server.request("PUT", "/v1/keys", key=self.admin)
        self.assertEqual(r.status, 405)
        self.assertIn("GET", r.header("Allow"))
        self.assertIn("POST", r.header("Allow"))

    def test_request_id(self):
        r = self.server.request("GET", "/healthz")
        self.assertRegex(r.header("X-Request-Id"), r"^[0-9a-f]{16}$")
        r = self.server.request("GET", "/healthz", headers={"X-Request-Id": "abc-123"})
        self.assertEqual(r.header("X-Request-Id"), "abc-123")
        r = self.server.request("GET", "/healthz", headers={"X-Request-Id": "bad id!"})
        self.assertNotEqual(r.header("X-Request-Id"), "bad id!")

    def test_keep_alive(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        for _ in range(5):
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            r.read()
            self.assertEqual(r.status, 200)
            self.assertNotEqual((r.getheader("Connection") or "").lower(), "close")
        conn.request("GET", "/v1/keys", headers={"Authorization": "Bearer " + self.admin})
        r = conn.getresponse()
        r.read()
        self.assertEqual(r.status, 200)
        conn.close()

    def test_metrics_pass_promtool(self):
        self.server.request("GET", "/healthz")
        r = self.server.request("GET", "/metrics")
        self.assertEqual(r.status, 200)
        text = r.body.decode()
        for name in ("trialhub_http_requests_total", "trialhub_http_request_duration_seconds",
                     "trialhub_pool_tasks", "trialhub_writer_batch_size",
                     "trialhub_writer_commit_seconds", "trialhub_submissions_total",
                     "trialhub_scoring_events_total"):
            self.assertIn(name, text)
        promtool = shutil.which("promtool")
        if promtool is None:
            self.fail("promtool missing: scripts/deps.sh installs the prometheus package")
        out = subprocess.run([promtool, "check", "metrics"], input=r.body, capture_output=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_oversized_headers_are_refused(self):
        r = self.server.request("GET", "/healthz", headers={"X-Big": "a" * 20000})
        self.assertIn(r.status, (413, 431))
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)

    def test_admin_routes_need_admin(self):
        r = self.server.request("POST", "/v1/keys", {"role": "investigator", "trial": "T1"},
                                key=self.admin)
        investigator = r.json()["key"]
        r = self.server.request("GET", "/v1/keys", key=investigator)
        self.assertEqual(r.status, 403)
        r = self.server.request("GET", "/v1/keys")
        self.assertEqual(r.status, 401)

    def test_slow_header_client_is_dropped(self):
        s = socket.create_connection(("127.0.0.1", self.server.port))
        s.settimeout(10)
        start = time.time()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        try:
            while time.time() - start < 8:
                s.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.5)
        except OSError:
            closed = True
        if not closed:
            try:
                closed = s.recv(100) == b""
            except OSError:
                closed = True
        s.close()
        self.assertTrue(closed, "a client trickling headers was not dropped")
        self.assertLess(time.time() - start, 8)

    def test_per_ip_connection_limit(self):
        socks = []
        try:
            for _ in range(60):
                socks.append(socket.create_connection(("127.0.0.1", self.server.port)))
            time.sleep(0.3)
            refused = 0
            for s in socks:
                s.settimeout(0.5)
                try:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    if s.recv(64) == b"":
                        refused += 1
                except OSError:
                    refused += 1
            self.assertGreaterEqual(refused, 15)
        finally:
            for s in socks:
                s.close()
        time.sleep(0.3)
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)


class Startup(unittest.TestCase):
    def test_bad_database_url_fails_clearly(self):
        s = Server(env={"TRIALHUB_DATABASE_URL": "mysql://x"})
        s.env["TRIALHUB_DATABASE_URL"] = "mysql://x"
        out = subprocess.run([os.environ["TRIALHUB_BIN"], "serve", "--listen", "127.0.0.1:0"],
                             env=s.env, capture_output=True, text=True, timeout=30)
        s.cleanup()
        self.assertEqual(out.returncode, 1)
        self.assertIn("unknown database URL scheme", out.stderr)

    def test_bad_flag_is_usage_error(self):
        out = subprocess.run([os.environ["TRIALHUB_BIN"], "serve", "--nope"],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 2)
        out = subprocess.run([os.environ["TRIALHUB_BIN"], "serve", "--help"],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 0)
        self.assertIn("TRIALHUB_LISTEN", out.stdout)


if __name__ == "__main__":
    unittest.main()
