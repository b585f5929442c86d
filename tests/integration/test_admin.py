"""Admin API and keys: trials, sites, enrolment, key creation, listing and revocation, with the
errors a client relies on (401, 403, 404, 409, 422), and the token CLI."""
import os
import subprocess
import unittest

from harness import ServerTest, make_key, phq9


class Admin(ServerTest):
    def test_trial_validation_lists_problems(self):
        r = self.server.request("POST", "/v1/trials", {"id": "bad id", "arms": [],
                                                        "schedule_weeks": [4, 2]}, key=self.admin)
        self.assertEqual(r.status, 422)
        pointers = {e["pointer"] for e in r.json()["errors"]}
        self.assertTrue({"/id", "/name", "/arms", "/schedule_weeks/1"} <= pointers, pointers)

    def test_conflicts_and_missing(self):
        r = self.server.request("POST", "/v1/trials", {"id": "T1", "name": "again", "arms": ["A"],
                                                        "schedule_weeks": [0]}, key=self.admin)
        self.assertEqual(r.status, 409)
        r = self.server.request("POST", "/v1/trials/NOPE/sites", {"id": "S9", "name": "x"},
                                key=self.admin)
        self.assertEqual(r.status, 404)
        r = self.server.request("POST", "/v1/trials/T1/patients",
                                {"id": "P001", "site": "S1", "arm": "A",
                                 "enrolled_on": "2026-11-01"}, key=self.admin)
        self.assertEqual(r.status, 409)
        r = self.server.request("POST", "/v1/trials/T1/patients",
                                {"id": "P050", "site": "S9", "arm": "C",
                                 "enrolled_on": "2026-02-30"}, key=self.admin)
        self.assertEqual(r.status, 422)
        pointers = {e["pointer"] for e in r.json()["errors"]}
        self.assertEqual(pointers, {"/site", "/arm", "/enrolled_on"})

    def test_trials_list_by_scope(self):
        r = self.server.request("POST", "/v1/trials", {"id": "TL2", "name": "Listed second",
                                                        "arms": ["X"], "schedule_weeks": [0]},
                                key=self.admin)
        self.assertEqual(r.status, 201)
        r = self.server.request("GET", "/v1/trials", key=self.admin)
        self.assertEqual(r.status, 200)
        by_id = {t["id"]: t for t in r.json()["trials"]}
        self.assertEqual(by_id["T1"], {"id": "T1", "name": "Trial one", "arms": ["A", "B"],
                                       "schedule_weeks": [0, 2, 4, 8, 12]})
        self.assertIn("TL2", by_id)
        for scope in ({"role": "investigator", "trial": "T1"},
                      {"role": "site", "trial": "T1", "site": "S1"}):
            r = self.server.request("GET", "/v1/trials",
                                    key=make_key(self.server, self.admin, **scope))
            self.assertEqual(r.status, 200)
            self.assertEqual([t["id"] for t in r.json()["trials"]], ["T1"], scope)
        patient = make_key(self.server, self.admin, role="patient", trial="T1", patient="P001")
        self.assertEqual(self.server.request("GET", "/v1/trials", key=patient).status, 403)
        self.assertEqual(self.server.request("GET", "/v1/trials").status, 401)

    def test_malformed_json_is_400(self):
        r = self.server.request("POST", "/v1/trials", body=b'{"id": "T9",,}',
                                headers={"Content-Type": "application/json"}, key=self.admin)
        self.assertEqual(r.status, 400)
        self.assertIn("line 1", r.json()["detail"])

    def test_key_lifecycle(self):
        r = self.server.request("POST", "/v1/keys", {"role": "patient", "trial": "T1",
                                                      "patient": "P001"}, key=self.admin)
        self.assertEqual(r.status, 201)
        created = r.json()
        self.assertTrue(created["key"].startswith("thk_"))
        listed = self.server.request("GET", "/v1/keys", key=self.admin).json()["keys"]
        self.assertIn(created["id"], [k["id"] for k in listed])
        self.assertNotIn(created["key"], self.server.request("GET", "/v1/keys",
                                                             key=self.admin).body.decode())
        self.assertEqual(self.server.post_fhir(phq9("P001", [0] * 9), created["key"]).status, 201)
        r = self.server.request("DELETE", "/v1/keys/" + created["id"], key=self.admin)
        self.assertEqual(r.status, 204)
        self.assertEqual(self.server.post_fhir(phq9("P001", [0] * 9), created["key"]).status, 401)
        r = self.server.request("DELETE", "/v1/keys/" + created["id"], key=self.admin)
        self.assertEqual(r.status, 404)

    def test_key_scope_must_fit(self):
        for scope in ({"role": "patient", "trial": "T1"},
                      {"role": "admin", "trial": "T1"},
                      {"role": "site", "trial": "T1", "site": "S7"},
                      {"role": "patient", "trial": "T1", "patient": "P999"},
                      {"role": "boss"}):
            r = self.server.request("POST", "/v1/keys", scope, key=self.admin)
            self.assertEqual(r.status, 422, scope)

    def test_cli_key_works_while_running(self):
        key = self.server.token("--role", "investigator", "--trial", "T1")
        self.assertEqual(self.server.request("GET", "/fhir/Questionnaire", key=key).status, 200)
        out = subprocess.run([os.environ["TRIALHUB_BIN"], "token", "create", "--role", "patient"],
                             env=self.server.env, capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 2)
        self.assertEqual(out.stdout, "")


if __name__ == "__main__":
    unittest.main()
