"""The dashboard (GET /) in a real browser: starts the real binary on a free loopback port, seeds
trial T1 (sites S1 and S2; P001 and P003 at S1, P002 at S2), makes an investigator key and
patient keys, then runs tests/node/dashboard_test.mjs (playwright-core driving Debian's
chromium), which signs in on the page, picks the trial, submits questionnaires through the API
and checks that the page shows the right numbers within 2 s of each 201.

Exit codes: 0 passed, 1 failed, 77 skipped (no /usr/bin/chromium; CTest's SKIP_RETURN_CODE).
The screenshot goes to TRIALHUB_SCREENSHOT (set by CTest to the build folder).
"""
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from harness import Server, gad7, make_key, phq9, seed  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
NODE_DIR = os.path.join(HERE, "..", "node")
SKIP = 77
VISIT_WEEK = "https://trialhub.dev/fhir/StructureDefinition/visit-week"
ENROLLED_ON = datetime.date(2026, 11, 1)  # what harness.seed() enrols everyone on
SCHEDULE_WEEKS = [0, 2, 4, 8, 12]
SITE_OF = {"P001": "S1", "P002": "S2", "P003": "S1"}


def with_week(qr, week):
    qr["extension"] = [{"url": VISIT_WEEK, "valueInteger": week}]
    return qr


def plan(patient_keys):
    """The submissions and, after each, every number the page must show (counted here, not read
    from the server). A visit counts once per patient and scheduled week, whatever the
    instrument; an alert is a PHQ-9 with item 9 above 0."""
    # Visits due by today (UTC): a scheduled week whose day has come.
    days = (datetime.datetime.now(datetime.timezone.utc).date() - ENROLLED_ON).days
    due = sum(1 for w in SCHEDULE_WEEKS if 7 * w <= days)
    submissions = [
        ("P001 PHQ-9 week 0, no alert", "P001", with_week(phq9("P001", [0] * 9, ident="d1"), 0),
         False),
        ("P002 PHQ-9 week 0, item 9 = 2: an alert", "P002",
         with_week(phq9("P002", [1, 1, 0, 0, 0, 0, 0, 0, 2], ident="d2"), 0), True),
        ("P003 GAD-7 week 0", "P003", with_week(gad7("P003", [1] * 7, ident="d3"), 0), False),
        ("P001 GAD-7 week 0: same visit, no new visit", "P001",
         with_week(gad7("P001", [2] * 7, ident="d4"), 0), False),
        ("P001 PHQ-9 week 2, item 9 = 1: an alert at S1", "P001",
         with_week(phq9("P001", [0, 0, 0, 0, 0, 0, 0, 0, 1], ident="d5"), 2), True),
    ]
    count = {"S1": 0, "S2": 0}
    alerts = {"S1": 0, "S2": 0}
    visits = {"S1": set(), "S2": set()}

    def snapshot():
        snap = {
            "enrolled-total": 3, "site-S1-enrolled": 2, "site-S2-enrolled": 1,
            "questionnaires-total": count["S1"] + count["S2"],
            "alerts-open": alerts["S1"] + alerts["S2"],
            "visits-received": len(visits["S1"]) + len(visits["S2"]),
            "visits-expected": 3 * due,
        }
        for s in ("S1", "S2"):
            snap["site-%s-questionnaires" % s] = count[s]
            snap["site-%s-alerts" % s] = alerts[s]
            snap["site-%s-visits-received" % s] = len(visits[s])
            snap["site-%s-visits-expected" % s] = due * list(SITE_OF.values()).count(s)
        return snap

    initial = snapshot()
    steps = []
    for name, patient, qr, alert in submissions:
        site = SITE_OF[patient]
        count[site] += 1
        alerts[site] += 1 if alert else 0
        visits[site].add((patient, qr["extension"][0]["valueInteger"]))
        steps.append({"name": name, "key": patient_keys[patient], "qr": qr, "alert": alert,
                      "patient": patient, "expect": snapshot()})
    # The polling phase (WebSocket blocked) submits one more.
    fallback_qr = with_week(gad7("P002", [0] * 7, ident="d6"), 2)
    count["S2"] += 1
    visits["S2"].add(("P002", 2))
    fallback = {"name": "P002 GAD-7 week 2, page polling", "key": patient_keys["P002"],
                "qr": fallback_qr, "alert": False, "patient": "P002", "expect": snapshot()}
    return {"initial": initial, "steps": steps, "fallback": fallback}


def main():
    if not os.path.exists(CHROMIUM):
        print("SKIP: chromium not installed (scripts/deps.sh installs it)")
        return SKIP
    node = shutil.which("node")
    if node is None:
        print("FAIL: node not found (scripts/deps.sh installs nodejs)")
        return 1
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "playwright-core")):
        print("FAIL: tests/node/node_modules/playwright-core missing (scripts/deps.sh runs npm ci)")
        return 1

    workdir = tempfile.mkdtemp(prefix="trialhub-browser-")
    server = Server(workdir=os.path.join(workdir, "server"))
    os.makedirs(server.dir)
    browser_tmp = os.path.join(workdir, "tmp")  # Chromium leaves org.chromium.* folders here
    os.makedirs(browser_tmp)
    ok = False
    screenshot = os.environ.get("TRIALHUB_SCREENSHOT") or os.path.join(workdir, "dashboard.png")
    try:
        admin = server.token("--role", "admin")
        server.start()
        seed(server, admin)
        investigator = make_key(server, admin, role="investigator", trial="T1")
        patient_keys = {p: make_key(server, admin, role="patient", trial="T1", patient=p)
                        for p in SITE_OF}
        env = dict(os.environ, TMPDIR=browser_tmp,
                   TRIALHUB_BASE="http://127.0.0.1:%d" % server.port,
                   TRIALHUB_KEY=investigator, TRIALHUB_SCREENSHOT=screenshot,
                   TRIALHUB_PLAN=json.dumps(plan(patient_keys)))
        try:
            out = subprocess.run([node, "dashboard_test.mjs"], cwd=NODE_DIR, env=env,
                                 capture_output=True, text=True, timeout=100)
            print(out.stdout, end="")
            print(out.stderr, end="", file=sys.stderr)
            ok = out.returncode == 0
            if not ok:
                print("FAIL: dashboard_test.mjs exited with %d" % out.returncode)
        except subprocess.TimeoutExpired as e:
            print((e.stdout or b"").decode("utf-8", "replace"))
            print("FAIL: dashboard_test.mjs did not finish in 100 s")
    finally:
        rc = server.stop()
        log = server.read_log()
        if rc != 0:
            print("FAIL: server exit code %s" % rc)
            ok = False
        for marker in ("Sanitizer", "runtime error"):
            if marker in log:
                print("FAIL: %s in the server log" % marker)
                ok = False
        if not ok:
            print("--- server log (tail) ---\n" + log[-6000:])
        shutil.rmtree(workdir, ignore_errors=True)
    if ok:
        print("dashboard: passed; screenshot %s" % screenshot)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
