"""A real FHIR client nobody here wrote (npm fhir-kit-client, run with the machine's Node.js)
creates a QuestionnaireResponse on trialhub and reads it back, score included, then searches for
it and pages through the results with the client's own nextPage()."""
import json
import os
import shutil
import subprocess
import unittest

from harness import HERE, ServerTest, make_key, phq9

NODE_DIR = os.path.join(HERE, "..", "node")


class FhirKitClient(ServerTest):
    def test_create_and_read(self):
        node = shutil.which("node")
        self.assertIsNotNone(node, "node missing: scripts/deps.sh installs nodejs")
        self.assertTrue(os.path.isdir(os.path.join(NODE_DIR, "node_modules", "fhir-kit-client")),
                        "run scripts/deps.sh (npm ci in tests/node)")
        key = make_key(self.server, self.admin, role="patient", trial="T1", patient="P001")
        env = dict(os.environ, TRIALHUB_BASE="http://127.0.0.1:%d" % self.server.port,
                   TRIALHUB_KEY=key,
                   TRIALHUB_QR=json.dumps(phq9("P001", [1] * 9, ident="fkc-1")))
        out = subprocess.run([node, "fhir_client.mjs"], cwd=NODE_DIR, env=env,
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("created and read", out.stdout)
        self.assertIn("searched 2 pages", out.stdout)


if __name__ == "__main__":
    unittest.main()
