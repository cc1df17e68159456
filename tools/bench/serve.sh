#!/usr/bin/env bash
# Serve benchmark: shoal serving a cached blob vs nginx serving the same file, same run.
#
# nginx plays two roles: the "upstream registry" shoal pulls the blob from (the file sits at
# v2/bench/blobs/sha256:<D> under nginx's root) and the baseline server. After shoal has cached
# and verified the blob, interleaved rounds download it from each (alternating the order every
# round to cancel drift) and the script reports median throughputs, the ratio
# median(shoal)/median(nginx), and shoal's peak RSS while serving (VmHWM, reset just before the
# rounds with `echo 5 > /proc/PID/clear_refs`).
#
# Usage: tools/bench/serve.sh [--size BYTES] [--rounds N] [--json FILE] [--bin PATH]
#                              [--timeout S] [--nginx-sendfile on|off]
#   --size BYTES   blob size (default 1073741824; suffixes K/M/G = KiB/MiB/GiB accepted).
#                  Env: SHOAL_BENCH_SIZE.
#   --rounds N     measured rounds (default 5). Env: SHOAL_BENCH_ROUNDS.
#   --json FILE    where to write the JSON result (default TMP/serve-bench.json; since TMP is
#                  removed on exit, a copy of the default is kept as
#                  ${TMPDIR:-/tmp}/shoal-serve-bench.<timestamp>.json). Env: SHOAL_BENCH_JSON.
#   --bin PATH     shoal binary (default <repo>/target/debug/shoal). Env: SHOAL_BIN.
#   --timeout S    per-transfer curl --max-time in seconds (default 300). Env: SHOAL_BENCH_TIMEOUT.
#   --nginx-sendfile on|off
#                  nginx's `sendfile` (default on). On loopback sendfile saves nginx no copy
#                  that matters (the receiving side still copies every byte), so `off`
#                  (pread+writev, 4 MiB buffers) gives a copying baseline like shoal's mmap+writev.
#                  Env: SHOAL_BENCH_NGINX_SENDFILE.
#
# Exit status: 0 when the measurement completed (whether or not the targets are met);
# non-zero when something broke (wrong digest, curl failure, short transfer, a server that did
# not start).
#
# Build first (one profile on purpose, no --release):  cargo build -p shoal-node
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)

SIZE=${SHOAL_BENCH_SIZE:-1073741824}
ROUNDS=${SHOAL_BENCH_ROUNDS:-5}
JSON=${SHOAL_BENCH_JSON:-}
BIN=${SHOAL_BIN:-$REPO/target/debug/shoal}
TIMEOUT=${SHOAL_BENCH_TIMEOUT:-300}
NGINX_SENDFILE=${SHOAL_BENCH_NGINX_SENDFILE:-on}
TARGET_RATIO=0.9
TARGET_RSS_MIB=64

die() { echo "serve-bench: ERROR: $*" >&2; exit 1; }
log() { echo "serve-bench: $*" >&2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) SIZE=${2:?--size needs a value}; shift 2 ;;
        --size=*) SIZE=${1#*=}; shift ;;
        --rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
        --rounds=*) ROUNDS=${1#*=}; shift ;;
        --json) JSON=${2:?--json needs a value}; shift 2 ;;
        --json=*) JSON=${1#*=}; shift ;;
        --bin) BIN=${2:?--bin needs a value}; shift 2 ;;
        --bin=*) BIN=${1#*=}; shift ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --nginx-sendfile) NGINX_SENDFILE=${2:?--nginx-sendfile needs on or off}; shift 2 ;;
        --nginx-sendfile=*) NGINX_SENDFILE=${1#*=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done

case "$SIZE" in
    *[kK]) SIZE=$(( ${SIZE%?} * 1024 )) ;;
    *[mM]) SIZE=$(( ${SIZE%?} * 1024 * 1024 )) ;;
    *[gG]) SIZE=$(( ${SIZE%?} * 1024 * 1024 * 1024 )) ;;
esac
[[ "$SIZE" =~ ^[0-9]+$ && "$SIZE" -gt 0 ]] || die "--size must be a positive byte count"
[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -gt 0 ]] || die "--rounds must be a positive integer"
[[ "$TIMEOUT" =~ ^[0-9]+$ && "$TIMEOUT" -gt 0 ]] || die "--timeout must be a positive integer"
[[ "$NGINX_SENDFILE" == on || "$NGINX_SENDFILE" == off ]] || die "--nginx-sendfile must be on or off"
[[ -x "$BIN" ]] || die "shoal binary not found at $BIN (run: cargo build -p shoal-node)"
for c in nginx curl python3 sha256sum head; do
    command -v "$c" >/dev/null || die "$c not found"
done

# ---------------------------------------------------------------------------------------------
# Temp dir and cleanup

TMP=$(mktemp -d "${TMPDIR:-/tmp}/shoal-serve-bench.XXXXXX")
NGINX_PID=""
SHOAL_PID=""
DEFAULT_JSON=0
if [[ -z "$JSON" ]]; then
    JSON=$TMP/serve-bench.json
    DEFAULT_JSON=1
fi

# Sends TERM to a pid we started, waits up to $2 seconds, then KILLs it.
stop_pid() {
    local pid=$1 grace=$2 i
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop within ${grace}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$SHOAL_PID" 15
    stop_pid "$NGINX_PID" 10
    if [[ $DEFAULT_JSON -eq 1 && -f "$JSON" ]]; then
        local keep
        keep=${TMPDIR:-/tmp}/shoal-serve-bench.$(date +%Y%m%d-%H%M%S).json
        cp "$JSON" "$keep" && log "JSON result kept at $keep"
    fi
    if [[ $rc -ne 0 ]]; then
        for f in shoal.log nginx-error.log; do
            if [[ -s "$TMP/$f" ]]; then
                log "last lines of $f:"
                tail -n 5 "$TMP/$f" >&2 || true
            fi
        done
    fi
    rm -rf -- "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits (bounded) until URL answers with HTTP 200. $1 url, $2 seconds, $3 pid that must stay alive.
wait_http_200() {
    local url=$1 secs=$2 pid=$3 i code
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
        [[ "$code" == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

# utime+stime of a pid, in clock ticks.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

status_kib() { # $1 pid, $2 field (VmHWM, VmRSS, ...)
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

# ---------------------------------------------------------------------------------------------
# Machine info

NPROC=$(nproc)
KERNEL=$(uname -r)
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || echo unknown)
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
NGINX_VERSION=$(nginx -v 2>&1 | sed 's/^nginx version: //')
CURL_VERSION=$(curl --version | awk 'NR == 1 { print $2 }')
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null | head -1)" ]]; then GIT_REV="$GIT_REV-dirty"; fi
CLK_TCK=$(getconf CLK_TCK)

echo "== shoal serve benchmark =="
echo "machine: nproc=$NPROC kernel=$KERNEL cpu=\"$CPU_MODEL\" loadavg=\"$LOADAVG\""
echo "tools:   nginx=$NGINX_VERSION curl=$CURL_VERSION shoal=$BIN (git $GIT_REV)"
echo "params:  size=$SIZE bytes rounds=$ROUNDS nginx_sendfile=$NGINX_SENDFILE tmp=$TMP"

# ---------------------------------------------------------------------------------------------
# 1. The blob

mkdir -p "$TMP/www/v2/bench/blobs" "$TMP/data" "$TMP/nginx"
RAW=$TMP/www/blob.tmp
log "generating $SIZE random bytes"
head -c "$SIZE" /dev/urandom >"$RAW"
[[ $(stat -c %s "$RAW") -eq $SIZE ]] || die "short random file"
D=$(sha256sum "$RAW" | cut -d' ' -f1)
BLOB_PATH=v2/bench/blobs/sha256:$D
mv "$RAW" "$TMP/www/$BLOB_PATH"
log "blob sha256:$D"

# ---------------------------------------------------------------------------------------------
# 2. nginx: upstream registry and baseline

NGINX_PORT=$(free_port)
NGINX_EXTRA=""
# Without sendfile, read the file in 4 MiB buffers, like shoal's windows.
[[ "$NGINX_SENDFILE" == off ]] && NGINX_EXTRA="output_buffers 2 4m;"
cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
user root;
master_process on;
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 64; }
http {
    access_log $TMP/nginx-access.log;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    default_type application/octet-stream;
    sendfile $NGINX_SENDFILE;
    tcp_nopush on;
    $NGINX_EXTRA
    keepalive_timeout 30;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $TMP/www;
        location / { }
    }
}
EOF
nginx -e "$TMP/nginx-error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -t >/dev/null 2>&1 \
    || { nginx -e "$TMP/nginx-error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -t; die "nginx config test failed"; }
nginx -e "$TMP/nginx-error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >>"$TMP/nginx-error.log" 2>&1 &
NGINX_PID=$!
NGINX_URL=http://127.0.0.1:$NGINX_PORT/$BLOB_PATH
# Wait (bounded) until nginx serves the blob.
code=""
for ((i = 0; i < 150; i++)); do
    kill -0 "$NGINX_PID" 2>/dev/null || die "nginx exited"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -r 0-0 "$NGINX_URL" || true)
    [[ "$code" == 000 ]] || break # anything but "not listening yet" is an answer
    sleep 0.1
done
[[ "$code" == 206 || "$code" == 200 ]] || die "nginx does not serve the blob (HTTP $code)"
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -1 || true)
log "nginx pid $NGINX_PID (worker ${NGINX_WORKER:-?}) on 127.0.0.1:$NGINX_PORT"

# ---------------------------------------------------------------------------------------------
# 3. shoal

SHOAL_PORT=$(free_port)
SHOAL_LOG=warn "$BIN" run --listen "127.0.0.1:$SHOAL_PORT" --data-dir "$TMP/data" \
    --upstream "http://127.0.0.1:$NGINX_PORT" >"$TMP/shoal.log" 2>&1 &
SHOAL_PID=$!
wait_http_200 "http://127.0.0.1:$SHOAL_PORT/v2/" 30 "$SHOAL_PID" || die "shoal did not answer GET /v2/ with 200 within 30s"
SHOAL_URL=http://127.0.0.1:$SHOAL_PORT/$BLOB_PATH
log "shoal pid $SHOAL_PID on 127.0.0.1:$SHOAL_PORT"

log "warming shoal (fetch from nginx, verify, store)"
t0=$(date +%s.%N)
curl -sf --max-time "$TIMEOUT" "$SHOAL_URL" -o /dev/null || die "warm-up GET through shoal failed (curl exit $?)"
t1=$(date +%s.%N)
WARM_S=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
log "warm-up took ${WARM_S}s"

# The second GET must be served from the store and carry the right bytes.
got=$(set -o pipefail; curl -sf --max-time "$TIMEOUT" "$SHOAL_URL" | sha256sum | cut -d' ' -f1) \
    || die "verification GET through shoal failed"
[[ "$got" == "$D" ]] || die "shoal served wrong bytes: sha256 $got, want $D"
log "shoal serves the right bytes (sha256 verified)"
# Same sanity check for the baseline (also puts both copies in the page cache).
got=$(set -o pipefail; curl -sf --max-time "$TIMEOUT" "$NGINX_URL" | sha256sum | cut -d' ' -f1) \
    || die "verification GET from nginx failed"
[[ "$got" == "$D" ]] || die "nginx served wrong bytes: sha256 $got, want $D"

# ---------------------------------------------------------------------------------------------
# 4-6. Measure

RSS_BEFORE_KIB=$(status_kib "$SHOAL_PID" VmRSS)
echo 5 >"/proc/$SHOAL_PID/clear_refs" || die "cannot reset VmHWM of shoal (pid $SHOAL_PID)"
HWM_AFTER_RESET_KIB=$(status_kib "$SHOAL_PID" VmHWM)
log "shoal VmRSS before rounds: ${RSS_BEFORE_KIB} KiB; VmHWM reset to ${HWM_AFTER_RESET_KIB} KiB"

ROUNDS_FILE=$TMP/rounds.tsv
: >"$ROUNDS_FILE"
# Samples shoal's RSS every 50 ms during the rounds (a cross-check of VmHWM; bounded by the
# main script's lifetime: it stops when the marker file goes away or shoal exits).
SAMPLER_MARK=$TMP/sampling
touch "$SAMPLER_MARK"
(
    max=0
    while [[ -e "$SAMPLER_MARK" ]] && kill -0 "$SHOAL_PID" 2>/dev/null; do
        r=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$SHOAL_PID/status" 2>/dev/null || echo 0)
        [[ -n "$r" && "$r" -gt "$max" ]] && max=$r && echo "$max" >"$TMP/rss-sampled-max"
        sleep 0.05
    done
) &
SAMPLER_PID=$!

fetch() { # $1 label, $2 url, $3 pid of the serving process -> appends a row to ROUNDS_FILE
    local label=$1 url=$2 pid=$3 out rc c0 c1 size time code
    c0=$(cpu_ticks "$pid")
    set +e
    out=$(curl -s -o /dev/null --max-time "$TIMEOUT" -w '%{size_download} %{time_total} %{http_code}' "$url")
    rc=$?
    set -e
    c1=$(cpu_ticks "$pid")
    [[ $rc -eq 0 ]] || die "$label: curl failed with exit code $rc ($out)"
    read -r size time code <<<"$out"
    [[ "$code" == 200 ]] || die "$label: HTTP $code"
    [[ "$size" -eq "$SIZE" ]] || die "$label: downloaded $size bytes, want $SIZE"
    printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$label" "$size" "$time" "$((c1 - c0))" >>"$ROUNDS_FILE"
    python3 -c "import sys; s,t=int(sys.argv[1]),float(sys.argv[2]); print(f'  round {sys.argv[3]} {sys.argv[4]:<5} {s/t/1e6:9.1f} MB/s  {t:7.3f} s')" \
        "$size" "$time" "$round" "$label"
}

echo "rounds (order alternates each round):"
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2 == 1)); then
        fetch nginx "$NGINX_URL" "${NGINX_WORKER:-$NGINX_PID}"
        fetch shoal "$SHOAL_URL" "$SHOAL_PID"
    else
        fetch shoal "$SHOAL_URL" "$SHOAL_PID"
        fetch nginx "$NGINX_URL" "${NGINX_WORKER:-$NGINX_PID}"
    fi
done

HWM_KIB=$(status_kib "$SHOAL_PID" VmHWM)
RSS_KIB=$(status_kib "$SHOAL_PID" VmRSS)
rm -f "$SAMPLER_MARK"
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLED_KIB=$(cat "$TMP/rss-sampled-max" 2>/dev/null || echo 0)
THREADS=$(awk '$1 == "Threads:" { print $2 }' "/proc/$SHOAL_PID/status")

# ---------------------------------------------------------------------------------------------
# 7. Report

mkdir -p "$(dirname "$JSON")"
python3 - "$ROUNDS_FILE" "$JSON" <<EOF
import json, statistics, sys

rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
def series(label):
    return [r for r in rows if r[1] == label]
clk = $CLK_TCK
out = {}
per = {}
for label in ("nginx", "shoal"):
    rs = series(label)
    mbps = [int(r[2]) / float(r[3]) / 1e6 for r in rs]
    cpu_s = [int(r[4]) / clk for r in rs]
    per[label] = (mbps, [float(r[3]) for r in rs], cpu_s)
n_med = statistics.median(per["nginx"][0])
s_med = statistics.median(per["shoal"][0])
ratio = s_med / n_med if n_med > 0 else 0.0
peak_mib = $HWM_KIB / 1024
size = $SIZE
def cpu_per_gib(label):
    tot_cpu = sum(per[label][2]); tot_bytes = size * len(per[label][2])
    return tot_cpu / (tot_bytes / 2**30) if tot_bytes else 0.0
out = {
    "size_bytes": size,
    "rounds": $ROUNDS,
    "nginx_mbps": [round(x, 1) for x in per["nginx"][0]],
    "shoal_mbps": [round(x, 1) for x in per["shoal"][0]],
    "nginx_median_mbps": round(n_med, 1),
    "shoal_median_mbps": round(s_med, 1),
    "ratio": round(ratio, 3),
    "shoal_peak_rss_mib": round(peak_mib, 1),
    "targets": {"ratio": $TARGET_RATIO, "rss_mib": $TARGET_RSS_MIB},
    "met": {"ratio": ratio >= $TARGET_RATIO, "rss_mib": peak_mib <= $TARGET_RSS_MIB},
    "shoal_rss_mib_after": round($RSS_KIB / 1024, 1),
    "shoal_rss_mib_before": round($RSS_BEFORE_KIB / 1024, 1),
    "shoal_rss_mib_sampled_max": round($SAMPLED_KIB / 1024, 1),
    "shoal_threads": $THREADS,
    "server_cpu_s_per_gib": {"nginx": round(cpu_per_gib("nginx"), 3), "shoal": round(cpu_per_gib("shoal"), 3)},
    "time_s": {"nginx": per["nginx"][1], "shoal": per["shoal"][1]},
    "warmup_s": $WARM_S,
    "digest": "sha256:$D",
    "machine": {"nproc": $NPROC, "kernel": "$KERNEL", "cpu": "$CPU_MODEL", "loadavg_at_start": "$LOADAVG"},
    "nginx_sendfile": "$NGINX_SENDFILE",
    "versions": {"nginx": "$NGINX_VERSION", "curl": "$CURL_VERSION", "shoal_git": "$GIT_REV"},
}
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")

def fmt(x): return f"{x:8.1f} MB/s ({x/1000:5.2f} GB/s)"
print("summary:")
print(f"  nginx median  {fmt(n_med)}   rounds: " + " ".join(f"{x:.0f}" for x in per["nginx"][0]))
print(f"  shoal median  {fmt(s_med)}   rounds: " + " ".join(f"{x:.0f}" for x in per["shoal"][0]))
print(f"  ratio shoal/nginx = {ratio:.3f}   (target >= $TARGET_RATIO: {'met' if ratio >= $TARGET_RATIO else 'MISSED'})")
print(f"  shoal peak RSS while serving (VmHWM) = {peak_mib:.1f} MiB   (target <= $TARGET_RSS_MIB MiB: {'met' if peak_mib <= $TARGET_RSS_MIB else 'MISSED'})")
print(f"  shoal VmRSS before rounds {out['shoal_rss_mib_before']} MiB, after {out['shoal_rss_mib_after']} MiB, sampled max {out['shoal_rss_mib_sampled_max']} MiB, threads {out['shoal_threads']}")
print(f"  server CPU per GiB served: nginx {out['server_cpu_s_per_gib']['nginx']:.3f} s, shoal {out['server_cpu_s_per_gib']['shoal']:.3f} s")
print(f"  machine: nproc=$NPROC kernel=$KERNEL (shared machine: compare the ratio, not absolute figures)")
EOF
echo "json: $JSON"
cat "$JSON"
