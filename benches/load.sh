#!/usr/bin/env bash
# flowgate end-to-end load harness: flowgate beside HAProxy and nginx.
#
# Puts flowgate, HAProxy and nginx in turn in front of three nginx origins on
# loopback, each proxy with ONE worker thread pinned to one core, drives it
# from the other core, and reports per path the proxy's CPU seconds per
# 10,000 requests (the headline: it holds on a noisy machine), requests/s,
# p50/p99 latency, the ratios to HAProxy and the errors. The paths:
#
#   ka-100          HTTP/1.1 keep-alive, 100 B body          wrk -t1 -c64
#   ka-16k          HTTP/1.1 keep-alive, 16 KiB body         wrk -t1 -c64
#   close           Connection: close (connection/request)   wrk -t1 -c64 -H 'Connection: close'
#   tls-ka          TLS 1.3 keep-alive                       wrk -t1 -c64 https
#   tls-close       TLS 1.3, new handshake per request       wrk -t1 -c64 https + Connection: close
#   h2              h2 over TLS 1.3                          h2load -t1 -c64 -m4
#   ka-100-log      ka-100 with flowgate's access log on (to a file), flowgate only
#   ka-100-threads  ka-100 with 1 and 2 threads (flowgate threads, HAProxy nbthread),
#                   proxy and wrk -t2 unpinned
#
# and "direct" (the load generator straight at an origin) as the floor. Then
# idle memory: IDLE_CONNS client connections held open against each proxy
# (plain, and TLS with the handshake completed), the proxy's resident memory
# before and after, per connection.
#
# Every repetition runs every path, and within a path every proxy in turn
# (the order rotates between repetitions), so drift on a shared machine hits
# all of them alike; the report gives medians and min-max. Every request must
# be answered 2xx: any non-2xx answer, socket error or failed request fails
# the run.
#
# Usage (from any directory; as root, so that it can install what it needs
# from Debian's packages and raise the open-files limit):
#   benches/load.sh                    # the full comparison, about 25 minutes
#   SMOKE=1 benches/load.sh            # 2 s per cell, 1 repetition, 500 idle connections
#   REPS=5 DURATION=20 benches/load.sh
#   ROWS="ka-100 h2" PROXIES="flowgate haproxy" benches/load.sh
#
# Environment:
#   REPS          repetitions (default 3; 1 with SMOKE=1); ROUNDS is an alias
#   DURATION      measured seconds per cell (default 10; 2 with SMOKE=1)
#   CONNECTIONS   client connections of wrk and h2load (default 64)
#   H2_STREAMS    h2load -m, concurrent streams per connection (default 4)
#   ROWS          paths to run, from the list above (default: all)
#   PROXIES       among flowgate haproxy nginx direct (default: all four)
#   IDLE_CONNS    held connections for the idle-memory measurement (default
#                 5000; 500 with SMOKE=1; 0 skips it)
#   SMOKE=1       the short run for CI
#   PROXY_CPU     core of the proxy under test (default: first allowed core)
#   LOAD_CPU      core of the origins and the load generator (default: second)
#   FLOWGATE_BIN  use this flowgate binary instead of building one
#   CARGO_TARGET_DIR  honoured by the build, as by cargo itself
#   UPDATE_DOCS   1: write the report into docs/performance.md; 0: don't;
#                 default: only for a full run (no SMOKE, every path and
#                 proxy) that had no errors
#   KEEP_TMP=1    keep the temporary directory (configs, logs, raw outputs)
#
# Everything listens on 127.0.0.1 only: origins on 19101..19103 (and 19111
# with TLS, for the direct rows), the proxy under test on 19080 (plain) and
# 19443 (TLS), flowgate's admin listener on 19090. Every process the script
# starts is recorded by PID and stopped on exit; every wait is bounded.
# Output: the Markdown report on stdout and in benches/results/<time>.md.
# Exit status: 0 when every cell was measured without a single error, 1
# otherwise, 2 on usage errors.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
TEMPLATES="$SCRIPT_DIR/load"
RESULTS_DIR="$SCRIPT_DIR/results"
DOC="$REPO_ROOT/docs/performance.md"

ALL_ROWS="ka-100 ka-16k close tls-ka tls-close h2 ka-100-log ka-100-threads"
ALL_PROXIES="flowgate haproxy nginx direct"

# The command as run, with the settings that were given, for the report.
COMMAND=""
for var in SMOKE REPS ROUNDS DURATION CONNECTIONS H2_STREAMS ROWS PROXIES IDLE_CONNS \
    PROXY_CPU LOAD_CPU FLOWGATE_BIN UPDATE_DOCS; do
    if [[ -n ${!var+x} ]]; then COMMAND+="$var=$(printf '%q' "${!var}") "; fi
done
COMMAND+="benches/load.sh"

SMOKE=${SMOKE:-0}
REPS=${REPS:-${ROUNDS:-}}
if [[ $SMOKE == 1 ]]; then
    DURATION=${DURATION:-2}
    REPS=${REPS:-1}
    IDLE_CONNS=${IDLE_CONNS:-500}
else
    DURATION=${DURATION:-10}
    REPS=${REPS:-3}
    IDLE_CONNS=${IDLE_CONNS:-5000}
fi
CONNECTIONS=${CONNECTIONS:-64}
H2_STREAMS=${H2_STREAMS:-4}
ROWS=${ROWS:-$ALL_ROWS}
PROXIES=${PROXIES:-$ALL_PROXIES}
KEEP_TMP=${KEEP_TMP:-0}
UPDATE_DOCS=${UPDATE_DOCS:-auto}
# cargo reads a relative CARGO_TARGET_DIR against its working directory, and
# it builds from the repository root: make it absolute against the caller's.
if [[ -n ${CARGO_TARGET_DIR:-} && $CARGO_TARGET_DIR != /* ]]; then
    export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi
if [[ -n ${FLOWGATE_BIN:-} && $FLOWGATE_BIN != /* ]]; then
    FLOWGATE_BIN="$PWD/$FLOWGATE_BIN"
fi

# Ports, deadlines, logging and the helpers shared with benches/profile.sh.
LOG_TAG=load
# shellcheck source-path=SCRIPTDIR source=load/common.sh
source "$TEMPLATES/common.sh"
IDLE_DEADLINE=300         # seconds one idle-memory measurement may take

positive "$DURATION" || usage_error "DURATION must be a positive integer (seconds), got '$DURATION'"
positive "$CONNECTIONS" || usage_error "CONNECTIONS must be a positive integer, got '$CONNECTIONS'"
positive "$H2_STREAMS" || usage_error "H2_STREAMS must be a positive integer, got '$H2_STREAMS'"
{ positive "$REPS" && ((REPS <= 100)); } || usage_error "REPS must be an integer from 1 to 100, got '$REPS'"
{ [[ $IDLE_CONNS =~ ^[0-9]+$ ]] && ((IDLE_CONNS <= 50000)); } ||
    usage_error "IDLE_CONNS must be an integer from 0 to 50000, got '$IDLE_CONNS'"
[[ $UPDATE_DOCS =~ ^(auto|0|1)$ ]] || usage_error "UPDATE_DOCS must be auto, 0 or 1, got '$UPDATE_DOCS'"

ROWS=$(checked_list ROWS "$ALL_ROWS" "$ROWS")
PROXIES=$(checked_list PROXIES "$ALL_PROXIES" "$PROXIES")

wants() { [[ " $PROXIES " == *" $1 "* ]]; }

# cleanup (benches/load/common.sh) stops every process started and removes
# the temporary directory.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------------
# Tools

# Raises the open-files limit as far as allowed (the proxies inherit it) and
# checks that it is enough for IDLE_CONNS held connections. HAProxy sizes
# itself by maxconn and wants about two descriptors per connection: its
# maxconn is derived from the limit (HAPROXY_MAXCONN).
raise_nofile() {
    local hard want=$((IDLE_CONNS + 1024))
    hard=$(ulimit -Hn)
    [[ $hard == unlimited ]] && hard=1048576
    (($(ulimit -n) >= hard)) || ulimit -n "$hard"
    NOFILE=$(ulimit -n)
    ((NOFILE >= want)) || die "open-files limit $NOFILE is below the $want that IDLE_CONNS=$IDLE_CONNS needs"
    HAPROXY_MAXCONN=$(((NOFILE - 1024) / 2))
    ((HAPROXY_MAXCONN <= 50000)) || HAPROXY_MAXCONN=50000
    if wants haproxy && ((HAPROXY_MAXCONN < IDLE_CONNS + 256)); then
        die "open-files limit $NOFILE leaves HAProxy a maxconn of $HAPROXY_MAXCONN, too few for IDLE_CONNS=$IDLE_CONNS"
    fi
}

# --------------------------------------------------------------------------
# Measurements

# CPU seconds (utime + stime) of PID and its descendants, as a decimal.
cpu_seconds() {
    local ticks
    ticks=$(cpu_ticks "$1") || ticks=0
    awk -v t="$ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", t / hz }'
}

# Resident memory (VmRSS, KB) of PID and its descendants.
rss_kb() {
    local root=$1 pid kb total=0
    while read -r pid; do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || kb=0
        total=$((total + ${kb:-0}))
    done < <(proc_tree "$root")
    echo "$total"
}

# Open file descriptors of PID and its descendants.
fd_count() {
    local root=$1 pid total=0 fds
    while read -r pid; do
        fds=(/proc/"$pid"/fd/*)
        [[ -e ${fds[0]} ]] && total=$((total + ${#fds[@]}))
    done < <(proc_tree "$root")
    echo "$total"
}

# "busy total" jiffies of core N from /proc/stat (busy excludes idle and iowait).
core_jiffies() {
    awk -v cpu="cpu$1" '$1 == cpu {
        t = $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9
        print t - $5 - $6, t; exit }' /proc/stat
}

# Percent busy between two core_jiffies samples.
busy_percent() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        if (y[2] > x[2]) printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]); else print "nan" }'
}

FAILED=0
CELLS_TSV=""
IDLE_TSV=""

# Records a cell that could not be measured.
fail_cell() {
    local row=$1 variant=$2 what=$3
    printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t\t\t\n' "$row" "$variant" "$REP" "$what" >>"$CELLS_TSV"
    FAILED=1
}

# Warms up, then measures ROW through VARIANT (whose process is PID, empty
# for direct) and appends one line to the cells table.
measure() {
    local row=$1 variant=$2 pid=$3 port=$4 tls_port=$5
    local base="$TMP/out/$row-$variant-rep$REP" rc=0 parsed
    local cpu0="" cpu1="" ocpu0 ocpu1 pcore0 pcore1 lcore0 lcore1 threads0="" busiest=nan
    load_command "$row" "$port" "$WARMUP" "" "$tls_port"
    run_waited timeout -k 5 $((WARMUP + 60)) "${LOAD[@]}" >"$base.warmup.txt" 2>&1 || true
    # The warm-up's answers must be 2xx as well.
    local tool=wrk warm
    [[ $row == h2 ]] && tool=h2load
    warm=$(python3 "$TEMPLATES/results.py" "$tool" "$base.warmup.txt" 2>/dev/null) || warm=""
    if [[ -z $warm || ${warm##* } != 0 ]]; then
        log "$row / $variant: warm-up failed or had errors:"
        tail -n 20 "$base.warmup.txt" | sed 's/^/    /' >&2
        fail_cell "$row" "$variant" "errors in warm-up"
        return
    fi
    load_command "$row" "$port" "$DURATION" "$base.h2log" "$tls_port"
    log "$row / $variant (rep $REP): ${LOAD[*]}"
    if [[ -n $pid ]]; then cpu0=$(cpu_seconds "$pid"); fi
    # How evenly a two-thread proxy spread the work over its threads.
    if [[ -n $pid && $variant == *-2t ]]; then threads0=$(thread_ticks "$pid"); fi
    ocpu0=$(cpu_seconds "$ORIGINS_PID")
    pcore0=$(core_jiffies "$PROXY_CPU")
    lcore0=$(core_jiffies "$LOAD_CPU")
    run_waited timeout -k 5 $((DURATION + 60)) "${LOAD[@]}" >"$base.txt" 2>&1 || rc=$?
    if [[ -n $pid ]]; then cpu1=$(cpu_seconds "$pid"); fi
    if [[ -n $threads0 ]]; then busiest=$(busiest_thread "$threads0" "$(thread_ticks "$pid")"); fi
    ocpu1=$(cpu_seconds "$ORIGINS_PID")
    pcore1=$(core_jiffies "$PROXY_CPU")
    lcore1=$(core_jiffies "$LOAD_CPU")
    if ((rc != 0)); then
        log "$row / $variant: load generator failed (exit $rc):"
        tail -n 20 "$base.txt" | sed 's/^/    /' >&2
        fail_cell "$row" "$variant" "load generator failed"
        return
    fi
    if [[ $row == h2 ]]; then
        if ! grep -q '^Application protocol: h2' "$base.txt"; then
            log "$row / $variant: h2 was not negotiated:"
            sed 's/^/    /' "$base.txt" >&2
            fail_cell "$row" "$variant" "no h2 by ALPN"
            return
        fi
        parsed=$(python3 "$TEMPLATES/results.py" h2load "$base.txt" "$base.h2log") || parsed=""
        rm -f "$base.h2log"
    else
        parsed=$(python3 "$TEMPLATES/results.py" wrk "$base.txt") || parsed=""
    fi
    if [[ -z $parsed ]]; then
        sed 's/^/    /' "$base.txt" >&2
        fail_cell "$row" "$variant" "unreadable output"
        return
    fi
    local rps p50 p99 requests errors proxy_cpu="" pbusy="nan"
    read -r rps p50 p99 requests errors <<<"$parsed"
    if [[ -n $pid ]]; then
        proxy_cpu=$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.3f", b - a }')
        if [[ $variant != *-?t ]]; then pbusy=$(busy_percent "$pcore0" "$pcore1"); fi
    fi
    printf '%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$variant" "$REP" \
        "$rps" "$p50" "$p99" "$requests" "$errors" "$proxy_cpu" \
        "$(awk -v a="$ocpu0" -v b="$ocpu1" 'BEGIN { printf "%.3f", b - a }')" \
        "$pbusy" "$(busy_percent "$lcore0" "$lcore1")" "$busiest" >>"$CELLS_TSV"
    log "$row / $variant: $rps req/s, p99 $p99 ms, $requests requests, proxy CPU ${proxy_cpu:-n/a} s, errors $errors"
    if ((errors > 0)); then
        log "$row / $variant: $errors requests not answered 2xx:"
        grep -E 'Non-2xx|Socket errors|^requests:|^status codes:' "$base.txt" | sed 's/^/    /' >&2
        FAILED=1
    fi
}

# --------------------------------------------------------------------------
# Cells. start_proxy and stop_proxy are in benches/load/common.sh.

run_cell() {
    local row=$1 variant=$2
    if [[ $variant == direct ]]; then
        measure "$row" direct "" "${ORIGIN_PORTS[0]}" "$ORIGIN_TLS_PORT"
        return
    fi
    if ! start_proxy "$variant"; then
        fail_cell "$row" "$variant" "did not start"
        return
    fi
    measure "$row" "$variant" "$PROXY_PID" "$PROXY_PORT" "$TLS_PORT"
    stop_proxy
}

# The variants of ROW, in the order of repetition REP (rotated each time).
row_variants() {
    local row=$1 list=() p i n
    case $row in
        ka-100-log) wants flowgate && list=(flowgate-log) ;;
        ka-100-threads)
            wants flowgate && list+=(flowgate-1t flowgate-2t)
            wants haproxy && list+=(haproxy-1t haproxy-2t)
            ;;
        *) for p in $PROXIES; do list+=("$p"); done ;;
    esac
    n=${#list[@]}
    for ((i = 0; i < n; i++)); do echo "${list[(i + REP - 1) % n]}"; done
}

# --------------------------------------------------------------------------
# Idle memory: hold IDLE_CONNS connections against VARIANT (plain or TLS).

# Reads one line from the holder into HOLD_LINE, bounded in time.
hold_read() {
    HOLD_LINE=""
    [[ -n ${HOLD[0]:-} ]] || return 1
    read -r -t "$IDLE_DEADLINE" HOLD_LINE <&"${HOLD[0]}" || return 1
}

hold_say() {
    [[ -n ${HOLD[1]:-} ]] || return 1
    echo "$1" >&"${HOLD[1]}"
}

idle_memory() {
    local variant=$1 kind=$2 port=$PROXY_PORT tls=() status=ok
    local start fresh="" requested="" held=0 connected=0 fd0 deadline
    [[ $kind == tls ]] && port=$TLS_PORT tls=(--tls)
    if ! start_proxy "$variant"; then
        printf '%s\t%s\t%s\t%s\t0\t0\t\t\t\tdid not start\n' "$variant" "$REP" "$kind" "$IDLE_CONNS" >>"$IDLE_TSV"
        FAILED=1
        return
    fi
    sleep 0.5
    start=$(rss_kb "$PROXY_PID")
    fd0=$(fd_count "$PROXY_PID")
    log "idle memory / $variant / $kind (rep $REP): holding $IDLE_CONNS connections; RSS at start $start KB"
    coproc HOLD {
        exec taskset -c "$LOAD_CPU" timeout -k 5 "$IDLE_DEADLINE" python3 "$TEMPLATES/hold_conns.py" \
            --port "$port" --count "$IDLE_CONNS" "${tls[@]}" --deadline "$((IDLE_DEADLINE - 10))" \
            2>"$TMP/hold-$variant-$kind.log"
    }
    # shellcheck disable=SC2153  # HOLD_PID is set by coproc
    local hold_pid=$HOLD_PID
    STARTED_PIDS+=("$hold_pid")
    if hold_read && [[ $HOLD_LINE =~ ^connected\ ([0-9]+)\ ([0-9]+)$ ]]; then
        connected=${BASH_REMATCH[1]}
        ((BASH_REMATCH[2] == 0 && connected == IDLE_CONNS)) || status="only $connected connected"
        # Plain connections count as connected once in the listen backlog:
        # wait (bounded) until the proxy has accepted them all.
        deadline=$((SECONDS + 20))
        while (($(fd_count "$PROXY_PID") < fd0 + connected && SECONDS < deadline)); do sleep 0.2; done
        sleep 1
        fresh=$(rss_kb "$PROXY_PID")
        hold_say request || true
        if hold_read && [[ $HOLD_LINE =~ ^requested\ ([0-9]+)\ ([0-9]+)$ ]]; then
            ((BASH_REMATCH[1] == connected)) || status="${BASH_REMATCH[2]} requests not answered 2xx"
            sleep 1
            requested=$(rss_kb "$PROXY_PID")
            hold_say "done" || true
            if hold_read && [[ $HOLD_LINE =~ ^held\ ([0-9]+)$ ]]; then
                held=${BASH_REMATCH[1]}
                ((held == IDLE_CONNS)) || status="proxy closed $((IDLE_CONNS - held)) connections"
            else
                status="holder failed: ${HOLD_LINE:-no answer}"
            fi
        else
            status="holder failed: ${HOLD_LINE:-no answer}"
        fi
    else
        status="holder failed: ${HOLD_LINE:-no answer}"
    fi
    if [[ $status != ok ]]; then
        log "idle memory / $variant / $kind: $status"
        sed 's/^/    /' "$TMP/hold-$variant-$kind.log" >&2 || true
        FAILED=1
    fi
    stop_pid "$hold_pid"
    forget_pid "$hold_pid"
    log "idle memory / $variant / $kind: RSS $start -> ${fresh:-?} (connected) -> ${requested:-?} KB (after one request each)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$variant" "$REP" "$kind" "$IDLE_CONNS" \
        "$connected" "$held" "$start" "$fresh" "$requested" "$status" >>"$IDLE_TSV"
    stop_proxy
}

# --------------------------------------------------------------------------
# Main

install_missing wrk:wrk nginx:nginx-light curl:curl taskset:util-linux openssl:openssl \
    python3:python3 h2load:nghttp2-client haproxy:haproxy
for cmd in wrk h2load nginx curl taskset timeout awk getconf openssl python3; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done
if wants haproxy; then command -v haproxy >/dev/null 2>&1 || die "haproxy not found"; fi
CLK_TCK=$(getconf CLK_TCK)
pick_cpus
raise_nofile

make_tmp flowgate-load
CELLS_TSV="$TMP/cells.tsv"
IDLE_TSV="$TMP/idle.tsv"
printf 'row\tvariant\trep\tstatus\trps\tp50_ms\tp99_ms\trequests\terrors\tproxy_cpu_s\torigin_cpu_s\tproxy_busy\tload_busy\tbusiest_thread\n' >"$CELLS_TSV"
printf 'variant\trep\tkind\tcount\tconnected\theld\trss_start_kb\trss_fresh_kb\trss_request_kb\tstatus\n' >"$IDLE_TSV"

check_ports_free

# Build first, so that compiling never overlaps a measurement.
FLOWGATE_BUILT=no
if wants flowgate; then
    if build_flowgate; then FLOWGATE_BUILT=ok; else FLOWGATE_BUILT=failed; fi
fi

make_certificate
start_origins

RUN_START=$SECONDS
for ((REP = 1; REP <= REPS; REP++)); do
    log "repetition $REP of $REPS"
    for row in $ROWS; do
        mapfile -t variants < <(row_variants "$row")
        for variant in "${variants[@]}"; do run_cell "$row" "$variant"; done
    done
    if ((IDLE_CONNS > 0)); then
        for variant in $(row_variants ka-100); do
            [[ $variant == direct ]] && continue
            idle_memory "$variant" plain
            idle_memory "$variant" tls
        done
    fi
done
log "measured in $((SECONDS - RUN_START)) s"

# --------------------------------------------------------------------------
# Report

cpu_model=$(machine_cpu)
flowgate_version="not built"
if [[ $FLOWGATE_BUILT == ok ]]; then flowgate_version=$(first_line "$FLOWGATE_BIN" --version); fi
git_describe=$(git -C "$REPO_ROOT" describe --always --dirty --tags 2>/dev/null || echo "no git")
haproxy_version="haproxy: not installed"
if command -v haproxy >/dev/null 2>&1; then haproxy_version=$(first_line haproxy -v); fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
META="$TMP/meta.tsv"
{
    printf 'stamp\t%s\n' "$stamp"
    printf 'command\t%s\n' "$COMMAND"
    printf 'flowgate\t%s, %s\n' "$git_describe" "$flowgate_version"
    printf 'haproxy\t%s\n' "$haproxy_version"
    printf 'nginx\t%s\n' "$(first_line nginx -v)"
    printf 'wrk\t%s\n' "$(first_line wrk -v)"
    printf 'h2load\t%s\n' "$(first_line h2load --version)"
    printf 'openssl\t%s\n' "$(first_line openssl version)"
    printf 'machine\t%s cores (%s), kernel %s\n' "$(nproc)" "$cpu_model" "$(uname -r)"
    printf 'duration\t%s\n' "$DURATION"
    printf 'warmup\t%s\n' "$WARMUP"
    printf 'reps\t%s\n' "$REPS"
    printf 'proxy_cpu\t%s\n' "$PROXY_CPU"
    printf 'load_cpu\t%s\n' "$LOAD_CPU"
    printf 'smoke\t%s\n' "$SMOKE"
} >"$META"

mkdir -p "$RESULTS_DIR"
result_file="$RESULTS_DIR/$stamp.md"
python3 "$TEMPLATES/results.py" report "$META" "$CELLS_TSV" "$IDLE_TSV" >"$result_file" ||
    die "could not write the report"
if ((FAILED)); then
    printf '\n**This run had errors or unmeasured cells (see the tables); exit status 1.**\n' >>"$result_file"
fi
cat "$result_file"
log "results written to $result_file"

if [[ $UPDATE_DOCS == auto ]]; then
    UPDATE_DOCS=0
    if [[ $SMOKE != 1 && $FAILED == 0 && $ROWS == "$ALL_ROWS" && $PROXIES == "$ALL_PROXIES" ]] &&
        ((IDLE_CONNS > 0)); then
        UPDATE_DOCS=1
    fi
fi
if [[ $UPDATE_DOCS == 1 ]]; then
    python3 "$TEMPLATES/results.py" update-doc "$DOC" "$result_file" || die "could not update $DOC"
    log "results written into $DOC"
else
    log "docs/performance.md left as it is (UPDATE_DOCS=1 writes a partial, SMOKE or failed run into it)"
fi

if ((FAILED)); then log "FAILED: some requests were not answered 2xx, or some cells were not measured"; fi
exit "$FAILED"
