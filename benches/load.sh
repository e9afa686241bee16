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
#   ka-100-threads  ka-100 with flowgate threads = 1 and = 2, proxy and wrk -t2 unpinned
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

PROXY_PORT=19080
TLS_PORT=19443
ADMIN_PORT=19090
ORIGIN_PORTS=(19101 19102 19103)
ORIGIN_TLS_PORT=19111
WARMUP=1                  # seconds of unmeasured load before each cell
READY_DEADLINE=30         # seconds a proxy may take to answer 200
STOP_DEADLINE=10          # seconds a process may take to exit on SIGTERM
IDLE_DEADLINE=300         # seconds one idle-memory measurement may take

log() { printf '[load] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
usage_error() {
    log "usage error: $*"
    exit 2
}

positive() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
positive "$DURATION" || usage_error "DURATION must be a positive integer (seconds), got '$DURATION'"
positive "$CONNECTIONS" || usage_error "CONNECTIONS must be a positive integer, got '$CONNECTIONS'"
positive "$H2_STREAMS" || usage_error "H2_STREAMS must be a positive integer, got '$H2_STREAMS'"
{ positive "$REPS" && ((REPS <= 100)); } || usage_error "REPS must be an integer from 1 to 100, got '$REPS'"
{ [[ $IDLE_CONNS =~ ^[0-9]+$ ]] && ((IDLE_CONNS <= 50000)); } ||
    usage_error "IDLE_CONNS must be an integer from 0 to 50000, got '$IDLE_CONNS'"
[[ $UPDATE_DOCS =~ ^(auto|0|1)$ ]] || usage_error "UPDATE_DOCS must be auto, 0 or 1, got '$UPDATE_DOCS'"

# Checks a list against the known words and drops duplicates.
checked_list() {
    local what=$1 known=$2 given=$3 out=() w
    for w in $given; do
        [[ " $known " == *" $w "* ]] || usage_error "unknown entry '$w' in $what (known: $known)"
        [[ " ${out[*]} " == *" $w "* ]] || out+=("$w")
    done
    ((${#out[@]})) || usage_error "$what is empty"
    echo "${out[*]}"
}
ROWS=$(checked_list ROWS "$ALL_ROWS" "$ROWS")
PROXIES=$(checked_list PROXIES "$ALL_PROXIES" "$PROXIES")

wants() { [[ " $PROXIES " == *" $1 "* ]]; }

# --------------------------------------------------------------------------
# Processes: every PID started is recorded; cleanup stops each one and the
# children it forked (nginx workers, timeout's child), by PID only.

STARTED_PIDS=()
TMP=""

# Prints PID and all its descendants, one per line (bounded walk).
proc_tree() {
    local root=$1 f rest pid ppid
    local -A children=()
    for f in /proc/[0-9]*/stat; do
        read -r rest 2>/dev/null <"$f" || continue
        pid=${rest%% *}
        rest=${rest##*) }     # drop "pid (comm) ": comm may hold spaces
        ppid=${rest#* }       # then "state ppid ..."
        ppid=${ppid%% *}
        children[$ppid]+="$pid "
    done
    local queue=("$root") out=() i=0
    while ((i < ${#queue[@]} && i < 4096)); do
        pid=${queue[i]}
        i=$((i + 1))
        [[ -d /proc/$pid ]] || continue
        out+=("$pid")
        # shellcheck disable=SC2206  # word splitting of the PID list is intended
        queue+=(${children[$pid]:-})
    done
    ((${#out[@]} == 0)) || printf '%s\n' "${out[@]}"
}

# Sends SIGTERM to PID, waits up to STOP_DEADLINE s, then SIGKILLs whatever is
# left of the process tree as it was before the signal.
stop_pid() {
    local pid=$1 tree deadline p
    [[ -d /proc/$pid ]] || return 0
    mapfile -t tree < <(proc_tree "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_DEADLINE))
    while ((SECONDS < deadline)); do
        local alive=0
        for p in "${tree[@]}"; do
            if [[ -d /proc/$p ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null; then
                alive=1
                break
            fi
        done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${tree[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${STARTED_PIDS[i]}"
    done
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 ]]; then
            log "kept temporary files in $TMP"
        else
            rm -rf -- "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a command in the background, pinned to a core unless CPU is "-";
# sets STARTED_PID. taskset execs the command, so $! is the command's PID.
start_bg() {
    local cpu=$1 logfile=$2
    shift 2
    if [[ $cpu == - ]]; then
        "$@" </dev/null >"$logfile" 2>&1 &
    else
        taskset -c "$cpu" "$@" </dev/null >"$logfile" 2>&1 &
    fi
    STARTED_PID=$!
    STARTED_PIDS+=("$STARTED_PID")
}

# Runs a command in the background, records its PID and waits for it, so that
# SIGINT/SIGTERM are handled at once (bash runs traps only between foreground
# commands, but does interrupt "wait"). Its exit status is returned.
run_waited() {
    local pid rc=0
    "$@" &
    pid=$!
    STARTED_PIDS+=("$pid")
    wait "$pid" || rc=$?
    forget_pid "$pid"
    return "$rc"
}

forget_pid() {
    local pid=$1 i
    for i in "${!STARTED_PIDS[@]}"; do
        if [[ ${STARTED_PIDS[i]} == "$pid" ]]; then unset 'STARTED_PIDS[i]'; fi
    done
    STARTED_PIDS=("${STARTED_PIDS[@]}")
}

# Is something accepting TCP connections on 127.0.0.1:PORT?
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Waits (bounded) until URL answers 200 while PID runs; extra curl options
# after the URL (for TLS: -k and the protocol version).
wait_ready() {
    local url=$1 pid=$2 deadline code
    shift 2
    deadline=$((SECONDS + READY_DEADLINE))
    while ((SECONDS < deadline)); do
        [[ -d /proc/$pid ]] || return 1
        code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$@" "$url" 2>/dev/null) || true
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

# Waits (bounded) until nothing listens on PORT any more.
wait_port_free() {
    local port=$1 deadline=$((SECONDS + STOP_DEADLINE))
    while ((SECONDS < deadline)); do
        port_open "$port" || return 0
        sleep 0.1
    done
    return 1
}

# --------------------------------------------------------------------------
# Tools

# Installs from Debian's packages whatever is missing (nothing when all is
# there, so running it again is cheap and changes nothing).
install_missing() {
    local need=() cmd pkg
    for cmd in wrk:wrk nginx:nginx-light curl:curl taskset:util-linux openssl:openssl \
        python3:python3 h2load:nghttp2-client haproxy:haproxy; do
        pkg=${cmd#*:}
        cmd=${cmd%%:*}
        command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
    done
    ((${#need[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}; run as root to install them, or install them first"
    command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]} from Debian's packages"
    run_waited env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq >&2
    run_waited env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

pick_cpus() {
    local allowed list=() part a b
    allowed=$(awk '/^Cpus_allowed_list:/ {print $2}' /proc/self/status)
    IFS=, read -ra parts <<<"$allowed"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then
            a=${part%-*}
            b=${part#*-}
            while ((a <= b && ${#list[@]} < 2)); do
                list+=("$a")
                a=$((a + 1))
            done
        else
            list+=("$part")
        fi
        ((${#list[@]} >= 2)) && break
    done
    PROXY_CPU=${PROXY_CPU:-${list[0]:-0}}
    LOAD_CPU=${LOAD_CPU:-${list[1]:-${list[0]:-0}}}
    if [[ $PROXY_CPU == "$LOAD_CPU" ]]; then
        log "warning: proxy and load generator share core $PROXY_CPU (fewer than 2 cores allowed)"
    fi
}

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

# One ECDSA P-256 self-signed certificate for 127.0.0.1 and localhost, the
# same for every proxy (HAProxy wants certificate and key in one file).
make_certificate() {
    mkdir -p "$TMP/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" -days 7 -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$TMP/tls/openssl.log" 2>&1 ||
        die "openssl could not make the test certificate: $(cat "$TMP/tls/openssl.log")"
    cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/haproxy.pem"
}

# --------------------------------------------------------------------------
# Measurements

# CPU seconds (utime + stime) of PID and its descendants, as a decimal.
cpu_seconds() {
    local root=$1 pid rest ticks=0 f
    local -a fields
    while read -r pid; do
        f=/proc/$pid/stat
        read -r rest 2>/dev/null <"$f" || continue
        rest=${rest##*) }
        read -ra fields <<<"$rest"
        # fields[0] is stat field 3; utime is field 14, stime field 15.
        ticks=$((ticks + fields[11] + fields[12]))
    done < <(proc_tree "$root")
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
    printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t\t\n' "$row" "$variant" "$REP" "$what" >>"$CELLS_TSV"
    FAILED=1
}

# The load generator of ROW against PORT (plain or TLS, as the row needs),
# for SECONDS, into OUT (and, for h2load, a per-request log LOG). Unpinned
# rows drive with two wrk threads from any core.
load_command() {
    local row=$1 port=$2 seconds=$3 log=$4 tls_port=$5
    local -a pin=(taskset -c "$LOAD_CPU")
    case $row in
        ka-100 | ka-100-log) LOAD=("${pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency "http://127.0.0.1:$port/") ;;
        ka-16k) LOAD=("${pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency "http://127.0.0.1:$port/16k") ;;
        close) LOAD=("${pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency -H "Connection: close" "http://127.0.0.1:$port/") ;;
        tls-ka) LOAD=("${pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency "https://127.0.0.1:$tls_port/") ;;
        tls-close) LOAD=("${pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency -H "Connection: close" "https://127.0.0.1:$tls_port/") ;;
        h2)
            LOAD=("${pin[@]}" h2load -t1 -c"$CONNECTIONS" -m"$H2_STREAMS" -D "$seconds")
            [[ -z $log ]] || LOAD+=(--log-file "$log")
            LOAD+=("https://127.0.0.1:$tls_port/")
            ;;
        ka-100-threads) LOAD=(wrk -t2 -c"$CONNECTIONS" -d"${seconds}s" --latency "http://127.0.0.1:$port/") ;;
    esac
}

# Warms up, then measures ROW through VARIANT (whose process is PID, empty
# for direct) and appends one line to the cells table.
measure() {
    local row=$1 variant=$2 pid=$3 port=$4 tls_port=$5
    local base="$TMP/out/$row-$variant-rep$REP" rc=0 parsed
    local cpu0="" cpu1="" ocpu0 ocpu1 pcore0 pcore1 lcore0 lcore1
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
    ocpu0=$(cpu_seconds "$ORIGINS_PID")
    pcore0=$(core_jiffies "$PROXY_CPU")
    lcore0=$(core_jiffies "$LOAD_CPU")
    run_waited timeout -k 5 $((DURATION + 60)) "${LOAD[@]}" >"$base.txt" 2>&1 || rc=$?
    if [[ -n $pid ]]; then cpu1=$(cpu_seconds "$pid"); fi
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
        if [[ $variant != flowgate-?t ]]; then pbusy=$(busy_percent "$pcore0" "$pcore1"); fi
    fi
    printf '%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$variant" "$REP" \
        "$rps" "$p50" "$p99" "$requests" "$errors" "$proxy_cpu" \
        "$(awk -v a="$ocpu0" -v b="$ocpu1" 'BEGIN { printf "%.3f", b - a }')" \
        "$pbusy" "$(busy_percent "$lcore0" "$lcore1")" >>"$CELLS_TSV"
    log "$row / $variant: $rps req/s, p99 $p99 ms, $requests requests, proxy CPU ${proxy_cpu:-n/a} s, errors $errors"
    if ((errors > 0)); then
        log "$row / $variant: $errors requests not answered 2xx:"
        grep -E 'Non-2xx|Socket errors|^requests:|^status codes:' "$base.txt" | sed 's/^/    /' >&2
        FAILED=1
    fi
}

# --------------------------------------------------------------------------
# Proxies. start_proxy leaves the proxy's PID in PROXY_PID, or returns 1.

# Copies a template, filling @DIR@ and the NAME=VALUE pairs given as @NAME@.
render() {
    local template=$1 dest=$2 pair
    shift 2
    local -a expr=(-e "s|@DIR@|$TMP|g")
    for pair in "$@"; do expr+=(-e "s|@${pair%%=*}@|${pair#*=}|g"); done
    sed "${expr[@]}" "$TEMPLATES/$template" >"$dest"
}

build_flowgate() {
    if [[ -n ${FLOWGATE_BIN:-} ]]; then
        [[ -x $FLOWGATE_BIN ]] || die "FLOWGATE_BIN=$FLOWGATE_BIN is not an executable"
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || {
        log "flowgate: cargo not found"
        return 1
    }
    log "flowgate: cargo build --release --locked (log: $TMP/cargo-build.log)"
    if ! run_waited env -C "$REPO_ROOT" cargo build --release --locked >"$TMP/cargo-build.log" 2>&1; then
        tail -n 30 "$TMP/cargo-build.log" >&2
        return 1
    fi
    FLOWGATE_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/flowgate"
    [[ -x $FLOWGATE_BIN ]]
}

# start_proxy VARIANT: flowgate, flowgate-log, flowgate-1t, flowgate-2t,
# haproxy or nginx. The flowgate-Nt variants run unpinned with N threads.
start_proxy() {
    local variant=$1 cfg threads=1 access_log=off cpu=$PROXY_CPU
    PROXY_PID=""
    case $variant in
        flowgate*)
            [[ $FLOWGATE_BUILT == ok ]] || return 1
            case $variant in
                flowgate-log) access_log="$TMP/access.log" ;;
                flowgate-1t) cpu=- ;;
                flowgate-2t) cpu=- threads=2 ;;
            esac
            cfg="$TMP/$variant.toml"
            render flowgate.toml "$cfg" "THREADS=$threads" "ACCESS_LOG=$access_log"
            "$FLOWGATE_BIN" check --config "$cfg" >"$TMP/$variant-check.log" 2>&1 || {
                sed 's/^/    /' "$TMP/$variant-check.log" >&2
                return 1
            }
            PROXY_LOG="$TMP/$variant.log"
            start_bg "$cpu" "$PROXY_LOG" "$FLOWGATE_BIN" run --config "$cfg"
            ;;
        haproxy)
            cfg="$TMP/haproxy.cfg"
            render haproxy.cfg "$cfg" "MAXCONN=$HAPROXY_MAXCONN"
            haproxy -c -q -f "$cfg" >"$TMP/haproxy-check.log" 2>&1 || {
                sed 's/^/    /' "$TMP/haproxy-check.log" >&2
                return 1
            }
            PROXY_LOG="$TMP/haproxy.log"
            # -db: stay in the foreground, one process, no master-worker.
            start_bg "$cpu" "$PROXY_LOG" haproxy -db -f "$cfg"
            ;;
        nginx)
            cfg="$TMP/nginx-proxy.conf"
            render nginx-proxy.conf "$cfg"
            mkdir -p "$TMP/nginx-proxy-tmp"
            PROXY_LOG="$TMP/nginx-proxy.error.log"
            start_bg "$cpu" "$TMP/nginx-proxy.log" nginx -e "$PROXY_LOG" -p "$TMP" -c "$cfg"
            ;;
    esac
    PROXY_PID=$STARTED_PID
    if wait_ready "http://127.0.0.1:$PROXY_PORT/" "$PROXY_PID" &&
        wait_ready "https://127.0.0.1:$TLS_PORT/" "$PROXY_PID" -k --tlsv1.3; then
        return 0
    fi
    if [[ -d /proc/$PROXY_PID ]]; then
        log "$variant: did not answer 200 on :$PROXY_PORT and :$TLS_PORT within ${READY_DEADLINE}s; last log lines:"
    else
        log "$variant: exited before answering; last log lines:"
    fi
    tail -n 20 "$PROXY_LOG" 2>/dev/null | sed 's/^/    /' >&2 || true
    stop_proxy
    return 1
}

stop_proxy() {
    [[ -n $PROXY_PID ]] || return 0
    stop_pid "$PROXY_PID"
    forget_pid "$PROXY_PID"
    PROXY_PID=""
    if [[ -f $TMP/access.log ]]; then
        log "access log: $(wc -l <"$TMP/access.log") lines, $(stat -c %s "$TMP/access.log") bytes"
        rm -f "$TMP/access.log"
    fi
    local port
    for port in "$PROXY_PORT" "$TLS_PORT" "$ADMIN_PORT"; do
        wait_port_free "$port" || die "port $port still busy after stopping a proxy"
    done
}

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
        ka-100-threads) wants flowgate && list=(flowgate-1t flowgate-2t) ;;
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

install_missing
for cmd in wrk h2load nginx curl taskset timeout awk getconf openssl python3; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done
if wants haproxy; then command -v haproxy >/dev/null 2>&1 || die "haproxy not found"; fi
CLK_TCK=$(getconf CLK_TCK)
pick_cpus
raise_nofile

TMP=$(mktemp -d "${TMPDIR:-/tmp}/flowgate-load.XXXXXX")
mkdir -p "$TMP/out" "$TMP/www"
# nginx's workers run as an unprivileged user: let them reach the body file.
chmod 755 "$TMP" "$TMP/www"
CELLS_TSV="$TMP/cells.tsv"
IDLE_TSV="$TMP/idle.tsv"
printf 'row\tvariant\trep\tstatus\trps\tp50_ms\tp99_ms\trequests\terrors\tproxy_cpu_s\torigin_cpu_s\tproxy_busy\tload_busy\n' >"$CELLS_TSV"
printf 'variant\trep\tkind\tcount\tconnected\theld\trss_start_kb\trss_fresh_kb\trss_request_kb\tstatus\n' >"$IDLE_TSV"

for port in "$PROXY_PORT" "$TLS_PORT" "$ADMIN_PORT" "${ORIGIN_PORTS[@]}" "$ORIGIN_TLS_PORT"; do
    port_open "$port" && die "127.0.0.1:$port is already in use; stop whatever listens there first"
done

# Build first, so that compiling never overlaps a measurement.
FLOWGATE_BUILT=no
if wants flowgate; then
    if build_flowgate; then FLOWGATE_BUILT=ok; else FLOWGATE_BUILT=failed; fi
fi

make_certificate
# The 16 KiB body: 256 lines of 64 bytes.
for ((i = 0; i < 256; i++)); do printf '%063d\n' "$i"; done >"$TMP/www/16k.txt"

# Origins: one nginx, one worker, pinned with the load generator.
render origins.nginx.conf "$TMP/origins.conf"
mkdir -p "$TMP/origins-tmp"
start_bg "$LOAD_CPU" "$TMP/origins.log" nginx -e "$TMP/origins.error.log" -p "$TMP" -c "$TMP/origins.conf"
ORIGINS_PID=$STARTED_PID
for port in "${ORIGIN_PORTS[@]}"; do
    wait_ready "http://127.0.0.1:$port/16k" "$ORIGINS_PID" || {
        cat "$TMP/origins.error.log" "$TMP/origins.log" >&2 2>/dev/null || true
        die "origin on 127.0.0.1:$port did not come up"
    }
done
wait_ready "https://127.0.0.1:$ORIGIN_TLS_PORT/" "$ORIGINS_PID" -k --tlsv1.3 || die "TLS origin did not come up"
log "origins up (PID $ORIGINS_PID, core $LOAD_CPU): $(curl -s "http://127.0.0.1:${ORIGIN_PORTS[0]}/" | wc -c) B" \
    "and $(curl -s "http://127.0.0.1:${ORIGIN_PORTS[0]}/16k" | wc -c) B bodies"

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

# First line of a command's output, whatever its exit status.
first_line() {
    local out
    out=$("$@" 2>&1) || true
    out=${out%%$'\n'*}
    printf '%s' "${out:-unknown}"
}
cpu_model=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
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
