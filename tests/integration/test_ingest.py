"""ePRO ingestion end to end: POST /fhir/QuestionnaireResponse with every answer a client relies
on (201, 200 retry, 409, 400, 422, 403, 415, 413), read-back with score and band, scoring on the
pool, the real MII instruments, and idempotency under concurrent retries."""
import glob
import json
import os
import shutil
import socket
import tempfile
import time
import unittest

from harness import (DATA, ServerTest, gad7, make_key, parallel, phq9)

MII = os.path.join(DATA, "fhir", "mii")


def wait_scored(server, key, location, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = server.request("GET", location, key=key)
        assert r.status == 200, (r.status, r.body)
        ext = processing(r.json())
        if ext.get("status") == "scored":
            return ext
        time.sleep(0.05)
    raise AssertionError("not scored in time")


def processing(resource):
    for e in resource.get("extension", []):
        if e["url"] == "https://trialhub.dev/fhir/StructureDefinition/processing":
            out = {}
            for sub in e["extension"]:
                value = [v for k, v in sub.items() if k.startswith("value")][0]
                out[sub["url"]] = value
            return out
    raise AssertionError("no processing extension")


class Ingest(ServerTest):
    @classmethod
    def setUpClass(cls):
        # The instruments folder holds Questionnaires and CodeSystems only.
        cls.qdir = tempfile.mkdtemp(prefix="trialhub-q-")
        for path in glob.glob(os.path.join(MII, "Questionnaire-*.json")) + glob.glob(
                os.path.join(MII, "CodeSystem-*.json")):
            shutil.copy(path, cls.qdir)
        cls.server_env = {"TRIALHUB_QUESTIONNAIRES": cls.qdir}
        super().setUpClass()
        cls.patient = make_key(cls.server, cls.admin, role="patient", trial="T1", patient="P001")
        cls.site2 = make_key(cls.server, cls.admin, role="site", trial="T1", site="S2")
        cls.investigator = make_key(cls.server, cls.admin, role="investigator", trial="T1")

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.qdir, ignore_errors=True)

    def count_rows(self):
        with self.server.db() as db:
            return db.execute("SELECT count(*) FROM questionnaire_responses").fetchone()[0]

    def test_created_scored_and_read_back(self):
        r = self.server.post_fhir(phq9("P001", [3, 3, 3, 3, 3, 3, 3, 3, 3], ident="full-27"),
                                  self.patient)
        self.assertEqual(r.status, 201, r.body)
        location = r.header("Location")
        self.assertRegex(location, r"^/fhir/QuestionnaireResponse/\d+$")
        self.assertEqual(r.header("ETag"), 'W/"1"')
        self.assertTrue(r.header("X-Request-Id"))
        ext = wait_scored(self.server, self.patient, location)
        self.assertEqual(ext["score"], 27)
        self.assertEqual(ext["band"], "severe")
        self.assertIs(ext["alert"], True)
        with self.server.db() as db:
            n = db.execute("SELECT count(*) FROM alerts a JOIN questionnaire_responses q"
                           " ON q.id = a.qr_id WHERE q.identifier_value = 'full-27'").fetchone()[0]
        self.assertEqual(n, 1)

    def test_bands_and_no_alert(self):
        for scores, total, band in [([1, 1, 1, 1, 0, 0, 0, 0, 0], 4, "minimal"),
                                    ([1, 1, 1, 1, 1, 0, 0, 0, 0], 5, "mild"),
                                    ([2, 2, 2, 2, 2, 2, 2, 0, 0], 14, "moderate"),
                                    ([3, 3, 3, 3, 3, 3, 2, 0, 0], 20, "severe")]:
            r = self.server.post_fhir(phq9("P001", scores), self.patient)
            self.assertEqual(r.status, 201, r.body)
            ext = wait_scored(self.server, self.patient, r.header("Location"))
            self.assertEqual((ext["score"], ext["band"], ext["alert"]), (total, band, False))

    def test_gad7(self):
        r = self.server.post_fhir(gad7("P001", [3, 3, 3, 3, 3, 0, 0]), self.patient)
        self.assertEqual(r.status, 201, r.body)
        ext = wait_scored(self.server, self.patient, r.header("Location"))
        self.assertEqual((ext["score"], ext["band"]), (15, "severe"))

    def test_retry_same_identifier_is_200_same_id(self):
        qr = phq9("P001", [0] * 9, ident="retry-1")
        first = self.server.post_fhir(qr, self.patient)
        self.assertEqual(first.status, 201, first.body)
        again = self.server.post_fhir(qr, self.patient)
        self.assertEqual(again.status, 200, again.body)
        self.assertEqual(again.header("Location"), first.header("Location"))

    def test_same_identifier_other_content_is_409(self):
        self.assertEqual(self.server.post_fhir(phq9("P001", [0] * 9, ident="c-1"),
                                               self.patient).status, 201)
        before = self.count_rows()
        r = self.server.post_fhir(phq9("P001", [1] * 9, ident="c-1"), self.patient)
        self.assertEqual(r.status, 409, r.body)
        self.assertEqual(r.json()["resourceType"], "OperationOutcome")
        self.assertEqual(self.count_rows(), before)

    def test_if_none_exist(self):
        qr = phq9("P001", [1] * 9)
        h = {"If-None-Exist": "identifier=https://app.example.org/submission|ine-1"}
        first = self.server.post_fhir(qr, self.patient, h)
        self.assertEqual(first.status, 201, first.body)
        again = self.server.post_fhir(qr, self.patient, h)
        self.assertEqual(again.status, 200)
        self.assertEqual(again.header("Location"), first.header("Location"))
        bad = self.server.post_fhir(qr, self.patient, {"If-None-Exist": "_id=5"})
        self.assertEqual(bad.status, 400)

    def test_concurrent_retries_make_one_row(self):
        qr = json.dumps(phq9("P001", [2] * 9, ident="storm-1")).encode()
        results = parallel(24, lambda i: self.server.post_fhir(qr, self.patient))
        statuses = sorted(r.status for r in results)
        self.assertEqual(statuses.count(201), 1, statuses)
        self.assertEqual(statuses.count(200), 23, statuses)
        self.assertEqual(len({r.header("Location") for r in results}), 1)
        with self.server.db() as db:
            n = db.execute("SELECT count(*) FROM questionnaire_responses"
                           " WHERE identifier_value = 'storm-1'").fetchone()[0]
        self.assertEqual(n, 1)

    def test_prefer_representation_returns_body(self):
        qr = phq9("P001", [0] * 9, ident="repr-1")
        r = self.server.post_fhir(qr, self.patient, {"Prefer": "return=representation"})
        self.assertEqual(r.status, 201)
        self.assertEqual(r.json()["identifier"]["value"], "repr-1")

    def test_malformed_json_is_400_with_line_and_column(self):
        r = self.server.post_fhir(b'{"resourceType":\n "QuestionnaireResponse",,}', self.patient)
        self.assertEqual(r.status, 400)
        body = r.json()
        self.assertEqual(body["resourceType"], "OperationOutcome")
        self.assertIn("line 2", json.dumps(body))

    def test_duplicate_keys_are_400(self):
        r = self.server.post_fhir(b'{"resourceType":"QuestionnaireResponse",'
                                  b'"resourceType":"QuestionnaireResponse"}', self.patient)
        self.assertEqual(r.status, 400)

    def test_invalid_content_lists_every_problem(self):
        qr = phq9("P001", [0] * 9)
        qr["status"] = "in-progress"
        qr["item"][2]["answer"][0]["valueCoding"]["code"] = "LA9999-9"
        del qr["item"][4]
        qr["item"].append({"linkId": "nope", "answer": [{"valueInteger": 1}]})
        qr["authored"] = "2099-01-01T00:00:00Z"
        before = self.count_rows()
        r = self.server.post_fhir(qr, self.patient)
        self.assertEqual(r.status, 422, r.body)
        issues = r.json()["issue"]
        text = json.dumps(issues)
        for needle in ("status", "44259-0", "44251-7", "item[8].linkId", "authored"):
            self.assertIn(needle, text)
        self.assertGreaterEqual(len(issues), 5)
        self.assertEqual(self.count_rows(), before)

    def test_unknown_questionnaire_and_patient(self):
        r = self.server.post_fhir(phq9("P001", [0] * 9, canonical="http://example.org/q/x"),
                                  self.patient)
        self.assertEqual(r.status, 422)
        r = self.server.post_fhir(phq9("P999", [0] * 9), self.admin)
        self.assertEqual(r.status, 422)
        self.assertIn("enrolled", r.body.decode())

    def test_answers_never_echoed(self):
        qr = phq9("P001", [0] * 9)
        qr["item"][0]["answer"][0]["valueCoding"]["display"] = "SECRET-MARKER-42"
        qr["item"][0]["answer"][0]["valueCoding"]["code"] = "SECRET-CODE-42"
        r = self.server.post_fhir(qr, self.patient)
        self.assertEqual(r.status, 422)
        self.assertNotIn(b"SECRET-MARKER-42", r.body)
        self.assertNotIn("SECRET-MARKER-42", self.server.read_log())
        self.assertNotIn("SECRET-CODE-42", self.server.read_log())

    def test_scope_refusals_store_nothing(self):
        before = self.count_rows()
        # A patient key for someone else's data.
        r = self.server.post_fhir(phq9("P002", [0] * 9), self.patient)
        self.assertEqual(r.status, 403)
        # A site key for a patient of another site (P001 is at S1, the key is for S2).
        r = self.server.post_fhir(phq9("P001", [0] * 9), self.site2)
        self.assertEqual(r.status, 403)
        self.assertEqual(self.count_rows(), before)
        # The site key may submit for its own patient.
        r = self.server.post_fhir(phq9("P002", [0] * 9), self.site2)
        self.assertEqual(r.status, 201)
        # Reads are scoped the same way.
        self.assertEqual(self.server.request("GET", r.header("Location"), key=self.patient).status,
                         403)
        self.assertEqual(self.server.request("GET", r.header("Location"),
                                             key=self.investigator).status, 200)

    def test_auth_required(self):
        r = self.server.post_fhir(phq9("P001", [0] * 9), None)
        self.assertEqual(r.status, 401)
        self.assertEqual(r.header("WWW-Authenticate"), "Bearer")
        r = self.server.post_fhir(phq9("P001", [0] * 9), "thk_not-a-real-key")
        self.assertEqual(r.status, 401)

    def test_wrong_type_and_too_large(self):
        r = self.server.request("POST", "/fhir/QuestionnaireResponse", body=b"{}",
                                headers={"Content-Type": "text/plain"}, key=self.patient)
        self.assertEqual(r.status, 415)
        # Refused from the headers alone: the 2 MiB body is never sent.
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as s:
            s.sendall(b"POST /fhir/QuestionnaireResponse HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer " + self.patient.encode() + b"\r\n"
                      b"Content-Type: application/fhir+json\r\n"
                      b"Content-Length: 2097152\r\n\r\n")
            head = s.recv(4096)
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head[:100])
        # A chunked body that grows past 1 MiB is refused too, and nothing is stored.
        before = self.count_rows()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as s:
            s.sendall(b"POST /fhir/QuestionnaireResponse HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer " + self.patient.encode() + b"\r\n"
                      b"Content-Type: application/fhir+json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"a" * 65536
            for _ in range(20):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            s.sendall(b"0\r\n\r\n")
            head = s.recv(4096)
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head[:100])
        self.assertEqual(self.count_rows(), before)

    def test_get_unknown_is_404(self):
        self.assertEqual(self.server.request("GET", "/fhir/QuestionnaireResponse/999999",
                                             key=self.admin).status, 404)
        self.assertEqual(self.server.request("GET", "/fhir/QuestionnaireResponse/abc",
                                             key=self.admin).status, 404)

    def test_questionnaires_listed(self):
        r = self.server.request("GET", "/fhir/Questionnaire", key=self.patient)
        self.assertEqual(r.status, 200)
        bundle = r.json()
        self.assertEqual(bundle["resourceType"], "Bundle")
        urls = [e["resource"]["url"] for e in bundle["entry"]]
        self.assertIn("http://loinc.org/q/44249-1", urls)
        self.assertIn("http://loinc.org/q/69737-5", urls)
        self.assertTrue(any("mii-qst-pro-phq-9" in u for u in urls))
        r = self.server.request("GET", "/fhir/metadata")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["resourceType"], "CapabilityStatement")

    def test_mii_fixtures_validate_and_score(self):
        expected = {"phq-9": (27, "severe", True), "gad-7": (7, "mild", False),
                    "isr-z": (2, None, False)}
        for name, (score, band, alert) in expected.items():
            with open(os.path.join(MII, "QuestionnaireResponse-mii-exa-pro-%s-response.json"
                                   % name), "rb") as f:
                raw = f.read()
            doc = json.loads(raw)
            doc["subject"] = {"reference": "Patient/P001"}
            doc["identifier"] = {"system": "https://app.example.org/submission",
                                 "value": "mii-" + name}
            r = self.server.post_fhir(json.dumps(doc).encode(), self.patient)
            self.assertEqual(r.status, 201, (name, r.body))
            ext = wait_scored(self.server, self.patient, r.header("Location"))
            self.assertEqual(ext.get("score"), score, name)
            self.assertEqual(ext.get("band"), band, name)
            self.assertEqual(ext.get("alert"), alert, name)

    def test_stored_byte_for_byte(self):
        raw = b'{ "resourceType" : "QuestionnaireResponse",\n' + json.dumps(
            phq9("P001", [1] * 9, ident="bytes-1"))[len('{"resourceType": "QuestionnaireResponse",'):].encode()
        r = self.server.post_fhir(raw, self.patient)
        self.assertEqual(r.status, 201, r.body)
        rid = int(r.header("Location").rsplit("/", 1)[1])
        with self.server.db() as db:
            body = db.execute("SELECT body FROM questionnaire_responses WHERE id = ?",
                              (rid,)).fetchone()[0]
        self.assertEqual(bytes(body), raw)


if __name__ == "__main__":
    unittest.main()
