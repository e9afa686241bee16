#!/usr/bin/env bash
# flowgate end-to-end load harness.
#
# Puts flowgate, HAProxy and nginx in turn in front of three nginx origins on
# loopback, each proxy with ONE worker thread pinned to one core, drives each
# with wrk (HTTP/1.1 keep-alive) from another core, and prints a Markdown table
# of throughput, latency, the proxy's CPU cost per 10,000 requests and errors.
# A "direct" row (wrk straight at one origin) is the reference ceiling.
#
# Usage (from any directory, as root for the package install):
#   benches/load.sh
#   DURATION=30 CONNECTIONS=128 benches/load.sh
#   PROXIES="haproxy nginx direct" benches/load.sh
#   SMOKE=1 benches/load.sh          # 2 s per row, for CI
#
# Environment:
#   DURATION      seconds of measured load per row (default 10; 2 with SMOKE=1)
#   CONNECTIONS   wrk connections (default 64)
#   PROXIES       rows to run, in order (default "flowgate haproxy nginx direct")
#   ROUNDS        run the whole set of rows this many times, interleaved, and
#                 report the median of each column (default 1); loopback
#                 numbers on small virtual machines vary a lot between runs
#   SMOKE=1       short run; then any error count also fails the run
#   PROXY_CPU     core for the proxy under test (default: first allowed core)
#   LOAD_CPU      core for the origins and wrk (default: second allowed core)
#   FLOWGATE_BIN  use this flowgate binary instead of building one
#   CARGO_TARGET_DIR  honoured by the build, as by cargo itself
#   KEEP_TMP=1    keep the temporary directory (configs, logs, raw wrk output)
#
# Everything listens on 127.0.0.1 only: origins on 19101..19103, the proxy
# under test on 19080. Every process the script starts is recorded by PID and
# stopped on exit. Exit status: 0 when every row was measured (and, with
# SMOKE=1, had no errors), 1 otherwise, 2 on usage errors.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
TEMPLATES="$SCRIPT_DIR/load"
RESULTS_DIR="$SCRIPT_DIR/results"

SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
    DURATION=2
else
    DURATION=${DURATION:-10}
fi
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-1}
PROXIES=${PROXIES:-flowgate haproxy nginx direct}
KEEP_TMP=${KEEP_TMP:-0}
# cargo reads a relative CARGO_TARGET_DIR against its working directory, and
# it builds from the repository root: make it absolute against the caller's.
if [[ -n ${CARGO_TARGET_DIR:-} && $CARGO_TARGET_DIR != /* ]]; then
    export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi
if [[ -n ${FLOWGATE_BIN:-} && $FLOWGATE_BIN != /* ]]; then
    FLOWGATE_BIN="$PWD/$FLOWGATE_BIN"
fi

PROXY_PORT=19080
ORIGIN_PORTS=(19101 19102 19103)
WARMUP=1                  # seconds of unmeasured load before each row
READY_DEADLINE=30         # seconds a proxy may take to answer 200
STOP_DEADLINE=10          # seconds a process may take to exit on SIGTERM

log() { printf '[load] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage_error() { log "usage error: $*"; exit 2; }

[[ $DURATION =~ ^[1-9][0-9]*$ ]] || usage_error "DURATION must be a positive integer (seconds), got '$DURATION'"
[[ $CONNECTIONS =~ ^[1-9][0-9]*$ ]] || usage_error "CONNECTIONS must be a positive integer, got '$CONNECTIONS'"
[[ $ROUNDS =~ ^[1-9][0-9]*$ && $ROUNDS -le 100 ]] || usage_error "ROUNDS must be an integer from 1 to 100, got '$ROUNDS'"
ROW_NAMES=()
for p in $PROXIES; do
    case $p in
        flowgate | haproxy | nginx | direct) ;;
        *) usage_error "unknown entry '$p' in PROXIES (known: flowgate haproxy nginx direct)" ;;
    esac
    [[ " ${ROW_NAMES[*]} " == *" $p "* ]] || ROW_NAMES+=("$p")
done
((${#ROW_NAMES[@]})) || usage_error "PROXIES is empty"

wants() { [[ " $PROXIES " == *" $1 "* ]]; }

# --------------------------------------------------------------------------
# Processes: every PID started is recorded; cleanup stops each one and the
# children it forked (nginx workers), by PID only.

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

# Starts a command in the background pinned to a core; sets STARTED_PID.
# taskset execs the command, so $! is the command's own PID.
start_pinned() {
    local cpu=$1 logfile=$2
    shift 2
    taskset -c "$cpu" "$@" </dev/null >"$logfile" 2>&1 &
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

# Waits (bounded) until GET http://127.0.0.1:PORT/ answers 200 while PID runs.
wait_ready() {
    local port=$1 pid=$2 deadline code
    deadline=$((SECONDS + READY_DEADLINE))
    while ((SECONDS < deadline)); do
        if ! [[ -d /proc/$pid ]]; then
            return 1
        fi
        code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/" 2>/dev/null) || true
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

install_missing() {
    local need=() cmd pkg
    for cmd in wrk:wrk nginx:nginx-light curl:curl taskset:util-linux; do
        pkg=${cmd#*:}
        cmd=${cmd%%:*}
        command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
    done
    if wants haproxy && ! command -v haproxy >/dev/null 2>&1; then
        need+=(haproxy)
    fi
    ((${#need[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}; run as root to install them, or install them first"
    command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]} from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
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

flowgate_commit() {
    local c
    c=$(git -C "$REPO_ROOT" rev-parse --short=12 HEAD 2>/dev/null) || {
        echo unknown
        return
    }
    if ! git -C "$REPO_ROOT" diff --quiet HEAD -- 2>/dev/null; then
        c+="-dirty"
    fi
    echo "$c"
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
        if (y[2] > x[2]) printf "%.0f%%", 100 * (y[1] - x[1]) / (y[2] - x[2]); else print "n/a" }'
}

# Latency as wrk prints it (850.00us, 1.23ms, 1.02s, 2.00m) to milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.2f", n
    }'
}

# Per row name: space-separated values, one per round.
declare -A R_RPS=() R_P50=() R_P99=() R_CPU=() R_ERR=() R_FAIL=()
CORE_NOTES=()
FAILED=0
ROUND=1

# Runs wrk against URL; with PID non-empty, measures that process tree's CPU.
# Records the round's numbers for NAME.
measure() {
    local name=$1 url=$2 pid=$3 out cpu0 cpu1 pcore0 pcore1 lcore0 lcore1 rc=0
    out="$TMP/wrk-$name-round$ROUND.txt"
    log "$name: warm-up ${WARMUP}s"
    run_waited timeout -k 5 $((WARMUP + 30)) \
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" "$url" >"$TMP/wrk-$name-round$ROUND-warmup.txt" 2>&1 || true
    log "$name: wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency $url"
    if [[ -n $pid ]]; then cpu0=$(cpu_seconds "$pid"); fi
    pcore0=$(core_jiffies "$PROXY_CPU")
    lcore0=$(core_jiffies "$LOAD_CPU")
    run_waited timeout -k 5 $((DURATION + 30)) \
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url" >"$out" 2>&1 || rc=$?
    if [[ -n $pid ]]; then cpu1=$(cpu_seconds "$pid"); fi
    pcore1=$(core_jiffies "$PROXY_CPU")
    lcore1=$(core_jiffies "$LOAD_CPU")
    if ((rc != 0)) || ! grep -q '^Requests/sec:' "$out"; then
        log "$name: wrk failed (exit $rc):"
        sed 's/^/    /' "$out" >&2
        fail_row "$name" "wrk failed"
        return
    fi

    local rps p50 p99 total errs cpu_per_10k
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    total=$(awk '/requests in/ {print $1}' "$out")
    # "Non-2xx or 3xx responses: N" and "Socket errors: connect A, read B, write C, timeout D"
    errs=$(awk '
        /Non-2xx or 3xx responses:/ { n += $NF }
        /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 }
        END { print n + 0 }' "$out")
    if [[ -n $pid ]]; then
        cpu_per_10k=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$total" \
            'BEGIN { if (n > 0) printf "%.4f", (b - a) * 10000 / n; else print "n/a" }')
        log "$name: $total requests, proxy CPU $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN {printf "%.2f", b - a}') s"
    else
        cpu_per_10k="n/a"
        log "$name: $total requests"
    fi
    if ((errs > 0)); then
        log "$name: $errs errors:"
        grep -E 'Non-2xx|Socket errors' "$out" | sed 's/^/    /' >&2
        if [[ $SMOKE == 1 ]]; then FAILED=1; fi
    fi
    R_RPS[$name]+="$rps "
    R_P50[$name]+="$p50 "
    R_P99[$name]+="$p99 "
    R_CPU[$name]+="$cpu_per_10k "
    R_ERR[$name]+="$errs "
    local note="- $name:"
    if ((ROUNDS > 1)); then note="- round $ROUND, $name:"; fi
    note+=" $rps req/s;"
    if [[ -n $pid ]]; then note+=" proxy core $PROXY_CPU $(busy_percent "$pcore0" "$pcore1") busy,"; fi
    CORE_NOTES+=("$note load core $LOAD_CPU $(busy_percent "$lcore0" "$lcore1") busy")
}

fail_row() {
    local what=$2
    if ((ROUNDS > 1)); then what+=" (round $ROUND)"; fi
    [[ -n ${R_FAIL[$1]:-} ]] || R_FAIL[$1]=$what
    FAILED=1
}

# Median of the numbers in $1 (space-separated), printed with format $2;
# "n/a" when there are none.
median() {
    # shellcheck disable=SC2086  # the list is split on purpose
    printf '%s\n' $1 | grep -E '^[0-9.]+$' | sort -g | awk -v fmt="$2" '
        { a[NR] = $1 }
        END {
            if (NR == 0) { print "n/a"; exit }
            m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
            printf fmt, m
        }'
}

# The Markdown table row of NAME over all rounds.
table_row() {
    local name=$1 errs=0 e
    if [[ -n ${R_FAIL[$name]:-} ]]; then
        echo "| $name | - | - | - | - | ${R_FAIL[$name]} |"
        return
    fi
    for e in ${R_ERR[$name]:-}; do errs=$((errs + e)); done
    echo "| $name | $(median "${R_RPS[$name]:-}" %.0f) | $(median "${R_P50[$name]:-}" %.2f) ms" \
        "| $(median "${R_P99[$name]:-}" %.2f) ms | $(median "${R_CPU[$name]:-}" %.4f) | $errs |"
}

# --------------------------------------------------------------------------
# Proxies. Each start_* leaves the proxy's PID in PROXY_PID, or returns 1.

render() {
    local template=$1 dest=$2
    sed "s|@DIR@|$TMP|g" "$TEMPLATES/$template" >"$dest"
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

start_flowgate() {
    local cfg="$TMP/flowgate.toml"
    cp "$TEMPLATES/flowgate.toml" "$cfg"
    "$FLOWGATE_BIN" check --config "$cfg" >"$TMP/flowgate-check.log" 2>&1 || {
        cat "$TMP/flowgate-check.log" >&2
        return 1
    }
    start_pinned "$PROXY_CPU" "$TMP/flowgate.log" "$FLOWGATE_BIN" run --config "$cfg"
    PROXY_PID=$STARTED_PID
}

start_haproxy() {
    local cfg="$TMP/haproxy.cfg"
    cp "$TEMPLATES/haproxy.cfg" "$cfg"
    haproxy -c -q -f "$cfg" >"$TMP/haproxy-check.log" 2>&1 || {
        cat "$TMP/haproxy-check.log" >&2
        return 1
    }
    # -db: stay in the foreground, one process, no master-worker.
    start_pinned "$PROXY_CPU" "$TMP/haproxy.log" haproxy -db -f "$cfg"
    PROXY_PID=$STARTED_PID
}

start_nginx_proxy() {
    local cfg="$TMP/nginx-proxy.conf"
    render nginx-proxy.conf "$cfg"
    mkdir -p "$TMP/nginx-proxy-tmp"
    start_pinned "$PROXY_CPU" "$TMP/nginx-proxy.log" nginx -e "$TMP/nginx-proxy.error.log" -p "$TMP" -c "$cfg"
    PROXY_PID=$STARTED_PID
}

run_proxy_row() {
    local name=$1 logfile
    PROXY_PID=""
    case $name in
        flowgate)
            if [[ $FLOWGATE_BUILT != ok ]]; then
                fail_row flowgate "build failed"
                return
            fi
            start_flowgate || {
                fail_row flowgate "config rejected"
                return
            }
            logfile="$TMP/flowgate.log"
            ;;
        haproxy)
            start_haproxy || {
                fail_row haproxy "config rejected"
                return
            }
            logfile="$TMP/haproxy.log"
            ;;
        nginx)
            start_nginx_proxy
            logfile="$TMP/nginx-proxy.error.log"
            ;;
    esac
    log "$name: started as PID $PROXY_PID on core $PROXY_CPU, waiting for 200 on :$PROXY_PORT"
    if wait_ready "$PROXY_PORT" "$PROXY_PID"; then
        measure "$name" "http://127.0.0.1:$PROXY_PORT/" "$PROXY_PID"
    else
        if [[ -d /proc/$PROXY_PID ]]; then
            log "$name: did not answer 200 within ${READY_DEADLINE}s; last log lines:"
        else
            log "$name: exited before answering; last log lines:"
        fi
        tail -n 20 "$logfile" 2>/dev/null | sed 's/^/    /' >&2 || true
        fail_row "$name" "did not start"
    fi
    stop_pid "$PROXY_PID"
    forget_pid "$PROXY_PID"
    wait_port_free "$PROXY_PORT" || die "port $PROXY_PORT still busy after stopping $name"
}

# --------------------------------------------------------------------------
# Main

install_missing
for cmd in wrk nginx curl taskset timeout awk getconf; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done
CLK_TCK=$(getconf CLK_TCK)
pick_cpus

TMP=$(mktemp -d "${TMPDIR:-/tmp}/flowgate-load.XXXXXX")

for port in "$PROXY_PORT" "${ORIGIN_PORTS[@]}"; do
    port_open "$port" && die "127.0.0.1:$port is already in use; stop whatever listens there first"
done

# Build first, so that compiling never overlaps a measurement.
FLOWGATE_BUILT=no
if wants flowgate; then
    if build_flowgate; then FLOWGATE_BUILT=ok; else FLOWGATE_BUILT=failed; fi
fi

# Origins: one nginx, one worker, three server blocks, pinned with wrk.
render origins.nginx.conf "$TMP/origins.conf"
mkdir -p "$TMP/origins-tmp"
start_pinned "$LOAD_CPU" "$TMP/origins.log" nginx -e "$TMP/origins.error.log" -p "$TMP" -c "$TMP/origins.conf"
ORIGINS_PID=$STARTED_PID
for port in "${ORIGIN_PORTS[@]}"; do
    wait_ready "$port" "$ORIGINS_PID" || {
        cat "$TMP/origins.error.log" "$TMP/origins.log" >&2 2>/dev/null || true
        die "origin on 127.0.0.1:$port did not come up"
    }
done
body_len=$(curl -s "http://127.0.0.1:${ORIGIN_PORTS[0]}/" | wc -c)
log "origins up (PID $ORIGINS_PID, core $LOAD_CPU), body $body_len bytes"

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    if ((ROUNDS > 1)); then log "round $ROUND of $ROUNDS"; fi
    for name in "${ROW_NAMES[@]}"; do
        if [[ $name == direct ]]; then
            measure direct "http://127.0.0.1:${ORIGIN_PORTS[0]}/" ""
        else
            run_proxy_row "$name"
        fi
    done
done

# --------------------------------------------------------------------------
# Report

cpu_model=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
# First line of a command's output, whatever its exit status.
first_line() {
    local out
    out=$("$@" 2>&1) || true
    printf '%s' "${out%%$'\n'*}"
}
haproxy_version="not installed"
if command -v haproxy >/dev/null 2>&1; then haproxy_version=$(first_line haproxy -v); fi
nginx_version=$(first_line nginx -v)
wrk_version=$(first_line wrk -v)
stamp=$(date -u +%Y%m%dT%H%M%SZ)

report() {
    echo "# flowgate load run $stamp"
    echo
    echo "- flowgate commit: $(flowgate_commit)"
    echo "- haproxy: $haproxy_version"
    echo "- nginx: $nginx_version"
    echo "- wrk: $wrk_version"
    echo "- machine: $(nproc) cores ($cpu_model), kernel $(uname -r)"
    echo "- load: wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency, HTTP/1.1 keep-alive, 100-byte responses, ${WARMUP}s warm-up"
    echo "- pinning: proxy on core $PROXY_CPU; origins (nginx, 1 worker) and wrk on core $LOAD_CPU"
    echo "- errors: non-2xx/3xx responses plus socket errors; CPU: proxy utime+stime over the measured run"
    if ((ROUNDS > 1)); then
        echo "- rounds: $ROUNDS, rows interleaved; the table shows the median of each column, errors summed"
    fi
    echo
    echo "| proxy | req/s | p50 | p99 | CPU s / 10k req | errors |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    local name
    for name in "${ROW_NAMES[@]}"; do table_row "$name"; done
    if ((${#CORE_NOTES[@]})); then
        echo
        echo "Each measured run (a load core near 100% busy means wrk and the origins, not the proxy alone, set the pace):"
        echo
        printf '%s\n' "${CORE_NOTES[@]}"
    fi
}

mkdir -p "$RESULTS_DIR"
result_file="$RESULTS_DIR/load-$stamp.md"
report | tee "$result_file"
log "results written to $result_file"

exit "$FAILED"
