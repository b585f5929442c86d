"""`trialhub analyze`, the reference analyzer, run as a worker runs it: a child process with one
JSON request on stdin and one JSON result on stdout. On the DICOM images of the dicom_images
fixture (tests/data/dicom/make_images.py: pydicom and dcmtk's img2dcm), its numbers must match
numpy's on pydicom's pixel_array (histogram counts exactly); custom windows and bins too; bad
requests exit 2 and unreadable images 3, with {"error": ...} and no patient data; SIGTERM stops
it at once even when the parent blocked or ignored the signal; and analyzers/ct_stats.py, the
Python analyzer that speaks the same protocol, agrees with it.

Needs numpy and pydicom: Debian's, for /usr/bin/python3 (TH_DICOM_PYTHON), which may not be the
python3 CTest found; the script re-runs itself with that interpreter when needed.
"""
import os
import sys

try:
    import numpy as np
    import pydicom
except ImportError:
    PY = os.environ.get("TH_DICOM_PYTHON", "/usr/bin/python3")
    if os.path.realpath(sys.executable) != os.path.realpath(PY) and os.path.exists(PY):
        os.execv(PY, [PY] + sys.argv)
    raise

import json
import signal
import subprocess
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
BIN = os.environ.get("TRIALHUB_BIN", os.path.join(ROOT, "build", "trialhub"))
IMAGES = os.environ.get("TH_TEST_DICOM_DIR", os.path.join(ROOT, "build", "tests", "dicom"))
CT_STATS = os.path.join(ROOT, "analyzers", "ct_stats.py")
PYTHON = os.environ.get("TH_DICOM_PYTHON", "/usr/bin/python3")


def run(request, argv=None, timeout=60, raw=None):
    """Runs the analyzer on one request; returns (exit status, parsed stdout)."""
    data = raw if raw is not None else json.dumps(request).encode()
    proc = subprocess.run(argv or [BIN, "analyze"], input=data, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)
    out = proc.stdout.decode()
    lines = [line for line in out.splitlines() if line.strip()]
    if len(lines) != 1:
        raise AssertionError("expected one JSON line, got %r (stderr %r)" % (out, proc.stderr))
    return proc.returncode, json.loads(lines[0])


def numpy_view(path, windows=None, bins=64):
    """What the analyzer should say, from pydicom's pixel_array and numpy."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.int64)
    slope, intercept = 1.0, 0.0
    if int(ds.SamplesPerPixel) == 1 and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
    values = (stored.astype(np.float64) * slope + intercept).ravel()
    counts, edges = np.histogram(values, bins=bins)
    result = {"min": float(values.min()), "max": float(values.max()),
              "mean": float(values.mean()), "counts": [int(c) for c in counts],
              "hist_min": float(edges[0]), "hist_max": float(edges[-1]),
              "pixels": int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "NumberOfFrames", 1) or 1)}
    if windows is not None:
        result["fractions"] = [float(np.count_nonzero((values >= w["min"]) & (values <= w["max"]))
                                     / values.size) for w in windows]
    return result


class AnalyzeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(IMAGES, "manifest.json")) as f:
            cls.manifest = json.load(f)

    def path(self, name):
        return os.path.join(IMAGES, name)

    def check_against(self, got, exp):
        self.assertEqual(got["min"], exp["min"])
        self.assertEqual(got["max"], exp["max"])
        self.assertAlmostEqual(got["mean"], exp["mean"], delta=1e-12 * max(1, abs(exp["mean"])))
        self.assertEqual(got["histogram"]["counts"], exp["counts"])
        self.assertEqual(got["histogram"]["min"], exp["hist_min"])
        self.assertEqual(got["histogram"]["max"], exp["hist_max"])
        self.assertEqual(got["pixels"], exp["pixels"])

    def test_1_every_image_against_numpy(self):
        decoded = 0
        for entry in self.manifest["files"]:
            name = entry["file"]
            with self.subTest(image=name):
                status, got = run({"task": "task-" + name, "image": self.path(name)})
                if entry["read"] != "ok":
                    self.assertEqual(status, 3, got)
                    self.assertIn("error", got)
                    for secret in self.manifest["patient"].values():
                        self.assertNotIn(secret, got["error"])
                    continue
                self.assertEqual(status, 0, got)
                decoded += 1
                exp = entry["expected"]
                self.assertEqual(got["task"], "task-" + name)
                self.assertEqual((got["rows"], got["columns"], got["modality"]),
                                 (exp["rows"], exp["columns"], exp["modality"]))
                self.assertEqual(got["histogram"]["bins"], 64)
                self.check_against(got, numpy_view(self.path(name)))
                self.assertEqual([(w["name"], w["min"], w["max"], w["fraction"])
                                  for w in got["windows"]],
                                 [(w["name"], w["min"], w["max"], w["fraction"])
                                  for w in exp["windows"]])
                text = json.dumps(got)
                for secret in self.manifest["patient"].values():
                    self.assertNotIn(secret, text)
        self.assertGreaterEqual(decoded, 7)

    def test_2_custom_windows_and_bins(self):
        windows = [{"name": "lung", "min": -1000, "max": -400},
                   {"name": "soft", "min": -160, "max": 240},
                   {"name": "point", "min": 40.5, "max": 40.5}]
        for name, bins in [("ct_explicit_signed.dcm", 7), ("ct_implicit_12bit.dcm", 256),
                           ("us_8bit.dcm", 1)]:
            with self.subTest(image=name):
                status, got = run({"task": "t", "image": self.path(name), "modality": "CT",
                                   "parameters": {"windows": windows, "bins": bins}})
                self.assertEqual(status, 0, got)
                exp = numpy_view(self.path(name), windows, bins)
                self.check_against(got, exp)
                self.assertEqual([w["name"] for w in got["windows"]], ["lung", "soft", "point"])
                self.assertEqual([w["fraction"] for w in got["windows"]], exp["fractions"])
        # The request's modality picks the default windows.
        status, got = run({"task": "t", "image": self.path("us_8bit.dcm"), "modality": "CT"})
        self.assertEqual([w["name"] for w in got["windows"]], ["lung", "soft", "bone"])
        status, got = run({"task": "t", "image": self.path("us_8bit.dcm"),
                           "parameters": {"windows": []}})
        self.assertEqual((status, got["windows"]), (0, []))

    def test_3_bad_requests_exit_2(self):
        image = self.path("us_8bit.dcm")
        cases = [
            (b"", "malformed request"),
            (b"{\"task\": ", "malformed request"),
            (b"[1, 2]", "must be a JSON object"),
            (b"{\"task\": \"t\", \"task\": \"u\", \"image\": \"x\"}", "malformed request"),
            (json.dumps({"image": image}).encode(), "task"),
            (json.dumps({"task": "t"}).encode(), "image"),
            (json.dumps({"task": "x" * 129, "image": image}).encode(), "task"),
            (json.dumps({"task": "t", "image": image, "parameters": {"bins": 0}}).encode(),
             "bins"),
            (json.dumps({"task": "t", "image": image, "parameters": {"bins": 2.5}}).encode(),
             "bins"),
            (json.dumps({"task": "t", "image": image,
                         "parameters": {"windows": [{"name": "w", "min": 5, "max": 1}]}}).encode(),
             "windows[0]"),
            (json.dumps({"task": "t", "image": image,
                         "parameters": {"windows": [{"min": 0, "max": 1}]}}).encode(),
             "windows[0]"),
            (json.dumps({"task": "t", "image": image, "parameters": "lung"}).encode(),
             "parameters"),
            (b"{\"task\":\"t\",\"image\":\"" + b"x" * 70000 + b"\"}", "larger than"),
        ]
        for raw, reason in cases:
            with self.subTest(request=raw[:60]):
                status, got = run(None, raw=raw)
                self.assertEqual(status, 2, got)
                self.assertIn(reason, got["error"])

    def test_4_unreadable_images_exit_3(self):
        status, got = run({"task": "t", "image": "/nonexistent/x.dcm"})
        self.assertEqual(status, 3)
        self.assertIn("cannot open the image", got["error"])
        self.assertNotIn("/nonexistent", got["error"])
        status, got = run({"task": "t", "image": self.path("img2dcm_no_modality.dcm")})
        self.assertEqual((status, got["error"]), (3, "missing Modality (0008,0060)"))
        status, got = run({"task": "t", "image": self.path("jpeg_encapsulated.dcm")})
        self.assertEqual(status, 3)
        self.assertIn("compressed transfer syntax", got["error"])

    def test_5_request_without_eof(self):
        """A worker that keeps stdin open still gets its answer once the request is complete."""
        proc = subprocess.Popen([BIN, "analyze"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            request = json.dumps({"task": "t", "image": self.path("us_8bit.dcm")}).encode()
            proc.stdin.write(request[:10])
            proc.stdin.flush()
            time.sleep(0.1)
            proc.stdin.write(request[10:])
            proc.stdin.flush()
            line = proc.stdout.readline()
            self.assertEqual(proc.wait(timeout=30), 0)
            self.assertEqual(json.loads(line)["task"], "t")
        finally:
            proc.stdin.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def sigterm_case(self, preexec):
        proc = subprocess.Popen([BIN, "analyze"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                preexec_fn=preexec)
        try:
            time.sleep(0.5)  # started, waiting for its request
            self.assertIsNone(proc.poll())
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=10)
            elapsed = time.monotonic() - start
            out = proc.stdout.read().decode()
        finally:
            proc.stdin.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.assertEqual(status, 128 + signal.SIGTERM)
        self.assertLess(elapsed, 0.5)
        self.assertEqual(json.loads(out), {"error": "stopped by SIGTERM"})

    def test_6_sigterm_stops_it(self):
        self.sigterm_case(None)

    def test_7_sigterm_blocked_or_ignored_by_the_parent(self):
        """A worker thread that blocks SIGTERM (serve does) passes the mask on through exec."""
        self.sigterm_case(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]))
        self.sigterm_case(lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))

    def test_8_python_analyzer_agrees(self):
        for entry in self.manifest["files"]:
            name = entry["file"]
            with self.subTest(image=name):
                request = {"task": "py", "image": self.path(name)}
                status_c, got_c = run(request)
                status_py, got_py = run(request, argv=[PYTHON, CT_STATS])
                self.assertEqual(status_py, status_c, got_py)
                if status_c != 0:
                    self.assertIn("error", got_py)
                    continue
                for key in ("task", "rows", "columns", "modality", "pixels", "min", "max",
                            "histogram"):
                    self.assertEqual(got_py[key], got_c[key], key)
                self.assertAlmostEqual(got_py["mean"], got_c["mean"],
                                       delta=1e-12 * max(1, abs(got_c["mean"])))
                self.assertEqual(got_py["windows"], got_c["windows"])
        status, got = run(None, raw=b"{", argv=[PYTHON, CT_STATS])
        self.assertEqual(status, 2)


if __name__ == "__main__":
    unittest.main()
