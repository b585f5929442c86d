#!/usr/bin/env python3
"""Simulated site FHIR servers for `make bench-collect`: one asyncio process serving SITES sites,
each on its own loopback port (base URL http://127.0.0.1:PORT/fhir), with minimal hand-written
HTTP/1.1 (keep-alive; GET only).

Site k (1..SITES) answers GET /fhir/QuestionnaireResponse[?_count=N] with page 1 of a FHIR
searchset Bundle and /fhir/QuestionnaireResponse?page=N with page N: RECORDS records over PAGES
pages, each page with a `next` link (absolute, same origin) to the following one. Every entry is a
valid PHQ-9 QuestionnaireResponse shaped like tests/integration/harness.phq9(): `id` qr-<n>
(unique per site), identifier bench-S<k>-<n> (unique over all sites), subject Patient/P<k>-<p>
(a FHIR id has no `_`) with PATIENTS patients per site (record n is patient n % PATIENTS at visit
n // PATIENTS, so each patient answers once per visit week 0, 2, 4, 8, 12 from ENROLLED_ON),
seeded random scores. All bodies are generated once at start. Before each page the server sleeps
a delay drawn per (site, page) from a seeded RNG, uniform in [0, MAX_DELAY_MS] ms, so every run
sees the same delays.

A control port answers GET /stats (requests, pages served, bytes, connections and requests open
now and their peaks; the sum of all page delays) and GET /reset (zeroes the counts). At start it
prints {"sites": [port of site 1, ...], "control": port} as one JSON line on stdout; it stops on
SIGTERM, SIGINT or when its stdin closes.
"""
import argparse
import asyncio
import datetime
import json
import random
import signal
import sys
import time

PHQ9_ITEMS = ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5",
              "44253-3", "44260-8"]
ANSWERS = ["LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"]
WEEKS = [0, 2, 4, 8, 12]

stats = {}


def reset_stats():
    stats.update(requests=0, pages=0, bytes=0, not_found=0, conns_total=0,
                 conns_open=stats.get("conns_open", 0), conns_peak=stats.get("conns_open", 0),
                 inflight=stats.get("inflight", 0), inflight_peak=stats.get("inflight", 0),
                 reset_at=time.time())


def phq9(patient, scores, ident, authored, rid):
    """harness.phq9() with a resource id."""
    items = [{"linkId": link, "answer": [{"valueCoding": {
        "system": "http://loinc.org", "code": ANSWERS[s], "display": "answer"}}]}
        for link, s in zip(PHQ9_ITEMS, scores)]
    return {"resourceType": "QuestionnaireResponse", "id": rid, "status": "completed",
            "questionnaire": "http://loinc.org/q/44249-1",
            "identifier": {"system": "https://app.example.org/submission", "value": ident},
            "subject": {"reference": "Patient/" + patient}, "authored": authored, "item": items}


def build_pages(site, port, args, rng, enrolled):
    base = "http://127.0.0.1:%d/fhir" % port
    per_page = -(-args.records // args.pages)
    pages = []
    for page in range(args.pages):
        entries = []
        for n in range(page * per_page, min((page + 1) * per_page, args.records)):
            visit = n // args.patients
            week = WEEKS[visit % len(WEEKS)]
            authored = (enrolled + datetime.timedelta(weeks=week, hours=9 + visit // len(WEEKS),
                                                      minutes=n % 60)).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
            # Item 9 (thoughts of self-harm) answered above 0 in ~5%: a few safety alerts.
            scores = [rng.randrange(4) for _ in range(8)] + [
                rng.randrange(1, 4) if rng.random() < 0.05 else 0]
            rid = "qr-%d" % n
            qr = phq9("P%d-%d" % (site, n % args.patients), scores, "bench-S%d-%d" % (site, n),
                      authored, rid)
            entries.append({"fullUrl": "%s/QuestionnaireResponse/%s" % (base, rid),
                            "resource": qr, "search": {"mode": "match"}})
        links = [{"relation": "self", "url": "%s/QuestionnaireResponse?page=%d" % (base, page + 1)}]
        if page + 1 < args.pages:
            links.append({"relation": "next",
                          "url": "%s/QuestionnaireResponse?page=%d" % (base, page + 2)})
        doc = {"resourceType": "Bundle", "type": "searchset", "total": args.records,
               "link": links, "entry": entries}
        pages.append(json.dumps(doc, separators=(",", ":")).encode())
    return pages


def response(status, body, keep_alive, ctype="application/fhir+json"):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        status, reason, ctype, len(body),
        "" if keep_alive else "Connection: close\r\n")).encode()
    return head + body


NOT_FOUND = json.dumps({"resourceType": "OperationOutcome", "issue": [{
    "severity": "error", "code": "not-found", "diagnostics": "no such page"}]}).encode()


def page_of(target):
    """Page number (1-based) for a request target, or 0 if it is not a search of ours."""
    path, _, query = target.partition("?")
    if path != "/fhir/QuestionnaireResponse":
        return 0
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "page":
            return int(value) if value.isdigit() else 0
    return 1


async def read_request(reader):
    """(method, target, keep_alive), or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    keep_alive = version == "HTTP/1.1"
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "connection":
            keep_alive = "close" not in value if version == "HTTP/1.1" else "keep-alive" in value
        elif name == "content-length" and value.isdigit():
            length = int(value)
    if length:
        await reader.readexactly(length)
    return method, target, keep_alive


async def serve_site(reader, writer, pages, delays):
    stats["conns_total"] += 1
    stats["conns_open"] += 1
    stats["conns_peak"] = max(stats["conns_peak"], stats["conns_open"])
    try:
        while True:
            req = await read_request(reader)
            if req is None:
                break
            method, target, keep_alive = req
            stats["requests"] += 1
            page = page_of(target)
            if method != "GET":
                writer.write(response(405, b"", keep_alive, "text/plain"))
            elif page < 1 or page > len(pages):
                stats["not_found"] += 1
                writer.write(response(404, NOT_FOUND, keep_alive))
            else:
                stats["inflight"] += 1
                stats["inflight_peak"] = max(stats["inflight_peak"], stats["inflight"])
                try:
                    await asyncio.sleep(delays[page - 1])
                finally:
                    stats["inflight"] -= 1
                writer.write(response(200, pages[page - 1], keep_alive))
                stats["pages"] += 1
                stats["bytes"] += len(pages[page - 1])
            await writer.drain()
            if not keep_alive:
                break
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client went away, or this process is stopping
    finally:
        stats["conns_open"] -= 1
        writer.close()


async def serve_control(reader, writer):
    try:
        while True:
            req = await read_request(reader)
            if req is None:
                break
            method, target, keep_alive = req
            if target == "/reset":
                reset_stats()
            if target in ("/stats", "/reset"):
                body = json.dumps(stats).encode()
                writer.write(response(200, body, keep_alive, "application/json"))
            else:
                writer.write(response(404, b"", keep_alive, "text/plain"))
            await writer.drain()
            if not keep_alive:
                break
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main_async(args):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_stdin():
        try:
            data = sys.stdin.buffer.raw.read(4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            stop.set()
    loop.add_reader(sys.stdin.fileno(), on_stdin)

    reset_stats()
    rng = random.Random(args.seed)
    enrolled = datetime.datetime.strptime(args.enrolled_on, "%Y-%m-%d")
    servers, ports = [], []
    t0 = time.monotonic()
    nbytes = 0
    delay_sum = 0.0
    for site in range(1, args.sites + 1):
        # Bind first: the page bodies carry the port in their links.
        holder = {}

        async def handler(reader, writer, holder=holder):
            await serve_site(reader, writer, holder["pages"], holder["delays"])
        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=256)
        port = server.sockets[0].getsockname()[1]
        holder["pages"] = build_pages(site, port, args, rng, enrolled)
        holder["delays"] = [rng.uniform(0, args.max_delay_ms) / 1000.0
                            for _ in range(args.pages)]
        nbytes += sum(len(p) for p in holder["pages"])
        delay_sum += sum(holder["delays"])
        servers.append(server)
        ports.append(port)
    control = await asyncio.start_server(serve_control, "127.0.0.1", 0)
    servers.append(control)
    stats["generated_bytes"] = nbytes
    stats["generate_s"] = round(time.monotonic() - t0, 3)
    stats["delay_sum_s"] = round(delay_sum, 3)
    sys.stdout.write(json.dumps({"sites": ports,
                                 "control": control.sockets[0].getsockname()[1]}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    for server in servers:
        server.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=200)
    ap.add_argument("--records", type=int, default=500, help="records per site")
    ap.add_argument("--pages", type=int, default=5, help="pages per site")
    ap.add_argument("--patients", type=int, default=100, help="patients per site")
    ap.add_argument("--max-delay-ms", type=float, default=200.0)
    ap.add_argument("--enrolled-on", default="2026-08-01",
                    help="the patients' enrolment date (YYYY-MM-DD); visits are weeks after it")
    ap.add_argument("--seed", type=int, default=20261129)
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
