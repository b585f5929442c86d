"""A stand-in image analyzer for tests/integration/test_analysis.py. It speaks the analyzer
protocol (one JSON request on stdin: {"task", "image", "modality", "parameters"}; one JSON result
on stdout) and misbehaves on request, so that the workers' handling of slow, hanging, crashing and
babbling analyzers can be tested with real processes.

    fake_analyzer.py RUNS_DIR

What it does is chosen per image by the test: RUNS_DIR/modes.json maps the SHA-256 (hex) of an
image's bytes to {"mode": ..., more options}; an image not listed gets "ok". Modes:

  ok          answers at once
  slow        sleeps "seconds", then answers
  hang        never answers; with "ignore_term_first" it ignores SIGTERM on the task's first run
              (a stuck process: only SIGKILL ends it); with "child" it first starts a child in
              its own process group that sleeps too (the whole group must be stopped)
  garbage     prints text that is not JSON, exit 0
  array       prints a JSON array (valid JSON, not an object), exit 0
  unreadable  prints {"error": ...} and exits 3 (an image it cannot read: not retryable)
  big         answers with "bytes" (default 40000) of padding in the answer, written at once,
              and exits right after (os._exit): more than one read of the pipe, all of it
              there before the exit. With "go": waits for the file RUNS_DIR/<go> first

Each run writes RUNS_DIR/<task>.<pid>.json when it starts (atomically): {"task", "pid", "ppid",
"pgid", "start" (Unix time), "mode", "run" (1 for the task's first run, ...), "request",
"child" (the child's pid or null)}. The answer is {"task", "pid", "run", "mode", "fake": true}.
Standard library only; it never reads or prints anything but the image's hash.
"""
import glob
import hashlib
import json
import os
import signal
import sys
import time


def write_atomic(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)


def main():
    runs = sys.argv[1]
    request = json.load(sys.stdin)
    task = request["task"]
    try:
        with open(request["image"], "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        digest = None
    try:
        with open(os.path.join(runs, "modes.json")) as f:
            spec = json.load(f).get(digest, {})
    except (OSError, ValueError):
        spec = {}
    mode = spec.get("mode", "ok")
    run = len(glob.glob(os.path.join(runs, glob.escape(task) + ".*.json"))) + 1

    child = None
    if mode == "hang" and spec.get("child"):
        child = os.fork()
        if child == 0:
            while True:
                time.sleep(3600)
    if mode == "hang" and spec.get("ignore_term_first") and run == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    me = os.getpid()
    write_atomic(os.path.join(runs, "%s.%d.json" % (task, me)),
                 {"task": task, "pid": me, "ppid": os.getppid(), "pgid": os.getpgid(0),
                  "start": time.time(), "mode": mode, "run": run, "request": request,
                  "child": child})

    answer = {"task": task, "pid": me, "run": run, "mode": mode, "fake": True}
    if mode == "slow":
        time.sleep(float(spec.get("seconds", 2)))
    elif mode == "hang":
        while True:
            time.sleep(3600)
    elif mode == "garbage":
        sys.stdout.write("analysis complete, everything looks fine {\n")
        return 0
    elif mode == "array":
        sys.stdout.write("[1, 2, 3]\n")
        return 0
    elif mode == "big":
        answer["padding"] = "x" * int(spec.get("bytes", 40000))
        while spec.get("go") and not os.path.exists(os.path.join(runs, spec["go"])):
            time.sleep(0.01)
        data = (json.dumps(answer) + "\n").encode()
        sys.stdout.flush()
        written = 0
        while written < len(data):
            written += os.write(1, data[written:])
        os._exit(0)  # at once: no interpreter shutdown between the write and the exit
    elif mode == "unreadable":
        sys.stdout.write(json.dumps({"error": "fake: cannot read this image"}) + "\n")
        return 3
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
