# shellcheck shell=bash
# Shared by benches/load.sh and benches/profile.sh, which source it after
# setting SCRIPT_DIR, REPO_ROOT, TEMPLATES (this directory) and LOG_TAG (the
# prefix of their log lines). Nothing here runs when it is sourced: it sets
# the ports and deadlines and defines functions. The functions read the
# calling script's settings (TMP, KEEP_TMP, PROXY_CPU, LOAD_CPU, CONNECTIONS,
# H2_STREAMS, FLOWGATE_BIN, FLOWGATE_BUILT, HAPROXY_MAXCONN) when called.
#
# Everything listens on 127.0.0.1 only: origins on 19101..19103 (and 19111
# with TLS), the proxy under test on 19080 (plain) and 19443 (TLS),
# flowgate's admin listener on 19090.

# shellcheck disable=SC2034  # some of these are used by one script only

PROXY_PORT=19080
TLS_PORT=19443
ADMIN_PORT=19090
ORIGIN_PORTS=(19101 19102 19103)
ORIGIN_TLS_PORT=19111
WARMUP=1                  # seconds of unmeasured load before each cell
READY_DEADLINE=30         # seconds a proxy may take to answer 200
STOP_DEADLINE=10          # seconds a process may take to exit on SIGTERM

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
usage_error() {
    log "usage error: $*"
    exit 2
}

positive() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

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

# utime + stime of PID and its descendants (nginx's worker), all their
# threads, in clock ticks; returns 1 when none of them is running.
# "TID TICKS" for every thread of PID and its descendants (utime + stime).
thread_ticks() {
    local pid task rest
    local -a fields
    while read -r pid; do
        for task in /proc/"$pid"/task/*; do
            read -r rest 2>/dev/null <"$task/stat" || continue
            rest=${rest##*) }
            read -ra fields <<<"$rest"
            echo "${task##*/} $((fields[11] + fields[12]))"
        done
    done < <(proc_tree "$1")
}

# The busiest thread's share (percent) of the CPU all threads used between
# two thread_ticks snapshots; "nan" when they used none.
busiest_thread() {
    awk -v before="$1" -v after="$2" 'BEGIN {
        n = split(before, b, "\n")
        for (i = 1; i <= n; i++) { split(b[i], f, " "); start[f[1]] = f[2] }
        n = split(after, a, "\n")
        for (i = 1; i <= n; i++) {
            split(a[i], f, " ")
            if (f[1] == "") continue
            d = f[2] - start[f[1]]; total += d; if (d > most) most = d
        }
        if (total > 0) printf "%.1f", 100 * most / total; else print "nan"
    }'
}

cpu_ticks() {
    local pid rest ticks=0 found=0
    local -a fields
    while read -r pid; do
        read -r rest 2>/dev/null <"/proc/$pid/stat" || continue
        rest=${rest##*) }
        read -ra fields <<<"$rest"
        # fields[0] is stat field 3; utime is field 14, stime field 15.
        ticks=$((ticks + fields[11] + fields[12]))
        found=1
    done < <(proc_tree "$1")
    ((found)) || return 1
    echo "$ticks"
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

# install_missing COMMAND:PACKAGE...: installs from Debian's packages the
# PACKAGE of each COMMAND that is missing (nothing when all is there, so
# running it again is cheap and changes nothing).
install_missing() {
    local need=() cmd pkg
    for cmd in "$@"; do
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

# A new temporary directory in TMP, named PREFIX.XXXXXX, with out/ (raw
# outputs) and www/ (the origins' files).
make_tmp() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    mkdir -p "$TMP/out" "$TMP/www"
    # nginx's workers run as an unprivileged user: let them reach the body file.
    chmod 755 "$TMP" "$TMP/www"
}

# Dies if anything listens on one of the ports the harness uses.
check_ports_free() {
    local port
    for port in "$PROXY_PORT" "$TLS_PORT" "$ADMIN_PORT" "${ORIGIN_PORTS[@]}" "$ORIGIN_TLS_PORT"; do
        port_open "$port" && die "127.0.0.1:$port is already in use; stop whatever listens there first"
    done
    return 0
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

# The origins: one nginx, one worker, pinned with the load generator; also
# writes the 16 KiB body. Sets ORIGINS_PID.
start_origins() {
    local i port
    # The 16 KiB body: 256 lines of 64 bytes.
    for ((i = 0; i < 256; i++)); do printf '%063d\n' "$i"; done >"$TMP/www/16k.txt"
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
}

# --------------------------------------------------------------------------
# Load generators

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
# haproxy, haproxy-1t, haproxy-2t or nginx. The -Nt variants run unpinned
# with N threads.
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
        haproxy*)
            case $variant in
                haproxy-1t) cpu=- ;;
                haproxy-2t) cpu=- threads=2 ;;
            esac
            cfg="$TMP/$variant.cfg"
            render haproxy.cfg "$cfg" "MAXCONN=$HAPROXY_MAXCONN" "THREADS=$threads"
            haproxy -c -q -f "$cfg" >"$TMP/$variant-check.log" 2>&1 || {
                sed 's/^/    /' "$TMP/$variant-check.log" >&2
                return 1
            }
            PROXY_LOG="$TMP/$variant.log"
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
    wait_answering "$variant" "$PROXY_PID" "$PROXY_PORT" "$TLS_PORT" "$PROXY_LOG" && return 0
    stop_proxy
    return 1
}

# Waits until proxy NAME (process PID) answers 200 on 127.0.0.1:PORT (plain)
# and :TLS_PORT (TLS 1.3); if it does not, logs why with the last lines of
# LOGFILE and returns 1.
wait_answering() {
    local name=$1 pid=$2 port=$3 tls_port=$4 logfile=$5
    if wait_ready "http://127.0.0.1:$port/" "$pid" &&
        wait_ready "https://127.0.0.1:$tls_port/" "$pid" -k --tlsv1.3; then
        return 0
    fi
    if [[ -d /proc/$pid ]]; then
        log "$name: did not answer 200 on :$port and :$tls_port within ${READY_DEADLINE}s; last log lines:"
    else
        log "$name: exited before answering; last log lines:"
    fi
    tail -n 20 "$logfile" 2>/dev/null | sed 's/^/    /' >&2 || true
    return 1
}

# First line of a command's output, whatever its exit status.
first_line() {
    local out
    out=$("$@" 2>&1) || true
    out=${out%%$'\n'*}
    printf '%s' "${out:-unknown}"
}

# The CPU's model name (the architecture where /proc/cpuinfo has none).
machine_cpu() {
    local model
    model=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null)
    printf '%s' "${model:-$(uname -m)}"
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
