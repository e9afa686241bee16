#!/usr/bin/env python3
"""Parsing and reporting for benches/load.sh. Standard library only.

  results.py wrk FILE              -> "RPS P50_MS P99_MS REQUESTS ERRORS"
  results.py h2load FILE [LOGFILE] -> the same, from h2load's output and its
                                      per-request log (for the percentiles;
                                      "nan" without it)
  results.py report META CELLS IDLE -> the Markdown report on stdout
  results.py update-doc DOC REPORT -> replaces what lies between the results
                                      markers of DOC with REPORT

ERRORS counts every request that was not answered 2xx: wrk's "Non-2xx or 3xx
responses" plus its socket errors (connect, read, write, timeout); h2load's
failed, errored and timed-out requests plus every 3xx, 4xx and 5xx status.
"""

import re
import statistics
import sys

START_MARKER = "<!-- results start -->"
END_MARKER = "<!-- results end -->"

# Row id -> (title, load generator). Order is the report's order.
ROWS = {
    "ka-100": ("HTTP/1.1 keep-alive, 100 B body", "wrk -t1 -c64, http://.../"),
    "ka-16k": ("HTTP/1.1 keep-alive, 16 KiB body", "wrk -t1 -c64, http://.../16k"),
    "close": ("Connection: close (new client connection per request)",
              "wrk -t1 -c64 -H 'Connection: close'"),
    "tls-ka": ("TLS 1.3 keep-alive, 100 B body", "wrk -t1 -c64, https://.../"),
    "tls-close": ("TLS 1.3, new handshake per request (req/s = handshakes/s)",
                  "wrk -t1 -c64 -H 'Connection: close', https://.../"),
    "h2": ("h2 over TLS 1.3, 100 B body",
           "h2load -t1 -c64 -m4 --log-file (for p50/p99), https://.../ (ALPN h2)"),
    "ka-100-log": ("HTTP/1.1 keep-alive, 100 B body, flowgate's access log on (to a file)",
                   "wrk -t1 -c64, http://.../"),
    "ka-100-threads": ("HTTP/1.1 keep-alive, 100 B body, proxy and wrk unpinned",
                       "wrk -t2 -c64 unpinned, http://.../"),
}
SUMMARY_ROWS = ["ka-100", "ka-16k", "close", "tls-ka", "tls-close", "h2"]

VARIANTS = {
    "flowgate": "flowgate",
    "haproxy": "HAProxy",
    "nginx": "nginx",
    "direct": "direct to origin",
    "flowgate-log": "flowgate, access log on",
    "flowgate-1t": "flowgate, threads = 1, unpinned",
    "flowgate-2t": "flowgate, threads = 2, unpinned",
    "haproxy-1t": "HAProxy, nbthread 1, unpinned",
    "haproxy-2t": "HAProxy, nbthread 2, unpinned",
}
# Variants measured for their own comparison, not against the pinned HAProxy.
UNCOMPARED = ("direct", "flowgate-1t", "flowgate-2t", "haproxy-1t", "haproxy-2t")

# Where each row's HAProxy reference comes from.
REFERENCE_ROW = {"ka-100-log": "ka-100"}


def fail(message):
    sys.stderr.write(f"results.py: {message}\n")
    sys.exit(1)


# --------------------------------------------------------------------------
# Parsing

def to_ms(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"bad latency {text!r}")
    value = float(m.group(1))
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def parse_wrk(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if not (rps and total and p50 and p99):
        fail(f"{path}: not a complete wrk --latency output")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    print(f"{float(rps.group(1)):.0f} {to_ms(p50.group(1)):.3f} {to_ms(p99.group(1)):.3f} "
          f"{total.group(1)} {errors}")


def percentile(sorted_values, fraction):
    """Nearest-rank percentile, as wrk reports."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def parse_h2load(path, log_path):
    text = open(path, encoding="utf-8", errors="replace").read()
    fin = re.search(r"^finished in ([0-9.]+)s, ([0-9.]+) req/s", text, re.M)
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", text, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if not (fin and req and codes):
        fail(f"{path}: not a complete h2load output")
    done = int(req.group(3))
    failed, errored, timeout = (int(req.group(i)) for i in (5, 6, 7))
    errors = failed + errored + timeout + sum(int(codes.group(i)) for i in (2, 3, 4))
    # The log has one line per finished request: start (us), status, time (us).
    times = []
    if log_path is not None:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            for line in log:
                parts = line.split("\t")
                if len(parts) >= 3:
                    times.append(int(parts[2]))
        if not times:
            fail(f"{log_path}: no requests logged")
    times.sort()
    p50 = percentile(times, 0.50) / 1000.0
    p99 = percentile(times, 0.99) / 1000.0
    print(f"{float(fin.group(2)):.0f} {p50:.3f} {p99:.3f} {done} {errors}")


# --------------------------------------------------------------------------
# Report

def read_tsv(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            if line.strip():
                rows.append(dict(zip(header, line.rstrip("\n").split("\t"))))
    return rows


def read_meta(path):
    meta = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            meta[key] = value
    return meta


def num(value):
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # drop NaN


def fmt(value, kind):
    if value is None:
        return "n/a"
    if kind == "rps":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if kind == "cpu":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if kind == "kb":
        return f"{value:.1f}"
    if kind == "ratio":
        return f"{value:.2f}"
    return str(value)


def spread(values, kind):
    """'median (min–max)' of the values, or the single value."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, kind)
    return f"{fmt(med, kind)} ({fmt(min(values), kind)}–{fmt(max(values), kind)})"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


class Cell:
    """All repetitions of one (row, variant)."""

    def __init__(self):
        self.rps, self.p50, self.p99, self.cpu, self.origin_cpu = [], [], [], [], []
        self.proxy_busy, self.load_busy, self.busiest_thread = [], [], []
        self.errors = 0
        self.failures = []

    def add(self, r):
        if r["status"] != "ok":
            self.failures.append(r["status"])
            return
        requests = num(r["requests"]) or 0
        self.rps.append(num(r["rps"]))
        self.p50.append(num(r["p50_ms"]))
        self.p99.append(num(r["p99_ms"]))
        per10k = (lambda s: None if s is None or requests <= 0 else s * 10000 / requests)
        self.cpu.append(per10k(num(r["proxy_cpu_s"])))
        self.origin_cpu.append(per10k(num(r["origin_cpu_s"])))
        self.proxy_busy.append(num(r["proxy_busy"]))
        self.load_busy.append(num(r["load_busy"]))
        self.busiest_thread.append(num(r.get("busiest_thread")))
        self.errors += int(r["errors"] or 0)


def build_cells(rows):
    cells = {}
    for r in rows:
        cells.setdefault((r["row"], r["variant"]), Cell()).add(r)
    return cells


def report(meta_path, cells_path, idle_path):
    meta = read_meta(meta_path)
    cells = build_cells(read_tsv(cells_path))
    idle = read_tsv(idle_path)
    out = []
    w = out.append

    w(f"# flowgate load run {meta['stamp']}")
    w("")
    w(f"- command: `{meta['command']}`")
    w(f"- flowgate: {meta['flowgate']}")
    w(f"- {meta['haproxy']}; {meta['nginx']}; {meta['wrk']}; {meta['h2load']}; {meta['openssl']}")
    w(f"- machine: {meta['machine']}")
    w(f"- method: each cell is {meta['warmup']} s of unmeasured warm-up then {meta['duration']} s "
      f"measured, {meta['reps']} repetition(s); in each repetition every path runs every proxy in "
      f"turn (the order rotates between repetitions), so drift hits all of them alike. Cells show "
      f"the median and, in brackets, min–max over the repetitions. CPU is utime+stime of the "
      f"proxy's process tree (from /proc) over the measured seconds, per 10,000 completed "
      f"requests; ratios divide medians by HAProxy's in the same run. Errors (non-2xx answers "
      f"and socket errors, summed over the repetitions) must be 0.")
    w(f"- pinning: each proxy runs one worker thread on core {meta['proxy_cpu']}; the three nginx "
      f"origins (one worker) and the load generator run on core {meta['load_cpu']}. The proxies "
      f"speak HTTP/1.1 with pooled keep-alive connections to the origins on every path.")
    if meta.get("smoke") == "1":
        w("- SMOKE run: short cells, one repetition; the numbers only show that the harness works.")
    w("")

    # Summary, shaped like the anchor table of the performance issue.
    w("## Summary: proxy CPU seconds per 10,000 requests (median)")
    w("")
    w("| path | flowgate | HAProxy | nginx | direct (origin's CPU) | flowgate / HAProxy CPU "
      "| flowgate / HAProxy p99 | flowgate req/s | HAProxy req/s |")
    w("| --- | --: | --: | --: | --: | --: | --: | --: | --: |")
    for row in SUMMARY_ROWS:
        if not any(k[0] == row for k in cells):
            continue
        get = lambda v: cells.get((row, v))  # noqa: E731
        fg, hp, ng, di = get("flowgate"), get("haproxy"), get("nginx"), get("direct")
        m = lambda c, attr: median(getattr(c, attr)) if c else None  # noqa: E731
        w(f"| {ROWS[row][0]} | {fmt(m(fg, 'cpu'), 'cpu')} | {fmt(m(hp, 'cpu'), 'cpu')} "
          f"| {fmt(m(ng, 'cpu'), 'cpu')} | {fmt(m(di, 'origin_cpu'), 'cpu')} "
          f"| {fmt(ratio(m(fg, 'cpu'), m(hp, 'cpu')), 'ratio')} "
          f"| {fmt(ratio(m(fg, 'p99'), m(hp, 'p99')), 'ratio')} "
          f"| {fmt(m(fg, 'rps'), 'rps')} | {fmt(m(hp, 'rps'), 'rps')} |")
    w("")

    for row, (title, load) in ROWS.items():
        variants = [v for v in VARIANTS if (row, v) in cells]
        if not variants:
            continue
        ref = cells.get((REFERENCE_ROW.get(row, row), "haproxy"))
        ref_cpu = median(ref.cpu) if ref else None
        ref_p99 = median(ref.p99) if ref else None
        w(f"## {title}")
        w("")
        w(f"Load: `{load}`.")
        w("")
        w("| proxy | req/s | p50 ms | p99 ms | proxy CPU s / 10k req | CPU vs HAProxy "
          "| p99 vs HAProxy | origins CPU s / 10k req | cores busy (proxy / load) | errors |")
        w("| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
        for v in variants:
            c = cells[(row, v)]
            if c.failures and not c.rps:
                w(f"| {VARIANTS[v]} | {'; '.join(sorted(set(c.failures)))} | | | | | | | | |")
                continue
            pct = lambda xs: "-" if median(xs) is None else f"{median(xs):.0f}%"  # noqa: E731
            busy = f"{pct(c.proxy_busy)} / {pct(c.load_busy)}"
            errors = str(c.errors)
            if c.failures:
                errors += f"; failed: {'; '.join(sorted(set(c.failures)))}"
            cmp_ok = v not in UNCOMPARED
            w(f"| {VARIANTS[v]} | {spread(c.rps, 'rps')} | {spread(c.p50, 'ms')} "
              f"| {spread(c.p99, 'ms')} | {spread(c.cpu, 'cpu')} "
              f"| {fmt(ratio(median(c.cpu), ref_cpu) if cmp_ok else None, 'ratio')} "
              f"| {fmt(ratio(median(c.p99), ref_p99) if cmp_ok else None, 'ratio')} "
              f"| {spread(c.origin_cpu, 'cpu')} | {busy} | {errors} |")
        if row == "ka-100-log":
            on, off = cells.get((row, "flowgate-log")), cells.get(("ka-100", "flowgate"))
            r = ratio(median(on.cpu) if on else None, median(off.cpu) if off else None)
            if r is not None:
                w("")
                w(f"Proxy CPU per request with the access log on (one text line per request, "
                  f"to a file) over flowgate without it (first table): ×{r:.2f}.")
        if row == "ka-100-threads":
            gains, shares = [], []
            for proxy, name in (("flowgate", "flowgate"), ("haproxy", "HAProxy")):
                one, two = cells.get((row, f"{proxy}-1t")), cells.get((row, f"{proxy}-2t"))
                r = ratio(median(two.rps) if two else None, median(one.rps) if one else None)
                if r is not None:
                    gains.append(f"{name} ×{r:.2f} ({fmt(median(one.rps), 'rps')} → "
                                 f"{fmt(median(two.rps), 'rps')} req/s)")
                if two and median(two.busiest_thread) is not None:
                    xs = [x for x in two.busiest_thread if x is not None]
                    shares.append(f"{name} {median(xs):.0f} % ({min(xs):.0f}–{max(xs):.0f})")
            if gains:
                w("")
                w(f"Two threads over one (both unpinned, same load), throughput: "
                  f"{'; '.join(gains)}. On 2 cores the second thread competes with wrk "
                  f"and the origins.")
            if shares:
                w("")
                w(f"The busiest thread's share of the proxy's CPU with two threads "
                  f"(50 % is an even split): {'; '.join(shares)}.")
        w("")

    if idle:
        w(f"## Idle memory per held client connection")
        w("")
        n = idle[0]["count"]
        w(f"{n} client connections opened and held idle (TLS: handshake completed); the proxy's "
          f"resident memory (VmRSS summed over its processes) is read before and after, and the "
          f"difference divided by the connections. Then one `GET /` on each (8 at a time, so the "
          f"proxy's pool to the origins stays small) and again held idle as keep-alive "
          f"connections. KB = 1024 bytes.")
        w("")
        w("| proxy | plain, just connected | plain, after one request | TLS, after handshake "
          "| TLS, after one request | plain vs HAProxy | TLS vs HAProxy | RSS at start (KB) "
          "| connections held |")
        w("| --- | --: | --: | --: | --: | --: | --: | --: | --: |")
        by = {}
        for r in idle:
            by.setdefault((r["variant"], r["kind"]), []).append(r)

        def per_conn(rs, field):
            out = []
            for r in rs:
                if r["status"] != "ok":
                    continue
                before, after, count = num(r["rss_start_kb"]), num(r[field]), num(r["count"])
                if None in (before, after, count) or count <= 0:
                    continue
                out.append((after - before) / count)
            return out

        def med_kb(variant, kind, field):
            return median(per_conn(by.get((variant, kind), []), field))

        for v in ("flowgate", "haproxy", "nginx"):
            plain, tls = by.get((v, "plain"), []), by.get((v, "tls"), [])
            if not plain and not tls:
                continue
            failures = sorted({r["status"] for r in plain + tls if r["status"] != "ok"})
            held = [r["held"] for r in plain + tls if r["status"] == "ok"]
            starts = [num(r["rss_start_kb"]) for r in plain + tls]
            held_text = f"{min(int(h) for h in held)} of {n}" if held else "-"
            if failures:
                held_text += "; failed: " + "; ".join(failures)
            w(f"| {VARIANTS[v]} | {spread(per_conn(plain, 'rss_fresh_kb'), 'kb')} "
              f"| {spread(per_conn(plain, 'rss_request_kb'), 'kb')} "
              f"| {spread(per_conn(tls, 'rss_fresh_kb'), 'kb')} "
              f"| {spread(per_conn(tls, 'rss_request_kb'), 'kb')} "
              f"| {fmt(ratio(med_kb(v, 'plain', 'rss_fresh_kb'), med_kb('haproxy', 'plain', 'rss_fresh_kb')), 'ratio')} "
              f"| {fmt(ratio(med_kb(v, 'tls', 'rss_fresh_kb'), med_kb('haproxy', 'tls', 'rss_fresh_kb')), 'ratio')} "
              f"| {fmt(median(starts), 'rps')} | {held_text} |")
        w("")
    print("\n".join(out))


def update_doc(doc_path, report_path):
    doc = open(doc_path, encoding="utf-8").read()
    body = open(report_path, encoding="utf-8").read().strip("\n")
    start, end = doc.find(START_MARKER), doc.find(END_MARKER)
    if start < 0 or end < start:
        fail(f"{doc_path}: no {START_MARKER} ... {END_MARKER} section")
    # The report's own title becomes a subsection of the document.
    body = re.sub(r"^# ", "### ", body, count=1, flags=re.M)
    body = re.sub(r"^## ", "#### ", body, flags=re.M)
    new = doc[: start + len(START_MARKER)] + "\n\n" + body + "\n\n" + doc[end:]
    with open(doc_path, "w", encoding="utf-8") as f:
        f.write(new)


def main(argv):
    if len(argv) >= 2 and argv[0] == "wrk":
        parse_wrk(argv[1])
    elif len(argv) >= 2 and argv[0] == "h2load":
        parse_h2load(argv[1], argv[2] if len(argv) >= 3 else None)
    elif len(argv) >= 4 and argv[0] == "report":
        report(argv[1], argv[2], argv[3])
    elif len(argv) >= 3 and argv[0] == "update-doc":
        update_doc(argv[1], argv[2])
    else:
        sys.stderr.write(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
