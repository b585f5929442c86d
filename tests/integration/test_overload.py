"""Overload sheds instead of collapsing: with a tiny writer queue and many concurrent clients,
every answer is 201 or 503, every 503 carries Retry-After and comes fast, and nothing answered
503 is stored."""
import json
import time
import unittest

from harness import ServerTest, parallel, phq9


class Overload(ServerTest):
    server_args = ("--writer-queue", "2", "--writer-batch", "1")

    def test_only_201_or_503(self):
        def submit(i):
            out = []
            for j in range(15):
                body = json.dumps(phq9("P001", [1] * 9, ident="ov-%d-%d" % (i, j))).encode()
                t0 = time.time()
                r = self.server.post_fhir(body, self.admin)
                out.append((r.status, r.header("Retry-After"), time.time() - t0, r.body))
            return out
        results = [x for chunk in parallel(32, submit) for x in chunk]
        statuses = {s for s, _, _, _ in results}
        self.assertTrue(statuses <= {201, 503}, statuses)
        shed = [x for x in results if x[0] == 503]
        self.assertGreater(len(shed), 0, "no load was shed: the test did not overload")
        for status, retry_after, seconds, body in shed:
            self.assertEqual(retry_after, "1")
            self.assertEqual(json.loads(body)["resourceType"], "OperationOutcome")
        accepted = sum(1 for x in results if x[0] == 201)
        with self.server.db() as db:
            n = db.execute("SELECT count(*) FROM questionnaire_responses"
                           " WHERE identifier_value LIKE 'ov-%'").fetchone()[0]
        self.assertEqual(n, accepted)
        r = self.server.request("GET", "/metrics")
        self.assertIn('trialhub_submissions_total{outcome="overloaded"}', r.body.decode())


if __name__ == "__main__":
    unittest.main()
