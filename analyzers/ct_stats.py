#!/usr/bin/python3
"""CT statistics in Python: the same protocol as `trialhub analyze`, written with pydicom and
numpy, to show where a real model plugs in (replace analyze() below; keep the protocol).

Protocol (what a worker expects of any analyzer, TRIALHUB_ANALYZER):
  stdin   one JSON request {"task": "<id>", "image": "<path of a DICOM file>",
          "modality": "CT" (optional), "parameters": {"windows": [{"name", "min", "max"}],
          "bins": 64} (optional)}
  stdout  one JSON result {"task", "rows", "columns", "frames", "modality", "pixels", "samples",
          "min", "max", "mean", "histogram": {"bins", "min", "max", "counts"},
          "windows": [{"name", "min", "max", "fraction"}]}
  exit    0 done; 2 bad request and 3 unreadable image, both with {"error": "<reason>"};
          128 + N after signal N (SIGTERM stops it at once).
Errors never carry patient data: reasons name attributes, not their values.

Debian's pydicom and numpy are for /usr/bin/python3 (hence the shebang).
"""
import json
import os
import signal
import sys

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

REQUEST_MAX = 64 * 1024
MAX_BINS = 4096
MAX_WINDOWS = 16
NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
CT_WINDOWS = [("lung", -1000.0, -400.0), ("soft", -160.0, 240.0), ("bone", 300.0, 3000.0)]


class Failure(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def answer(obj, status):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return status


def on_signal(signum, frame):
    answer({"error": "stopped by %s" % signal.Signals(signum).name}, 0)
    os._exit(128 + signum)


def read_request():
    """Reads stdin until one complete JSON value is there (the worker may keep the pipe open)."""
    data = b""
    decoder = json.JSONDecoder()
    while True:
        chunk = os.read(0, 65536)
        data += chunk
        if len(data) > REQUEST_MAX:
            raise Failure(2, "request larger than %d bytes" % REQUEST_MAX)
        try:
            value, _ = decoder.raw_decode(data.decode("utf-8").lstrip())
            return value
        except (ValueError, UnicodeDecodeError) as e:
            if not chunk:
                raise Failure(2, "malformed request: %s" % (e if data.strip() else "empty input"))


def parse_request(req):
    if not isinstance(req, dict):
        raise Failure(2, "the request must be a JSON object")
    task, image = req.get("task"), req.get("image")
    if not isinstance(task, str) or not 1 <= len(task) <= 128:
        raise Failure(2, "task must be a string of 1 to 128 characters")
    if not isinstance(image, str) or not image:
        raise Failure(2, "image must be the path of a DICOM file")
    modality = req.get("modality")
    if modality is not None and (not isinstance(modality, str) or len(modality) > 16):
        raise Failure(2, "modality must be a string of at most 16 characters")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise Failure(2, "parameters must be an object")
    bins = params.get("bins", 64)
    if bins is None:
        bins = 64
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= MAX_BINS:
        raise Failure(2, "parameters.bins must be an integer from 1 to %d" % MAX_BINS)
    windows = params.get("windows")
    if windows is not None:
        if not isinstance(windows, list) or len(windows) > MAX_WINDOWS:
            raise Failure(2, "parameters.windows must be an array of at most %d windows"
                          % MAX_WINDOWS)
        checked = []
        for i, w in enumerate(windows):
            number = (int, float)
            if (not isinstance(w, dict) or not isinstance(w.get("name"), str)
                    or not 1 <= len(w["name"]) <= 32
                    or not isinstance(w.get("min"), number) or isinstance(w.get("min"), bool)
                    or not isinstance(w.get("max"), number) or isinstance(w.get("max"), bool)
                    or w["min"] > w["max"]):
                raise Failure(2, "parameters.windows[%d] must be {\"name\", \"min\", \"max\" not "
                                 "below min}" % i)
            checked.append((w["name"], float(w["min"]), float(w["max"])))
        windows = checked
    return task, image, modality, bins, windows


def load(path):
    """The stored values, slope and intercept, with the checks `trialhub analyze` makes."""
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError:
        raise Failure(3, "cannot open the image: No such file or directory")
    except (InvalidDicomError, EOFError, OSError, ValueError) as e:
        raise Failure(3, "not a readable DICOM file (%s)" % type(e).__name__)
    for keyword, tag in (("Rows", "0028,0010"), ("Columns", "0028,0011"),
                         ("Modality", "0008,0060")):
        if keyword not in ds or ds.data_element(keyword).value in (None, ""):
            raise Failure(3, "missing %s (%s)" % (keyword, tag))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax not in NATIVE_LE:
        kind = "big-endian" if syntax == "1.2.840.10008.1.2.2" else "compressed"
        raise Failure(3, "pixel data not decodable here: %s transfer syntax (%s)" % (kind, syntax))
    spp = int(ds.get("SamplesPerPixel", 1))
    if int(ds.get("BitsAllocated", 0)) not in (8, 16) or spp not in (1, 3):
        raise Failure(3, "pixel data not decodable here: unsupported BitsAllocated or "
                         "SamplesPerPixel")
    try:
        stored = ds.pixel_array.astype(np.int64)
    except Exception as e:  # pydicom raises several types for bad pixel data
        raise Failure(3, "unreadable pixel data (%s)" % type(e).__name__)
    slope, intercept = 1.0, 0.0
    if spp == 1 and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
    return ds, stored, slope, intercept


def analyze(task, path, modality, bins, windows):
    ds, stored, slope, intercept = load(path)
    values = (stored.astype(np.float64) * slope + intercept).ravel()
    # A model would run here on `values` (or on the image array) and add its findings.
    if windows is None:
        if (modality or str(ds.Modality)) == "CT":
            windows = CT_WINDOWS
        else:
            bits = int(ds.get("BitsStored", ds.BitsAllocated))
            span = 2.0 ** bits
            lo_s = -span / 2 if int(ds.get("PixelRepresentation", 0)) == 1 else 0.0
            lo, hi = lo_s * slope + intercept, (lo_s + span - 1) * slope + intercept
            lo, hi = min(lo, hi), max(lo, hi)
            third = (hi - lo) / 3
            windows = [("low", lo, lo + third), ("mid", lo + third, lo + 2 * third),
                       ("high", lo + 2 * third, hi)]
    counts, edges = np.histogram(values, bins=bins)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return {
        "task": task, "rows": int(ds.Rows), "columns": int(ds.Columns), "frames": frames,
        "modality": str(ds.Modality), "pixels": int(ds.Rows) * int(ds.Columns) * frames,
        "samples": int(values.size), "min": float(values.min()), "max": float(values.max()),
        "mean": float(values.mean()),
        "histogram": {"bins": bins, "min": float(edges[0]), "max": float(edges[-1]),
                      "counts": [int(c) for c in counts]},
        "windows": [{"name": n, "min": a, "max": b,
                     "fraction": float(np.count_nonzero((values >= a) & (values <= b))
                                       / values.size)} for n, a, b in windows],
    }


def main():
    # A worker may pass SIGTERM on blocked or ignored: take it back.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGINT])
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        return answer(analyze(*parse_request(read_request())), 0)
    except Failure as f:
        return answer({"error": f.reason}, f.status)


if __name__ == "__main__":
    sys.exit(main())
