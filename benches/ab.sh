#!/usr/bin/env bash
# flowgate A/B: the CPU per request of two proxies, side by side.
#
# A and B are two flowgate binaries, or one flowgate binary and `haproxy` or
# `nginx` (those words: the installed proxy with benches/load.sh's
# configuration for it), for a drift-free flowgate / HAProxy ratio.
#
# Runs the two proxies, A and B, AT THE SAME TIME in front of the three
# nginx origins of benches/load.sh (the same configurations from
# benches/load/ and the same helpers, from benches/load/common.sh): each with
# ONE worker thread, both pinned to the same core, each driven by its own
# load generator on the other core (the one the origins share). Whatever the
# machine's neighbours do to that core in a given second, they do to A and B
# alike, so the ratio of their CPU seconds per request holds far better on a
# noisy shared VM than two runs one after the other. The paths, named and
# driven as in benches/load.sh:
#
#   ka-100      HTTP/1.1 keep-alive, 100 B body          wrk -t1 -c64
#   ka-16k      HTTP/1.1 keep-alive, 16 KiB body         wrk -t1 -c64
#   close       Connection: close (connection/request)   wrk -t1 -c64 -H 'Connection: close'
#   tls-ka      TLS 1.3 keep-alive                       wrk -t1 -c64 https
#   tls-close   TLS 1.3, new handshake per request       wrk -t1 -c64 https + Connection: close
#   h2          h2 over TLS 1.3                          h2load -t1 -c64 -m4
#
# Each repetition runs every path; each cell starts both binaries afresh,
# drives both for 1 s of unmeasured warm-up, then for DURATION seconds, and
# takes each one's utime + stime (all its threads, from /proc/PID/stat) over
# that window and the requests its load generator completed. A and B swap
# places every repetition: A has the first position (started first, its load
# generator launched first, the template's ports) in the 1st, 3rd, ...
# repetition and B in the 2nd, 4th, ..., so any bias of position cancels out
# over an even number of repetitions. The report gives, per path and
# repetition, A's and B's CPU seconds per 10,000 requests and B/A, and each
# one's p99 latency as its load generator saw it (h2load's from its
# --log-file) and B/A, then the medians of the ratios with min-max. Every request must be answered 2xx: a
# non-2xx answer, a socket error or a failed load generator makes the run
# exit 1 (such a repetition is left out of the median).
#
# Usage (from any directory; as root, so that it can install what it needs
# from Debian's packages):
#   benches/ab.sh BIN_A BIN_B                    # ka-100, ka-16k, h2; 6 repetitions of 6 s, about 5 minutes
#   SMOKE=1 benches/ab.sh BIN_A BIN_B            # ka-100, 1 repetition of 2 s
#   ROWS="ka-100 tls-ka" REPS=8 benches/ab.sh target/release/flowgate /tmp/flowgate-before
#   ROWS="ka-100 close h2" REPS=4 benches/ab.sh haproxy target/release/flowgate   # B/A = flowgate / HAProxy
#
# Environment:
#   ROWS          paths to run, from the list above (default "ka-100 ka-16k
#                 h2"; ka-100 with SMOKE=1)
#   REPS          repetitions (default 6; 1 with SMOKE=1); an even number
#                 gives A and B each position equally often
#   DURATION      measured seconds per cell (default 6; 2 with SMOKE=1)
#   CONNECTIONS   client connections of each wrk and h2load (default 64)
#   H2_STREAMS    h2load -m, concurrent streams per connection (default 4)
#   SMOKE=1       the quick check
#   PROXY_CPU     core of both flowgates (default: first allowed core)
#   LOAD_CPU      core of the origins and both load generators (default:
#                 second)
#   KEEP_TMP=1    keep the temporary directory (configs, logs, raw outputs)
#
# Everything listens on 127.0.0.1 only: origins on 19101..19103 (and 19111,
# unused here); the flowgate in the first position on 19080 (plain), 19443
# (TLS) and 19090 (admin), the one in the second position on 19081, 19444
# and 19091 (benches/load/flowgate.toml, rendered twice, the second copy with
# those ports; haproxy.cfg and nginx-proxy.conf likewise). Every process the
# script starts is recorded by PID and stopped on exit; every wait is bounded.
# Output: the Markdown report on stdout (progress on stderr).
# Exit status: 0 when every cell was measured without a single error, 1
# otherwise, 2 on usage errors.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
TEMPLATES="$SCRIPT_DIR/load"

ALL_ROWS="ka-100 ka-16k close tls-ka tls-close h2"

# The command as run, with the settings that were given, for the report.
COMMAND=""
for var in SMOKE REPS DURATION CONNECTIONS H2_STREAMS ROWS PROXY_CPU LOAD_CPU; do
    if [[ -n ${!var+x} ]]; then COMMAND+="$var=$(printf '%q' "${!var}") "; fi
done
COMMAND+="benches/ab.sh"
for arg in "$@"; do COMMAND+=" $(printf '%q' "$arg")"; done

SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
    DURATION=${DURATION:-2}
    REPS=${REPS:-1}
    ROWS=${ROWS:-ka-100}
else
    DURATION=${DURATION:-6}
    REPS=${REPS:-6}
    ROWS=${ROWS:-ka-100 ka-16k h2}
fi
CONNECTIONS=${CONNECTIONS:-64}
H2_STREAMS=${H2_STREAMS:-4}
KEEP_TMP=${KEEP_TMP:-0}

# Ports, deadlines, logging and the helpers shared with benches/load.sh.
LOG_TAG=ab
# shellcheck source-path=SCRIPTDIR source=load/common.sh
source "$TEMPLATES/common.sh"

(($# == 2)) || usage_error "benches/ab.sh A B (flowgate binaries, or haproxy or nginx), got $# arguments"
BINS=("$1" "$2")
NAMES=(A B)
KINDS=(flowgate flowgate) # KINDS[i]: flowgate, haproxy or nginx
for i in 0 1; do
    case ${BINS[i]} in
        # Found on PATH once installed (see Main).
        haproxy | nginx) KINDS[i]=${BINS[i]} ;;
        *)
            [[ ${BINS[i]} == /* ]] || BINS[i]="$PWD/${BINS[i]}"
            [[ -f ${BINS[i]} && -x ${BINS[i]} ]] || usage_error "${NAMES[i]}: ${BINS[i]} is not an executable file"
            ;;
    esac
done
[[ ${KINDS[0]} == flowgate || ${KINDS[1]} == flowgate ]] ||
    usage_error "at least one of A and B must be a flowgate binary"
[[ ${KINDS[0]} != nginx || ${KINDS[1]} != nginx ]] || usage_error "A and B cannot both be nginx"
# HAProxy's maxconn from the open-files limit, as in benches/load.sh (about
# two descriptors per connection); a few thousand are plenty here.
HAPROXY_MAXCONN=$((($(ulimit -n) - 1024) / 2))
((HAPROXY_MAXCONN <= 4096)) || HAPROXY_MAXCONN=4096
((HAPROXY_MAXCONN >= CONNECTIONS + 64)) ||
    die "open-files limit $(ulimit -n) leaves HAProxy a maxconn of $HAPROXY_MAXCONN, too few for $CONNECTIONS connections"
positive "$DURATION" || usage_error "DURATION must be a positive integer (seconds), got '$DURATION'"
((DURATION <= 600)) || usage_error "DURATION must be at most 600 seconds, got '$DURATION'"
positive "$CONNECTIONS" || usage_error "CONNECTIONS must be a positive integer, got '$CONNECTIONS'"
positive "$H2_STREAMS" || usage_error "H2_STREAMS must be a positive integer, got '$H2_STREAMS'"
{ positive "$REPS" && ((REPS <= 100)); } || usage_error "REPS must be an integer from 1 to 100, got '$REPS'"
ROWS=$(checked_list ROWS "$ALL_ROWS" "$ROWS")

# The two positions: the template's ports, and the second set.
SLOT_PORT=("$PROXY_PORT" 19081)
SLOT_TLS=("$TLS_PORT" 19444)
SLOT_ADMIN=("$ADMIN_PORT" 19091)
SLOT_PID=("" "")
SLOT_WHO=(0 1)            # SLOT_WHO[slot]: index in BINS of the binary in that position

# cleanup (benches/load/common.sh) stops every process started and removes
# the temporary directory.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The title of each path in the report: load.sh's, from results.py.
row_title() {
    python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import results; print(results.ROWS[sys.argv[2]][0])' \
        "$TEMPLATES" "$1"
}

# --------------------------------------------------------------------------
# The two proxies

# Renders the configurations of both positions: flowgate.toml (threads = 1,
# no access log), and haproxy.cfg or nginx-proxy.conf when A or B is one of
# those; the second position's copies with its own ports (and, for nginx,
# its own PID file and temporary paths). Checks each with its binary.
render_configs() {
    local slot i cfg port
    for slot in 0 1; do
        for i in 0 1; do
            cfg=$(slot_config "$i" "$slot")
            [[ -f $cfg ]] && continue
            case ${KINDS[i]} in
                flowgate) render flowgate.toml "$cfg" THREADS=1 ACCESS_LOG=off ;;
                haproxy) render haproxy.cfg "$cfg" "MAXCONN=$HAPROXY_MAXCONN" THREADS=1 ;;
                nginx)
                    render nginx-proxy.conf "$cfg"
                    mkdir -p "$TMP/nginx-proxy-tmp"
                    ;;
            esac
            if ((slot == 1)); then
                sed -i -e "s|127\.0\.0\.1:${SLOT_PORT[0]}\b|127.0.0.1:${SLOT_PORT[1]}|" \
                    -e "s|127\.0\.0\.1:${SLOT_TLS[0]}\b|127.0.0.1:${SLOT_TLS[1]}|" \
                    -e "s|127\.0\.0\.1:${SLOT_ADMIN[0]}\b|127.0.0.1:${SLOT_ADMIN[1]}|" \
                    -e "s|/nginx-proxy\([.-]\)|/nginx-proxy-slot1\1|g" "$cfg"
                [[ ${KINDS[i]} != nginx ]] || mkdir -p "$TMP/nginx-proxy-slot1-tmp"
            fi
            for port in "${SLOT_PORT[slot]}" "${SLOT_TLS[slot]}"; do
                grep -q "127\.0\.0\.1:$port\b" "$cfg" ||
                    die "$cfg does not bind 127.0.0.1:$port: has its template in benches/load/ changed?"
            done
            case ${KINDS[i]} in
                flowgate) "${BINS[i]}" check --config "$cfg" ;;
                haproxy) haproxy -c -q -f "$cfg" ;;
                nginx) nginx -t -q -p "$TMP" -c "$cfg" -e "$TMP/nginx-check.log" ;;
            esac >"$TMP/check-${NAMES[i]}-slot$slot.log" 2>&1 || {
                sed 's/^/    /' "$TMP/check-${NAMES[i]}-slot$slot.log" >&2
                die "${NAMES[i]} (${BINS[i]}) rejects $cfg"
            }
        done
    done
}

# The configuration file of binary I (0 for A, 1 for B) in position SLOT.
slot_config() {
    case ${KINDS[$1]} in
        flowgate) echo "$TMP/flowgate-slot$2.toml" ;;
        haproxy) echo "$TMP/haproxy-slot$2.cfg" ;;
        nginx) echo "$TMP/nginx-proxy-slot$2.conf" ;;
    esac
}

# Starts the binary SLOT_WHO[SLOT] in position SLOT, pinned to PROXY_CPU, and
# waits until it answers 200 on both its ports; returns 1 if it does not.
start_slot() {
    local slot=$1 who=${SLOT_WHO[$1]} logfile pid cfg
    logfile="$TMP/out/$CELL-${NAMES[who]}.log"
    cfg=$(slot_config "$who" "$slot")
    case ${KINDS[who]} in
        flowgate) start_bg "$PROXY_CPU" "$logfile" "${BINS[who]}" run --config "$cfg" ;;
        # -db: in the foreground, one process.
        haproxy) start_bg "$PROXY_CPU" "$logfile" haproxy -db -f "$cfg" ;;
        # The master and its one worker, both on the proxies' core.
        nginx) start_bg "$PROXY_CPU" "$logfile" nginx -p "$TMP" -c "$cfg" -e "$logfile" ;;
    esac
    pid=$STARTED_PID
    SLOT_PID[slot]=$pid
    wait_answering "${NAMES[who]}" "$pid" "${SLOT_PORT[slot]}" "${SLOT_TLS[slot]}" "$logfile"
}

stop_slots() {
    local slot port
    for slot in 0 1; do
        [[ -n ${SLOT_PID[slot]} ]] || continue
        stop_pid "${SLOT_PID[slot]}"
        forget_pid "${SLOT_PID[slot]}"
        SLOT_PID[slot]=""
    done
    for port in "${SLOT_PORT[@]}" "${SLOT_TLS[@]}" "${SLOT_ADMIN[@]}"; do
        wait_port_free "$port" || die "port $port still busy after stopping a proxy"
    done
}

# --------------------------------------------------------------------------
# Cells

FAILED=0
CELLS_TSV=""

# Drives ROW against both positions at once for SECONDS, one load generator
# each, into PREFIX-A.txt and PREFIX-B.txt; waits for both. Sets DRIVE_RC
# (by binary index).
drive() {
    local row=$1 seconds=$2 prefix=$3 slot
    local -a pids=()
    for slot in 0 1; do
        load_command "$row" "${SLOT_PORT[slot]}" "$seconds" "$prefix-${NAMES[SLOT_WHO[slot]]}.h2log" "${SLOT_TLS[slot]}"
        start_bg - "$prefix-${NAMES[SLOT_WHO[slot]]}.txt" timeout -k 5 $((seconds + 60)) "${LOAD[@]}"
        pids[slot]=$STARTED_PID
    done
    DRIVE_RC=(0 0)
    for slot in 0 1; do
        wait "${pids[slot]}" || DRIVE_RC[SLOT_WHO[slot]]=$?
        forget_pid "${pids[slot]}"
    done
}

# Reads the load generator's output FILE of ROW (exit status RC) into PARSED
# ("RPS P50 P99 REQUESTS ERRORS"; h2load's latencies from FILE with .h2log for
# .txt); returns 1, with the reason in WHY, when the run failed or its output
# cannot be read.
parse_load() {
    local row=$1 file=$2 rc=$3 tool=wrk
    local -a h2log=()
    PARSED="" WHY=""
    if ((rc != 0)); then
        WHY="load generator failed (exit $rc)"
    elif [[ $row == h2 ]] && ! grep -q '^Application protocol: h2' "$file"; then
        WHY="no h2 by ALPN"
    else
        [[ $row == h2 ]] && tool=h2load h2log=("${file%.txt}.h2log")
        PARSED=$(python3 "$TEMPLATES/results.py" "$tool" "$file" "${h2log[@]}" 2>/dev/null) || PARSED=""
        [[ -n $PARSED ]] && return 0
        WHY="unreadable output"
    fi
    tail -n 20 "$file" | sed 's/^/    /' >&2
    return 1
}

# Records a cell that could not be measured.
fail_cell() {
    log "$1 (rep $((REP + 1))): $2"
    printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t\t\t\n' "$1" $((REP + 1)) "${NAMES[SLOT_WHO[0]]}" "$2" >>"$CELLS_TSV"
    FAILED=1
}

run_cell() {
    local row=$1 slot i base t0 t1
    local -a ticks0=() ticks1=() rps=() p99=() requests=() errors=()
    CELL="$row-rep$((REP + 1))"
    base="$TMP/out/$CELL"
    # A in the first position on even REP (the 1st, 3rd, ... repetition), B on odd.
    if ((REP % 2 == 0)); then SLOT_WHO=(0 1); else SLOT_WHO=(1 0); fi
    for slot in 0 1; do
        if ! start_slot "$slot"; then
            stop_slots
            fail_cell "$row" "${NAMES[SLOT_WHO[slot]]} did not start"
            return
        fi
    done

    drive "$row" "$WARMUP" "$base.warmup"
    for i in 0 1; do
        if ! parse_load "$row" "$base.warmup-${NAMES[i]}.txt" "${DRIVE_RC[i]}" || [[ ${PARSED##* } != 0 ]]; then
            stop_slots
            fail_cell "$row" "${NAMES[i]}: warm-up failed or had errors${WHY:+ ($WHY)}"
            return
        fi
    done

    load_command "$row" "${SLOT_PORT[0]}" "$DURATION" "" "${SLOT_TLS[0]}"
    log "$row (rep $((REP + 1)) of $REPS, ${NAMES[SLOT_WHO[0]]} first): ${LOAD[*]}, and the same on :${SLOT_PORT[1]}/:${SLOT_TLS[1]}"
    for slot in 0 1; do
        ticks0[SLOT_WHO[slot]]=$(cpu_ticks "${SLOT_PID[slot]}") || ticks0[SLOT_WHO[slot]]=""
    done
    drive "$row" "$DURATION" "$base"
    for slot in 0 1; do
        ticks1[SLOT_WHO[slot]]=$(cpu_ticks "${SLOT_PID[slot]}") || ticks1[SLOT_WHO[slot]]=""
    done
    stop_slots

    for i in 0 1; do
        if [[ -z ${ticks0[i]} || -z ${ticks1[i]} ]]; then
            fail_cell "$row" "${NAMES[i]} exited during the measurement"
            return
        fi
        if ! parse_load "$row" "$base-${NAMES[i]}.txt" "${DRIVE_RC[i]}"; then
            fail_cell "$row" "${NAMES[i]}: $WHY"
            return
        fi
        read -r "rps[i]" _ "p99[i]" "requests[i]" "errors[i]" <<<"$PARSED"
        if ((requests[i] == 0)); then
            fail_cell "$row" "${NAMES[i]}: no request completed"
            return
        fi
        if ((errors[i] > 0)); then
            log "$row / ${NAMES[i]}: ${errors[i]} requests not answered 2xx:"
            grep -E 'Non-2xx|Socket errors|^requests:|^status codes:' "$base-${NAMES[i]}.txt" | sed 's/^/    /' >&2
            FAILED=1
        fi
    done
    t0=$((ticks1[0] - ticks0[0]))
    t1=$((ticks1[1] - ticks0[1]))
    printf '%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" $((REP + 1)) "${NAMES[SLOT_WHO[0]]}" \
        "$t0" "${requests[0]}" "${rps[0]}" "${errors[0]}" "$t1" "${requests[1]}" "${rps[1]}" "${errors[1]}" \
        "${p99[0]}" "${p99[1]}" >>"$CELLS_TSV"
    log "$row: A ${requests[0]} requests, $(awk -v t="$t0" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }') s CPU;" \
        "B ${requests[1]} requests, $(awk -v t="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }') s CPU;" \
        "errors ${errors[0]} / ${errors[1]}"
}

# --------------------------------------------------------------------------
# Report

# The table of ROW from the cells, then its one-line summary.
report_row() {
    awk -F'\t' -v row="$1" -v hz="$CLK_TCK" '
        function commas(n,   s) {
            s = sprintf("%.0f", n)
            while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]([,]|$)/, ",&", s)
            return s
        }
        function isort(a, n,   i, j, x) {
            for (i = 2; i <= n; i++) {
                x = a[i]
                for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]
                a[j + 1] = x
            }
        }
        function median(a, n) {
            isort(a, n)
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        function spread(a, n,   i, lo, hi) {
            lo = hi = a[1]
            for (i = 2; i <= n; i++) { if (a[i] < lo) lo = a[i]; if (a[i] > hi) hi = a[i] }
            return sprintf("%.3f (%.3f–%.3f)", median(a, n), lo, hi)
        }
        $1 == row {
            if ($4 != "ok") {
                printf "| %s | %s | not measured: %s | | | | | | | | |\n", $2, $3, $4
                next
            }
            if ($5 <= 0 || $9 <= 0) {
                printf "| %s | %s | not measured: no CPU time counted | | | | | | | | |\n", $2, $3
                next
            }
            a = $5 / hz * 10000 / $6
            b = $9 / hz * 10000 / $10
            r = b / a
            # p99 ratio: only where both load generators gave one.
            pr = ($13 > 0 && $14 > 0) ? $14 / $13 : 0
            note = ""
            if ($8 + $12 > 0) note = " (left out: errors)"
            else {
                n++; ra[n] = r; aa[n] = a; bb[n] = b
                if (pr > 0) { m++; pa[m] = $13; pb[m] = $14; pra[m] = pr }
            }
            printf "| %s | %s | %.3f | %.3f | %.3f%s | %s | %s | %s | %s | %s | %d / %d |\n", \
                $2, $3, a, b, r, note, commas($7), commas($11), \
                ($13 > 0 ? sprintf("%.2f", $13) : "n/a"), ($14 > 0 ? sprintf("%.2f", $14) : "n/a"), \
                (pr > 0 ? sprintf("%.3f", pr) : "n/a"), $8, $12
        }
        END {
            if (n == 0) {
                print ""
                print "B/A CPU per request: n/a (no repetition measured without errors)"
                exit
            }
            cpu = spread(ra, n)
            p99 = (m > 0) ? spread(pra, m) : "n/a"
            printf "| median | | %.3f | %.3f | %s | | | %s | %s | %s | |\n", median(aa, n), median(bb, n), cpu, \
                (m > 0 ? sprintf("%.2f", median(pa, m)) : "n/a"), (m > 0 ? sprintf("%.2f", median(pb, m)) : "n/a"), p99
            print ""
            printf "B/A CPU per request: median %s; B/A p99 latency: median %s\n", cpu, p99
        }' "$CELLS_TSV"
}

# --------------------------------------------------------------------------
# Main

install_missing wrk:wrk nginx:nginx-light curl:curl taskset:util-linux openssl:openssl \
    python3:python3 h2load:nghttp2-client
[[ ${KINDS[0]} != haproxy && ${KINDS[1]} != haproxy ]] || install_missing haproxy:haproxy
for cmd in wrk h2load nginx curl taskset timeout awk getconf openssl python3 sha256sum; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done
for i in 0 1; do
    [[ ${KINDS[i]} == flowgate ]] || BINS[i]=$(command -v "${KINDS[i]}") || die "${KINDS[i]} not found"
done
CLK_TCK=$(getconf CLK_TCK)
pick_cpus

make_tmp flowgate-ab
CELLS_TSV="$TMP/cells.tsv"
: >"$CELLS_TSV"

check_ports_free
for port in "${SLOT_PORT[1]}" "${SLOT_TLS[1]}" "${SLOT_ADMIN[1]}"; do
    port_open "$port" && die "127.0.0.1:$port is already in use; stop whatever listens there first"
done

make_certificate
render_configs
start_origins

LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
RUN_START=$SECONDS
for ((REP = 0; REP < REPS; REP++)); do
    log "repetition $((REP + 1)) of $REPS"
    for row in $ROWS; do run_cell "$row"; done
done
log "measured in $((SECONDS - RUN_START)) s"

cpu_model=$(machine_cpu)

{
    echo "# flowgate A/B: proxy CPU seconds per 10,000 requests, p99 latency"
    echo
    echo "- command: \`$COMMAND\`"
    for i in 0 1; do
        sum=$(sha256sum "${BINS[i]}")
        case ${KINDS[i]} in
            flowgate) version=$(first_line "${BINS[i]}" --version) ;;
            haproxy) version=$(first_line haproxy -v) ;;
            nginx) version=$(first_line nginx -v) ;;
        esac
        echo "- ${NAMES[i]}: \`${BINS[i]}\`: $version (sha256 ${sum:0:16}, $(stat -c %s "${BINS[i]}") B)"
    done
    if [[ $(sha256sum <"${BINS[0]}") == "$(sha256sum <"${BINS[1]}")" ]]; then
        echo "- A and B are the same file: an A/A run, every ratio should be 1"
    fi
    echo "- machine: $(nproc) cores ($cpu_model), kernel $(uname -r); load average at the start $LOADAVG_START"
    echo "- tools: $(first_line wrk -v); $(first_line h2load --version); $(first_line nginx -v)"
    echo "- method: A and B run at the same time, one worker thread each (threads = 1), both pinned to" \
        "core $PROXY_CPU; the three nginx origins (one worker) and one load generator per proxy on core $LOAD_CPU." \
        "Each cell starts both afresh, drives both at once for $WARMUP s of unmeasured warm-up, then for" \
        "$DURATION s; CPU is each process's utime + stime (from /proc/PID/stat) over that window, per 10,000" \
        "requests its load generator completed; p99 is the latency its load generator measured over the same window. $REPS repetition(s) of every path; \"first\" is the binary" \
        "started first, on :${SLOT_PORT[0]}/:${SLOT_TLS[0]} (the other on :${SLOT_PORT[1]}/:${SLOT_TLS[1]}), A on" \
        "the 1st, 3rd, ... repetition and B on the others. The median row gives the medians of each column;" \
        "B/A there is the median of the per-repetition ratios, with min–max."
    for row in $ROWS; do
        load_command "$row" "${SLOT_PORT[0]}" "$DURATION" "" "${SLOT_TLS[0]}"
        echo
        echo "## $row: $(row_title "$row")"
        echo
        echo "Load, per proxy: \`${LOAD[*]}\` (and the same on :${SLOT_PORT[1]}/:${SLOT_TLS[1]})."
        echo
        echo "| rep | first | A CPU s / 10k req | B CPU s / 10k req | B/A | A req/s | B req/s | A p99 ms | B p99 ms | p99 B/A | errors A / B |"
        echo "| --: | :-: | --: | --: | --: | --: | --: | --: | --: | --: | --: |"
        report_row "$row"
    done
    echo
    echo "## Summary"
    echo
    for row in $ROWS; do
        echo "- $row: $(report_row "$row" | tail -n 1)"
    done
    if ((FAILED)); then
        echo
        echo "**This run had errors or unmeasured cells (see the tables); exit status 1.**"
    fi
}

if ((FAILED)); then log "FAILED: some requests were not answered 2xx, or some cells were not measured"; fi
exit "$FAILED"
