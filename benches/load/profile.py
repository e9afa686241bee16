#!/usr/bin/env python3
"""Stack shortening and summaries for benches/profile.sh. Standard library only.

  profile.py shorten < FOLDED > FOLDED     -> the collapsed stacks of
        inferno-collapse-perf with Rust symbols shortened: no hash suffix, no
        generic arguments ("Conn<I,B,T>::poll" -> "Conn::poll"; a qualified
        path "<A as B>::f" keeps its brackets, drop_in_place keeps the type it
        drops), each frame cut to 200 characters
  profile.py summary META REPORT           -> the text summary of one path on
        stdout. META: "key<TAB>value" lines from profile.sh; REPORT: the
        output of perf report --no-children --sort dso,symbol -n -g none
        --stdio --field-separator=<TAB>
"""

import re
import sys

from results import read_meta  # benches/load/results.py: key<TAB>value lines

FRAME_MAX = 200
SYMBOL_MAX = 120
TOP = 25

HASH = re.compile(r"::h[0-9a-f]{16}(?=$|[^0-9a-zA-Z_])")


def fail(message):
    sys.stderr.write(f"profile.py: {message}\n")
    sys.exit(1)


def cut(text, limit):
    return text if len(text) <= limit else text[: limit - 3] + "..."


def strip_generics(name):
    """Drops generic argument lists from a demangled Rust symbol."""
    name = HASH.sub("", name)
    out = []
    # One entry per open "<": True if its contents are kept.
    stack = []
    dropping = 0  # how many of the open brackets drop their contents
    i = 0
    n = len(name)
    while i < n:
        c = name[i]
        prev = name[i - 1] if i else ""
        if c == "<":
            word = re.search(r"([A-Za-z0-9_]+)$", "".join(out[-40:]))
            # After a name ("Vec<T>", "{async_block#0}<T>") or "::" (turbofish)
            # it opens generic arguments; elsewhere a qualified path "<A as B>".
            generic = prev.isalnum() or prev in "_}" or name.endswith("::", 0, i)
            keep = not generic or (word is not None and word.group(1) == "drop_in_place")
            if dropping or not keep:
                if not dropping and name.endswith("::", 0, i):
                    # turbofish: "f::<T>" -> "f"
                    del out[-2:]
                stack.append(False)
                dropping += 1
            else:
                stack.append(True)
                out.append(c)
        elif c == ">" and prev != "-" and stack:
            kept = stack.pop()
            if kept:
                out.append(c)
            else:
                dropping -= 1
        elif not dropping:
            out.append(c)
        i += 1
    return "".join(out)


def shorten():
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            sys.stdout.write(line + "\n")
            continue
        frames = [cut(strip_generics(f), FRAME_MAX) for f in stack.split(";")]
        sys.stdout.write(";".join(frames) + " " + count + "\n")


# Crates of flowgate's binary, grouped for the summary. The first group whose
# prefixes match the crate name wins; the rest is "other crates".
CRATE_GROUPS = [
    ("flowgate (its own code)", ("flowgate",)),
    ("hyper, hyper_util (HTTP/1 and HTTP/2 codecs, client pool)", ("hyper", "hyper_util")),
    ("h2 (HTTP/2 framing, HPACK)", ("h2",)),
    ("http, httparse, bytes (HTTP types, parsing, buffers)", ("http", "httparse", "bytes", "http_body", "http_body_util")),
    ("tokio, mio (runtime, I/O)", ("tokio", "tokio_util", "mio")),
    ("rustls, tokio_rustls, webpki (TLS)", ("rustls", "tokio_rustls", "webpki", "rustls_webpki")),
    ("ring (crypto)", ("ring",)),
    ("std, core, alloc", ("std", "core", "alloc")),
    ("tracing, prometheus (logs, metrics)", ("tracing", "tracing_core", "tracing_subscriber", "prometheus")),
]

ALLOC = re.compile(
    r"^(__libc_)?(malloc|free|cfree|calloc|realloc|aligned_alloc|posix_memalign|memalign)$"
    r"|^_int_(malloc|free|realloc|memalign)|^malloc_consolidate$|^unlink_chunk|^tcache_|^sysmalloc$"
    r"|^_?_?libc_free|^arena_|^__malloc|^alloc_perturb|^systrim$|^__default_morecore"
)
COPY = re.compile(r"^__(memmove|memcpy|memset|mempcpy|memcmp|bcmp|memchr|memrchr)|^(memmove|memcpy|memset|memcmp|bcmp)$")


# ring's C and assembly: exported names carry its prefix, static helpers of
# its curve25519 code do not.
RING_C = re.compile(r"ring_core_|(fe|fe4|ge|sc|x25519)_[a-z0-9_]+$")


def crate_of(symbol):
    """The crate a demangled Rust symbol belongs to (None if not a Rust path)."""
    s = symbol
    m = re.match(r"core::ptr::drop_in_place<(.*)>$", s)
    if m:
        s = m.group(1)
    s = s.lstrip("<&*[( ")
    s = re.sub(r"^(mut |const |dyn )+", "", s)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", s)
    if m:
        return m.group(1)
    # "<T as crate::Trait>::f" with a generic T: the trait's crate.
    m = re.search(r" as ([A-Za-z_][A-Za-z0-9_]*)::", s)
    if m:
        return m.group(1)
    if RING_C.match(s):
        return "ring"
    return None


def crate_group(symbol):
    if re.match(r"_?mi_[a-z]", symbol):
        return "mimalloc (allocator, when linked in)"
    crate = crate_of(symbol)
    if crate is None:
        return "no Rust path (C, assembly, [unknown])"
    for label, prefixes in CRATE_GROUPS:
        if crate in prefixes:
            return label
    return "other crates"


def read_report(path):
    """([(samples, dso, kind, symbol)], lost samples) from perf report's
    tab-separated output (Overhead, Samples, Shared Object, Symbol, and
    possibly more columns)."""
    rows = []
    lost = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"# Total Lost Samples: (\d+)", line)
            if m:
                lost = int(m.group(1))
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            try:
                samples = int(parts[1].strip())
            except ValueError:
                continue
            dso = parts[2].strip()
            sym = parts[3].strip()
            m = re.match(r"\[(.)\]\s+(.*)$", sym)
            kind, name = (m.group(1), m.group(2)) if m else ("?", sym)
            rows.append((samples, dso, kind, name.strip()))
    return rows, lost


def dso_class(dso, kind, binary):
    if kind == "k" or dso.startswith("[kernel") or dso.endswith(".ko") or dso.startswith("[guest.kernel"):
        return "kernel"
    base = dso.rsplit("/", 1)[-1]
    if base == binary:
        return "flowgate"
    if base.startswith("libc.so") or base.startswith("libc-"):
        return "libc"
    return "other"


def summary(meta_path, report_path):
    meta = read_meta(meta_path)
    rows, lost = read_report(report_path)
    total = sum(r[0] for r in rows)
    if total == 0:
        fail(f"no samples in {report_path}")

    def pct(n):
        return f"{100.0 * n / total:5.1f}%"

    by_class = {"kernel": 0, "flowgate": 0, "libc": 0, "other": 0}
    crates = {}
    libc = {"allocator (malloc, free, realloc and their internals)": 0,
            "copies (memcpy, memmove, memset, memcmp)": 0, "the rest of libc": 0}
    others = {}
    symbols = {}
    for samples, dso, kind, name in rows:
        cls = dso_class(dso, kind, meta.get("binary") or "flowgate")
        by_class[cls] += samples
        if cls == "flowgate":
            g = crate_group(name)
            crates[g] = crates.get(g, 0) + samples
        elif cls == "libc":
            bare = name.split("@", 1)[0]  # "cfree@GLIBC_2.2.5"
            if ALLOC.search(bare):
                libc["allocator (malloc, free, realloc and their internals)"] += samples
            elif COPY.search(bare):
                libc["copies (memcpy, memmove, memset, memcmp)"] += samples
            else:
                libc["the rest of libc"] += samples
        elif cls == "other":
            key = dso.rsplit("/", 1)[-1] or "?"
            others[key] = others.get(key, 0) + samples
        key = (kind, HASH.sub("", name))
        symbols[key] = symbols.get(key, 0) + samples

    out = []
    out.append(f"flowgate profile: {meta.get('row', '?')}, {meta.get('title', '')}")
    out.append("")
    load_result = meta.get("load_result", "").split()
    load_line = meta.get("load", "")
    if len(load_result) == 5:
        rps, _, _, requests, errors = load_result
        load_line += f" ({float(rps):,.0f} requests/s over the whole run, {int(requests):,} requests, {errors} errors)"
    else:
        load_line += " (no valid load generator result)"
    out.append(f"load:       {load_line}")
    lost = "lost samples: ?" if lost is None else f"{lost:,} lost"
    out.append(
        f"recording:  perf record -F {meta.get('freq')} -g --call-graph dwarf,{meta.get('stack')} -p PID -- "
        f"sleep {meta.get('duration')} after {meta.get('warmup')} s of warm-up; event {meta.get('event') or '?'}; "
        f"{total:,} samples; {lost}"
    )
    out.append(f"flowgate:   {meta.get('flowgate', '?')}; one worker thread on core {meta.get('proxy_cpu')}, "
               f"load generator, origins and perf on core {meta.get('load_cpu')}")
    out.append(f"machine:    {meta.get('machine', '?')}")
    out.append("")
    out.append("Self time by where it was spent (share of flowgate's samples). A sample counts for the")
    out.append("function that holds the sampled instruction after inlining: with LTO much of hyper, http and")
    out.append("tokio is inlined into flowgate's async functions and the other way round (the flame graph")
    out.append("names the inlined frames).")
    out.append("")
    width = 64

    def line(indent, label, n):
        out.append(f"{' ' * indent}{label:<{width - indent}} {pct(n)} {n:>8,}")

    line(2, "kernel (syscalls, TCP over loopback, scheduling)", by_class["kernel"])
    line(2, "flowgate's binary (flowgate and the crates linked into it)", by_class["flowgate"])
    for label, n in sorted(crates.items(), key=lambda kv: -kv[1]):
        line(6, label, n)
    line(2, "libc", by_class["libc"])
    for label, n in libc.items():
        line(6, label, n)
    line(2, "other shared objects", by_class["other"])
    for label, n in sorted(others.items(), key=lambda kv: -kv[1])[:5]:
        line(6, label, n)
    out.append("")
    out.append(f"Top {TOP} symbols by self time (perf report --no-children --sort dso,symbol, the instances of")
    out.append(f"a generic function added up; [k] kernel, [.] user space; cut to {SYMBOL_MAX} characters):")
    out.append("")
    out.append("  share  samples  symbol")
    for (kind, name), n in sorted(symbols.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]:
        out.append(f"  {pct(n)} {n:>7,}  [{kind}] {cut(name, SYMBOL_MAX)}")
    sys.stdout.write("\n".join(out) + "\n")


def main(argv):
    if len(argv) == 2 and argv[1] == "shorten":
        shorten()
    elif len(argv) == 4 and argv[1] == "summary":
        summary(argv[2], argv[3])
    else:
        fail("usage: profile.py shorten < FOLDED | profile.py summary META REPORT")


if __name__ == "__main__":
    main(sys.argv)
