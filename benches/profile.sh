#!/usr/bin/env bash
# flowgate CPU profiles: where flowgate spends its time on each load path.
#
# Puts flowgate alone in front of the three nginx origins of benches/load.sh
# (the same configurations from benches/load/ and the same helpers, from
# benches/load/common.sh), with ONE worker thread pinned to one core, drives
# it from the other core with the load generator load.sh uses for the path,
# and after 1 s of warm-up records the flowgate process with
#
#   perf record -F 999 -g --call-graph dwarf,16384 -p PID -- sleep DURATION
#
# (perf itself runs on the load generator's core). Then, per path, a flame
# graph and a text summary. The paths, named as in benches/load.sh:
#
#   ka-100      HTTP/1.1 keep-alive, 100 B body          wrk -t1 -c64
#   ka-16k      HTTP/1.1 keep-alive, 16 KiB body         wrk -t1 -c64
#   close       Connection: close (connection/request)   wrk -t1 -c64 -H 'Connection: close'
#   tls-ka      TLS 1.3 keep-alive                       wrk -t1 -c64 https
#   tls-close   TLS 1.3, new handshake per request       wrk -t1 -c64 https + Connection: close
#   h2          h2 over TLS 1.3                          h2load -t1 -c64 -m4
#
# Every request must be answered 2xx (as in load.sh): a path whose load
# generator saw a non-2xx answer or a socket error still gets its profile,
# but the run exits 1.
#
# Usage (from any directory; as root: perf needs it to record the kernel's
# part of the stacks and to read kernel symbols, and the script installs what
# it needs from Debian's packages):
#   benches/profile.sh                     # all six paths, 5 s each, about 3 minutes
#   ROWS="ka-100 h2" DURATION=3 benches/profile.sh
#   FLOWGATE_BIN=target/profiling/release/flowgate OUT_DIR=/tmp/prof benches/profile.sh
#
# Environment:
#   ROWS          paths to profile, from the list above (default: all six)
#   DURATION      recorded seconds per path, after 1 s of warm-up (default 5)
#   CONNECTIONS   client connections of wrk and h2load (default 64)
#   H2_STREAMS    h2load -m, concurrent streams per connection (default 4)
#   PROXY_CPU     core of flowgate (default: first allowed core)
#   LOAD_CPU      core of the origins, the load generator and perf (default:
#                 second)
#   FLOWGATE_BIN  profile this flowgate binary instead of building one; it
#                 must keep its symbols (not stripped), and line tables let
#                 perf name inlined frames. By default the script builds one
#                 with line tables:
#                   CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#                   CARGO_TARGET_DIR=target/profiling cargo build --release --locked
#                 (a target directory of its own, so that this build and the
#                 plain release build in target/ do not rebuild each other)
#   OUT_DIR       where the flame graphs and summaries go (default
#                 docs/profiles; relative to the current directory if given)
#   MINWIDTH      inferno-flamegraph --minwidth, in percent of the samples:
#                 narrower frames are left out (default 0.1)
#   KEEP_TMP=1    keep the temporary directory (configs, logs, perf.data,
#                 the collapsed stacks)
#
# Tools: perf from Debian's linux-perf and load.sh's tools (wrk, h2load,
# nginx, curl, openssl, python3), installed with apt-get when missing;
# inferno-collapse-perf and inferno-flamegraph from PATH, else from
# target/tools/bin, else installed there first with
#   cargo install inferno --locked --root target/tools
#
# Everything listens on 127.0.0.1 only: origins on 19101..19103 (and 19111,
# unused here), flowgate on 19080 (plain) and 19443 (TLS), its admin listener
# on 19090. Every process the script starts is recorded by PID and stopped on
# exit; every wait is bounded.
# Output: per path, OUT_DIR/<row>.svg (the flame graph, inferno) and
# OUT_DIR/<row>.txt (the load and the recording, the split of the samples
# between the kernel, flowgate's binary by crate, libc's allocator and
# copies, and the rest, and the top 25 symbols by self time).
# Exit status: 0 when every path was profiled without a single error, 1
# otherwise, 2 on usage errors.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
TEMPLATES="$SCRIPT_DIR/load"
TOOLS_ROOT="$REPO_ROOT/target/tools"

ALL_ROWS="ka-100 ka-16k close tls-ka tls-close h2"

DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
H2_STREAMS=${H2_STREAMS:-4}
ROWS=${ROWS:-$ALL_ROWS}
MINWIDTH=${MINWIDTH:-0.1}
KEEP_TMP=${KEEP_TMP:-0}
OUT_DIR=${OUT_DIR:-$REPO_ROOT/docs/profiles}
if [[ $OUT_DIR != /* ]]; then OUT_DIR="$PWD/$OUT_DIR"; fi
if [[ -n ${FLOWGATE_BIN:-} && $FLOWGATE_BIN != /* ]]; then
    FLOWGATE_BIN="$PWD/$FLOWGATE_BIN"
fi

# Ports, deadlines, logging and the helpers shared with benches/load.sh.
LOG_TAG=profile
# shellcheck source-path=SCRIPTDIR source=load/common.sh
source "$TEMPLATES/common.sh"
TAIL=2                    # seconds of load after the recording's end (perf's start-up)
PERF_FREQ=999             # perf record -F
PERF_STACK=16384          # bytes of user stack copied per sample (dwarf unwinding)
REPORT_DEADLINE=600       # seconds perf script / perf report may take per path

positive "$DURATION" || usage_error "DURATION must be a positive integer (seconds), got '$DURATION'"
((DURATION <= 600)) || usage_error "DURATION must be at most 600 seconds, got '$DURATION'"
positive "$CONNECTIONS" || usage_error "CONNECTIONS must be a positive integer, got '$CONNECTIONS'"
positive "$H2_STREAMS" || usage_error "H2_STREAMS must be a positive integer, got '$H2_STREAMS'"
[[ $MINWIDTH =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "MINWIDTH must be a number (percent), got '$MINWIDTH'"
ROWS=$(checked_list ROWS "$ALL_ROWS" "$ROWS")

# cleanup (benches/load/common.sh) stops every process started and removes
# the temporary directory.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The title of each path in the flame graphs and summaries (as in load.sh's
# report).
row_title() {
    case $1 in
        ka-100) echo "HTTP/1.1 keep-alive, 100 B body" ;;
        ka-16k) echo "HTTP/1.1 keep-alive, 16 KiB body" ;;
        close) echo "HTTP/1.1 Connection: close (new client connection per request)" ;;
        tls-ka) echo "TLS 1.3 keep-alive, 100 B body" ;;
        tls-close) echo "TLS 1.3, new handshake per request" ;;
        h2) echo "h2 over TLS 1.3, 100 B body" ;;
    esac
}

# --------------------------------------------------------------------------
# Tools

# The profiling build: release with line tables, in a target directory of
# its own. Sets FLOWGATE_BIN (build_flowgate, common.sh).
build_profiling_flowgate() {
    if [[ -n ${FLOWGATE_BIN:-} ]]; then
        build_flowgate
        return
    fi
    export CARGO_TARGET_DIR="$REPO_ROOT/target/profiling"
    export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
    log "flowgate: profiling build, CARGO_PROFILE_RELEASE_DEBUG=$CARGO_PROFILE_RELEASE_DEBUG CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
    build_flowgate && BUILT_HERE=1
}

# Finds inferno-collapse-perf and inferno-flamegraph (PATH, then
# target/tools/bin) or installs them into target/tools with cargo. Sets
# COLLAPSE and FLAMEGRAPH.
find_inferno() {
    if command -v inferno-collapse-perf >/dev/null 2>&1 && command -v inferno-flamegraph >/dev/null 2>&1; then
        COLLAPSE=$(command -v inferno-collapse-perf)
        FLAMEGRAPH=$(command -v inferno-flamegraph)
        return 0
    fi
    COLLAPSE="$TOOLS_ROOT/bin/inferno-collapse-perf"
    FLAMEGRAPH="$TOOLS_ROOT/bin/inferno-flamegraph"
    [[ -x $COLLAPSE && -x $FLAMEGRAPH ]] && return 0
    command -v cargo >/dev/null 2>&1 || die "inferno is not installed and there is no cargo to install it"
    log "inferno: cargo install inferno --locked --root $TOOLS_ROOT (log: $TMP/inferno-install.log)"
    if ! run_waited timeout -k 10 1800 cargo install inferno --locked --root "$TOOLS_ROOT" \
        >"$TMP/inferno-install.log" 2>&1; then
        tail -n 30 "$TMP/inferno-install.log" >&2
        die "could not install inferno"
    fi
    [[ -x $COLLAPSE && -x $FLAMEGRAPH ]] || die "inferno installed, but $COLLAPSE is missing"
}

# --------------------------------------------------------------------------
# One path: load, record, flame graph, summary.

FAILED=0

profile_row() {
    local row=$1 base="$TMP/out/$1" title load_pid rc=0 load_rc=0 parsed="" errors
    title=$(row_title "$row")
    if ! start_proxy flowgate; then
        log "$row: flowgate did not start"
        FAILED=1
        return
    fi
    load_command "$row" "$PROXY_PORT" $((WARMUP + DURATION + TAIL)) "" "$TLS_PORT"
    log "$row: ${LOAD[*]}"
    timeout -k 5 $((WARMUP + DURATION + TAIL + 60)) "${LOAD[@]}" </dev/null >"$base.load.txt" 2>&1 &
    load_pid=$!
    STARTED_PIDS+=("$load_pid")
    sleep "$WARMUP"
    log "$row: recording flowgate (PID $PROXY_PID) for ${DURATION}s"
    run_waited timeout -k 5 $((DURATION + 60)) taskset -c "$LOAD_CPU" \
        perf record -F "$PERF_FREQ" -g --call-graph "dwarf,$PERF_STACK" -o "$base.perf.data" \
        -p "$PROXY_PID" -- sleep "$DURATION" >"$base.record.log" 2>&1 || rc=$?
    if [[ ! -d /proc/$load_pid ]]; then
        log "$row: the load generator ended before the recording did"
        FAILED=1
    fi
    wait "$load_pid" || load_rc=$?
    forget_pid "$load_pid"
    stop_proxy

    if ((rc != 0)) || [[ ! -s $base.perf.data ]]; then
        log "$row: perf record failed (exit $rc):"
        sed 's/^/    /' "$base.record.log" >&2
        FAILED=1
        return
    fi
    if ((load_rc != 0)); then
        log "$row: load generator failed (exit $load_rc):"
        tail -n 20 "$base.load.txt" | sed 's/^/    /' >&2
        FAILED=1
    elif [[ $row == h2 ]] && ! grep -q '^Application protocol: h2' "$base.load.txt"; then
        log "$row: h2 was not negotiated:"
        sed 's/^/    /' "$base.load.txt" >&2
        FAILED=1
    else
        local tool=wrk
        [[ $row == h2 ]] && tool=h2load
        parsed=$(python3 "$TEMPLATES/results.py" "$tool" "$base.load.txt") || parsed=""
        errors=${parsed##* }
        if [[ -z $parsed ]]; then
            sed 's/^/    /' "$base.load.txt" >&2
            log "$row: unreadable load generator output"
            FAILED=1
        elif [[ $errors != 0 ]]; then
            log "$row: $errors requests not answered 2xx"
            FAILED=1
        fi
    fi

    # The flame graph. No period among perf script's fields: inferno then
    # counts samples (with it, nanoseconds of cpu-clock). Inlined frames are
    # named from the line tables.
    log "$row: perf script | inferno-collapse-perf | inferno-flamegraph"
    if ! run_waited timeout -k 5 "$REPORT_DEADLINE" perf script -i "$base.perf.data" \
        -F comm,pid,tid,time,event,ip,sym,dso >"$base.script" 2>"$base.script.log"; then
        tail -n 20 "$base.script.log" | sed 's/^/    /' >&2
        die "$row: perf script failed"
    fi
    run_waited timeout -k 5 "$REPORT_DEADLINE" "$COLLAPSE" --kernel "$base.script" >"$base.folded" ||
        die "$row: inferno-collapse-perf failed"
    rm -f "$base.script"
    python3 "$TEMPLATES/profile.py" shorten <"$base.folded" >"$base.short.folded" ||
        die "$row: could not shorten the stacks"
    local samples
    samples=$(awk '{ n += $NF } END { print n + 0 }' "$base.short.folded")
    run_waited timeout -k 5 "$REPORT_DEADLINE" "$FLAMEGRAPH" --title "flowgate $title" \
        --subtitle "${LOAD[*]}: perf record -F $PERF_FREQ --call-graph dwarf for ${DURATION}s, $samples samples" \
        --minwidth "$MINWIDTH" --colors rust --deterministic \
        "$base.short.folded" >"$OUT_DIR/$row.svg" || die "$row: inferno-flamegraph failed"

    # The summary: self time by shared object and symbol.
    log "$row: perf report"
    if ! run_waited timeout -k 5 "$REPORT_DEADLINE" perf report -i "$base.perf.data" --no-children \
        --sort dso,symbol -g none -n --stdio --field-separator=$'\t' >"$base.report" 2>"$base.report.log"; then
        tail -n 20 "$base.report.log" | sed 's/^/    /' >&2
        die "$row: perf report failed"
    fi
    {
        printf 'row\t%s\n' "$row"
        printf 'title\t%s\n' "$title"
        printf 'load\t%s\n' "${LOAD[*]}"
        printf 'load_result\t%s\n' "$parsed"
        printf 'duration\t%s\n' "$DURATION"
        printf 'warmup\t%s\n' "$WARMUP"
        printf 'freq\t%s\n' "$PERF_FREQ"
        printf 'stack\t%s\n' "$PERF_STACK"
        printf 'event\t%s\n' "$(perf evlist -i "$base.perf.data" 2>/dev/null | head -n 1)"
        printf 'flowgate\t%s\n' "$FLOWGATE_DESC"
        printf 'binary\t%s\n' "${FLOWGATE_BIN##*/}"
        printf 'machine\t%s\n' "$MACHINE_DESC"
        printf 'proxy_cpu\t%s\n' "$PROXY_CPU"
        printf 'load_cpu\t%s\n' "$LOAD_CPU"
    } >"$base.meta"
    python3 "$TEMPLATES/profile.py" summary "$base.meta" "$base.report" >"$OUT_DIR/$row.txt" ||
        die "$row: could not write the summary"
    log "$row: $(stat -c %s "$OUT_DIR/$row.svg") B flame graph, summary $OUT_DIR/$row.txt"
    if [[ $KEEP_TMP != 1 ]]; then rm -f "$base.perf.data" "$base.folded"; fi
}

# --------------------------------------------------------------------------
# Main

[[ $(id -u) == 0 ]] || die "perf needs root here (kernel stacks and symbols, any perf_event_paranoid): run as root"
install_missing wrk:wrk nginx:nginx-light curl:curl taskset:util-linux openssl:openssl \
    python3:python3 h2load:nghttp2-client perf:linux-perf
for cmd in wrk h2load nginx curl taskset timeout awk openssl python3 perf; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done
perf version >/dev/null 2>&1 || die "perf does not run: $(perf version 2>&1 | head -n 3)"
pick_cpus

make_tmp flowgate-profile
check_ports_free

# Build and install first, so that compiling never overlaps a recording.
FLOWGATE_BUILT=no
BUILT_HERE=0
if build_profiling_flowgate; then FLOWGATE_BUILT=ok; else die "could not build flowgate"; fi
find_inferno
mkdir -p "$OUT_DIR"

cpu_model=$(machine_cpu)
MACHINE_DESC="$(nproc) cores ($cpu_model), kernel $(uname -r), $(perf version 2>&1 | head -n 1)"
flowgate_version=$("$FLOWGATE_BIN" --version 2>&1 | head -n 1) || true
git_describe=$(git -C "$REPO_ROOT" describe --always --dirty --tags 2>/dev/null || echo "no git")
if ((BUILT_HERE)); then
    FLOWGATE_DESC="${flowgate_version:-unknown}, built from $git_describe (release, line tables)"
else
    FLOWGATE_DESC="${flowgate_version:-unknown}, a binary given by FLOWGATE_BIN (checkout: $git_describe)"
fi

make_certificate
start_origins

RUN_START=$SECONDS
for row in $ROWS; do profile_row "$row"; done
log "profiled in $((SECONDS - RUN_START)) s; flame graphs and summaries in $OUT_DIR"

if ((FAILED)); then log "FAILED: some requests were not answered 2xx, or some paths were not profiled"; fi
exit "$FAILED"
