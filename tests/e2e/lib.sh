# shellcheck shell=bash
# shellcheck disable=SC2034  # variables set here are read by the sourcing scripts
# Helpers for the Shoal end-to-end tests. Source it from a test script:
#
#   source "$(dirname "$0")/lib.sh"
#   e2e_init my_test            # temp dir $T, cleanup trap, counters
#   start_registry REG          # REG=127.0.0.1:PORT
#   push_image "$REG" library/img v1 --layers 3 --layer-size 1M    # sets PUSH_JSON, PUSH_DIGEST
#   start_shoal SHOAL "$T/shoal-data" "$REG"                      # SHOAL=127.0.0.1:PORT
#   run_case "skopeo pulls img" skopeo_verify_pull "$SHOAL" library/img v1 "$PUSH_JSON"
#   e2e_finish                  # prints "NAME: N passed, N failed, N skipped", exits 1 on failure
#
# Every process started through these helpers is recorded in $T/pids and killed (with its
# descendants) by the EXIT trap, mounts under $T are unmounted and $T is removed, whatever way
# the script ends (E2E_KEEP=1 keeps $T for debugging).
#
# Environment:
#   SHOAL_BIN       shoal binary (default: <repo>/target/debug/shoal)
#   SHOAL_IMAGEGEN  image generator (default: <repo>/target/debug/shoal-imagegen)
#   E2E_DIRECT=1    no shoal: "start_shoal" hands out the upstream registry's address, so the
#                   registry / token / client set-ups can be validated on their own; checks that
#                   only make sense against shoal are reported as SKIP.
#   E2E_KEEP=1      keep the temp dir
#   E2E_TMPBASE     where temp dirs go (default /tmp)
#   E2E_VERBOSE=1   more output
#   E2E_SKIP=REGEX  report cases whose description matches REGEX as SKIP without running them
#                   (for a known failure, e.g. E2E_SKIP='cached private content')
#
# Needs (Debian packages): docker-registry skopeo containerd podman docker.io python3-jwt
# python3-cryptography jq curl (+ coreutils, util-linux).

set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
E2E_ROOT=$(cd "$E2E_DIR/../.." && pwd)
SHOAL_BIN=${SHOAL_BIN:-$E2E_ROOT/target/debug/shoal}
SHOAL_IMAGEGEN=${SHOAL_IMAGEGEN:-$E2E_ROOT/target/debug/shoal-imagegen}
case $SHOAL_BIN in /*) ;; *) SHOAL_BIN=$PWD/$SHOAL_BIN ;; esac
case $SHOAL_IMAGEGEN in /*) ;; *) SHOAL_IMAGEGEN=$PWD/$SHOAL_IMAGEGEN ;; esac
# The token server needs python3-jwt / python3-cryptography from Debian: use the system python,
# not whatever python3 comes first on PATH (pyenv, venv).
E2E_PYTHON=${E2E_PYTHON:-/usr/bin/python3}
[[ -x $E2E_PYTHON ]] || E2E_PYTHON=python3
E2E_DIRECT=${E2E_DIRECT:-0}
E2E_TMPBASE=${E2E_TMPBASE:-/tmp}
# The Debian docker.io client matches its daemon; /usr/local/bin/docker may be newer.
if [[ -z ${DOCKER_CLI:-} ]]; then
    if [[ -x /usr/bin/docker ]]; then DOCKER_CLI=/usr/bin/docker; else DOCKER_CLI=docker; fi
fi
export LC_ALL=C

E2E_NAME=e2e
T=
E2E_PASSED=0
E2E_FAILED=0
E2E_SKIPPED=0

# ---------------------------------------------------------------------------------------------
# Output, counters, cases

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "$E2E_NAME" "$*" >&2; }
vlog() { if [[ ${E2E_VERBOSE:-0} == 1 ]]; then log "$@"; fi; }

pass() { E2E_PASSED=$((E2E_PASSED + 1)); printf 'PASS %s: %s\n' "$E2E_NAME" "$1"; }
fail() {
    E2E_FAILED=$((E2E_FAILED + 1))
    printf 'FAIL %s: %s%s\n' "$E2E_NAME" "$1" "${2:+ -- $2}"
}
skip() { E2E_SKIPPED=$((E2E_SKIPPED + 1)); printf 'SKIP %s: %s%s\n' "$E2E_NAME" "$1" "${2:+ -- $2}"; }

# die MSG: inside a case, fail it with MSG (also usable at top level: aborts the script).
die() {
    printf '%s\n' "$*" >"$T/.case-reason" 2>/dev/null || true
    printf '  error: %s\n' "$*" >&2
    exit 1
}

# skip_case MSG: inside a case, report it as SKIP with MSG.
skip_case() {
    printf '%s\n' "$*" >"$T/.case-reason"
    exit 77
}

# run_case DESCRIPTION CMD [ARGS...]: runs CMD in a subshell with errexit; PASS if it succeeds,
# SKIP if it calls skip_case, FAIL otherwise (with the reason given to die, if any).
# Processes started inside are still cleaned up (they are recorded in $T/pids); variables set
# inside are lost (use save_env / load_env). Sets CASE_RC (0 pass, 77 skip, else fail).
run_case() {
    local desc=$1 rc reason
    shift
    if [[ -n ${E2E_SKIP:-} && $desc =~ $E2E_SKIP ]]; then
        CASE_RC=77
        skip "$desc" "matches E2E_SKIP"
        return 0
    fi
    rm -f "$T/.case-reason"
    vlog "case: $desc"
    set +e
    ("$@")
    rc=$?
    set -e
    reason=$(cat "$T/.case-reason" 2>/dev/null || true)
    rm -f "$T/.case-reason"
    CASE_RC=$rc
    case $rc in
        0) pass "$desc" ;;
        77) skip "$desc" "$reason" ;;
        *) fail "$desc" "${reason:-exit status $rc}" ;;
    esac
    return 0
}

# need_shoal: inside a case, SKIP it when running in E2E_DIRECT mode.
need_shoal() {
    if [[ $E2E_DIRECT == 1 ]]; then skip_case "needs shoal (E2E_DIRECT=1: set-up validation only)"; fi
}

# save_env NAME VAR...: remember variables set inside a case for the script (see load_env).
save_env() {
    local name=$1 v
    shift
    : >"$T/env-$name"
    for v in "$@"; do printf '%s=%q\n' "$v" "${!v}" >>"$T/env-$name"; done
}

# load_env NAME: define the variables saved by save_env NAME; fails if there are none.
load_env() {
    [[ -f $T/env-$1 ]] || return 1
    # shellcheck disable=SC1090
    source "$T/env-$1"
}

# ---------------------------------------------------------------------------------------------
# Set-up / clean-up

e2e_init() {
    E2E_NAME=$1
    mkdir -p "$E2E_TMPBASE"
    T=$(mktemp -d "$E2E_TMPBASE/shoal-e2e-$E2E_NAME.XXXXXX")
    : >"$T/pids"
    trap e2e_cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM
    trap 'log "hangup"; exit 129' HUP
    export DOCKER_CONFIG=$T/docker-client-config
    mkdir -p "$DOCKER_CONFIG"
    log "temp dir $T (shoal: $SHOAL_BIN${E2E_DIRECT:+, direct=$E2E_DIRECT})"
}

# short_tmpdir: a new short-named temp dir (/tmp/se2e.XXXXXX) removed at clean-up, for tools that
# limit path lengths.
short_tmpdir() {
    local d
    d=$(mktemp -d /tmp/se2e.XXXXXX)
    printf '%s\n' "$d" >>"$T/extra-dirs"
    echo "$d"
}

# register_pid PID NAME: kill PID (and its descendants) at clean-up.
register_pid() { printf '%s %s\n' "$1" "$2" >>"$T/pids"; }

# descendants PID: PID's children, grandchildren, ... (one per line).
descendants() {
    local p c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
    :
}

# stop_tree PID [TIMEOUT=15] [SIGNAL=TERM]: signal PID and all its descendants, wait for them
# to exit, SIGKILL what is left after TIMEOUT seconds.
stop_tree() {
    local pid=$1 timeout=${2:-15} sig=${3:-TERM} pids deadline p alive
    kill -0 "$pid" 2>/dev/null || return 0
    pids="$pid $(descendants "$pid" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -"$sig" $pids 2>/dev/null || true
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        alive=
        for p in $pids; do
            if kill -0 "$p" 2>/dev/null && [[ $(ps -o stat= -p "$p" 2>/dev/null) != Z* ]]; then alive=1; fi
        done
        [[ -z $alive ]] && break
        sleep 0.2
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    wait "$pid" 2>/dev/null || true
}

# unmount_under DIR: lazily unmount every mount point below DIR (deepest first).
unmount_under() {
    local dir=$1 m
    [[ -n $dir ]] || return 0
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo 2>/dev/null |
        sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || umount -f "$m" 2>/dev/null || true
    done
}

e2e_cleanup() {
    local rc=$? pid name d
    trap - EXIT
    # finish cleaning up even if interrupted again (every wait below is bounded)
    trap '' INT TERM HUP
    set +e
    if [[ -n $T && -d $T ]]; then
        if [[ -s $T/pids ]]; then
            # newest first: clients before shoal before registries
            tac "$T/pids" | while read -r pid name; do
                vlog "stopping $name ($pid)"
                stop_tree "$pid" 20
            done
        fi
        # Stragglers: client commands cut short by the signal (podman, ctr, skopeo, curl) are not
        # registered, but every one of them names a path under this run's unique temp dirs.
        local paths=("$T") p
        if [[ -f $T/extra-dirs ]]; then mapfile -t -O 1 paths <"$T/extra-dirs"; fi
        for d in "${paths[@]}"; do
            for p in $(pgrep -f -- "$d" 2>/dev/null); do
                [[ $p == "$$" || $p == "$BASHPID" ]] && continue
                vlog "stopping straggler $p: $(ps -o args= -p "$p" 2>/dev/null | cut -c1-120)"
                stop_tree "$p" 10
            done
        done
        unmount_under "$T"
        if [[ -f $T/extra-dirs ]]; then
            while read -r d; do
                unmount_under "$d"
                [[ ${E2E_KEEP:-0} == 1 ]] || rm -rf "$d"
            done <"$T/extra-dirs"
        fi
        if [[ ${E2E_KEEP:-0} == 1 ]]; then
            log "keeping $T"
        else
            rm -rf "$T" 2>/dev/null || { sleep 1; unmount_under "$T"; rm -rf "$T"; }
        fi
    fi
    exit "$rc"
}

# e2e_finish: print the summary line and exit (1 if anything failed).
e2e_finish() {
    printf '%s: %d passed, %d failed, %d skipped\n' "$E2E_NAME" "$E2E_PASSED" "$E2E_FAILED" "$E2E_SKIPPED"
    if ((E2E_FAILED > 0)); then exit 1; fi
    exit 0
}

# ---------------------------------------------------------------------------------------------
# Small utilities

# free_port: print a currently unused TCP port on 127.0.0.1.
free_port() {
    "$E2E_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_until TIMEOUT CMD...: run CMD every 0.2 s until it succeeds; fail after TIMEOUT seconds.
wait_until() {
    local timeout=$1 deadline
    shift
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then return 1; fi
        sleep 0.2
    done
}

# http_code URL [CURL ARGS...]: print the HTTP status (000 if no answer).
http_code() {
    local url=$1
    shift
    curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@" "$url" || true
}

http_is() { [[ $(http_code "$2" "${@:3}") == "$1" ]]; }

# sha256_of FILE: print "sha256:<hex>".
sha256_of() { printf 'sha256:%s\n' "$(sha256sum "$1" | cut -d' ' -f1)"; }

# pid_alive PID
pid_alive() { kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]; }

# show_log FILE [LINES]: print the tail of a log to stderr (for failure diagnostics).
show_log() {
    local f=$1 n=${2:-30}
    [[ -f $f ]] || return 0
    printf '  --- last %s lines of %s ---\n' "$n" "$f" >&2
    tail -n "$n" "$f" | sed 's/^/  | /' >&2
}

# have CMD...: all commands exist.
have() {
    local c
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || return 1; done
}

# jget FILE FILTER: jq -r FILTER FILE
jget() { jq -r "$2" "$1"; }

# ---------------------------------------------------------------------------------------------
# Upstream registry (CNCF distribution, Debian's docker-registry)

# start_registry VAR [--token USER:PASS ...] [--anonymous-pull GLOB ...]
# Starts a registry with filesystem storage in $T and deletes enabled, on a free 127.0.0.1 port,
# and sets VAR=127.0.0.1:PORT, VAR_PID, VAR_DIR (config, data, log). With --token it first starts
# token_server.py (sets VAR_TOKEN_PID, VAR_REALM) and configures `auth.token` against it:
# the given users get every action, anonymous clients only pull on --anonymous-pull globs.
start_registry() {
    local var=$1 users=() anon=() dir port tport pid tpid realm=
    shift
    while (($#)); do
        case $1 in
            --token) users+=(--user "$2"); shift 2 ;;
            --anonymous-pull) anon+=(--anonymous-pull "$2"); shift 2 ;;
            *) die "start_registry: unknown option $1" ;;
        esac
    done
    have docker-registry || die "docker-registry not installed (apt-get install docker-registry)"
    dir=$T/registry-$var
    mkdir -p "$dir/data"
    if ((${#users[@]})); then
        "$E2E_PYTHON" "$E2E_DIR/token_server.py" --cert-out "$dir/token-cert.pem" \
            --port-file "$dir/token-port" --service shoal-test-registry --issuer shoal-test-issuer \
            "${users[@]}" ${anon[@]+"${anon[@]}"} --verbose >"$dir/token-server.log" 2>&1 &
        tpid=$!
        register_pid "$tpid" "token-server-$var"
        wait_until 20 test -s "$dir/token-port" || { show_log "$dir/token-server.log"; die "token server did not start"; }
        tport=$(cat "$dir/token-port")
        wait_until 10 http_is 200 "http://127.0.0.1:$tport/" || die "token server not answering"
        realm=http://127.0.0.1:$tport/token
        printf -v "${var}_TOKEN_PID" '%s' "$tpid"
        printf -v "${var}_REALM" '%s' "$realm"
    fi
    port=$(free_port)
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$port
  secret: shoal-e2e-$RANDOM$RANDOM
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    if [[ -n $realm ]]; then
        cat >>"$dir/config.yml" <<EOF
auth:
  token:
    realm: $realm
    service: shoal-test-registry
    issuer: shoal-test-issuer
    rootcertbundle: $dir/token-cert.pem
EOF
    fi
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    pid=$!
    register_pid "$pid" "registry-$var"
    local want=200
    if [[ -n $realm ]]; then want=401; fi
    if ! wait_until 20 http_is "$want" "http://127.0.0.1:$port/v2/"; then
        show_log "$dir/registry.log"
        die "registry $var did not come up on 127.0.0.1:$port"
    fi
    printf -v "$var" '%s' "127.0.0.1:$port"
    printf -v "${var}_PID" '%s' "$pid"
    printf -v "${var}_DIR" '%s' "$dir"
    log "registry $var on 127.0.0.1:$port${realm:+ (token auth, realm $realm)}"
}

# stop_registry VAR: stop the registry (and its token server). Its data stays in VAR_DIR.
stop_registry() {
    local pidvar=${1}_PID tvar=${1}_TOKEN_PID
    stop_tree "${!pidvar}" 10
    if [[ -n ${!tvar:-} ]]; then stop_tree "${!tvar}" 5; fi
}

# start_throttle VAR TARGET RATE: rate-limited TCP proxy in front of TARGET (HOST:PORT);
# sets VAR=127.0.0.1:PORT, VAR_PID.
start_throttle() {
    local var=$1 target=$2 rate=$3 dir=$T/throttle-$1 pid
    mkdir -p "$dir"
    "$E2E_PYTHON" "$E2E_DIR/throttle_proxy.py" --target "$target" --rate "$rate" \
        --port-file "$dir/port" >"$dir/log" 2>&1 &
    pid=$!
    register_pid "$pid" "throttle-$var"
    wait_until 10 test -s "$dir/port" || { show_log "$dir/log"; die "throttle proxy did not start"; }
    printf -v "$var" '127.0.0.1:%s' "$(cat "$dir/port")"
    printf -v "${var}_PID" '%s' "$pid"
}

# ---------------------------------------------------------------------------------------------
# Test images

# gen_image NAME [IMAGEGEN ARGS...]: generate an image into $T/images/NAME; sets GEN_JSON (path
# of imagegen's JSON line), GEN_DIR and GEN_SRC (skopeo source reference).
gen_image() {
    local name=$1 dir layout=oci
    shift
    [[ -x $SHOAL_IMAGEGEN ]] || die "shoal-imagegen not found at $SHOAL_IMAGEGEN (cargo build -p shoal-tools)"
    dir=$T/images/$name
    # skopeo 1.9's oci: transport rejects Docker media types, its dir: transport takes them.
    if [[ " $* " == *" --format docker "* ]]; then layout=dir; fi
    mkdir -p "$T/images"
    "$SHOAL_IMAGEGEN" --out "$dir" --tag "$name" --layout "$layout" "$@" >"$dir.json" ||
        die "shoal-imagegen failed for $name"
    GEN_JSON=$dir.json
    GEN_DIR=$dir
    if [[ $layout == dir ]]; then GEN_SRC=dir:$dir; else GEN_SRC=oci:$dir:$name; fi
}

# push_image REGISTRY REPO TAG [IMAGEGEN ARGS...]: generate an image (seed etc. from the args)
# and push it with skopeo (with --all for an index). PUSH_CREDS=user:pass authenticates.
# Sets PUSH_JSON (imagegen's JSON: manifest_digest, media_type, blobs, manifests[]) and
# PUSH_DIGEST (top-level manifest digest). Verifies the registry serves that exact digest.
push_image() {
    local reg=$1 repo=$2 tag=$3 name all=() creds=() got
    shift 3
    name=$(printf '%s-%s' "${repo//\//_}" "$tag")
    name="$name-$RANDOM"
    gen_image "$name" "$@"
    if [[ $(jget "$GEN_JSON" .media_type) == *index* || $(jget "$GEN_JSON" .media_type) == *list* ]]; then
        all=(--all)
    fi
    if [[ -n ${PUSH_CREDS:-} ]]; then creds=(--dest-creds "$PUSH_CREDS"); fi
    timeout 300 skopeo copy --quiet ${all[@]+"${all[@]}"} --dest-tls-verify=false ${creds[@]+"${creds[@]}"} \
        "$GEN_SRC" "docker://$reg/$repo:$tag" >"$T/images/$name.push.log" 2>&1 ||
        { show_log "$T/images/$name.push.log"; die "skopeo push of $repo:$tag to $reg failed"; }
    PUSH_JSON=$GEN_JSON
    PUSH_DIGEST=$(jget "$GEN_JSON" .manifest_digest)
    creds=()
    if [[ -n ${PUSH_CREDS:-} ]]; then creds=(--creds "$PUSH_CREDS"); fi
    got=$(timeout 60 skopeo inspect --raw --tls-verify=false ${creds[@]+"${creds[@]}"} \
        "docker://$reg/$repo:$tag" | sha256sum | cut -d' ' -f1)
    [[ sha256:$got == "$PUSH_DIGEST" ]] || die "registry serves $repo:$tag as sha256:$got, pushed $PUSH_DIGEST"
    log "pushed $reg/$repo:$tag = $PUSH_DIGEST ($(jget "$GEN_JSON" .media_type), $(jget "$GEN_JSON" .total_bytes) bytes)"
}

# image_platform_manifest JSON [PLATFORM=linux/amd64]: digest of that platform's image manifest.
image_platform_manifest() {
    jq -r --arg p "${2:-linux/amd64}" '.manifests[] | select(.platform == $p) | .digest' "$1"
}

# image_platform_blobs JSON [PLATFORM=linux/amd64]: config + layer digests of that platform.
image_platform_blobs() {
    jq -r --arg p "${2:-linux/amd64}" '.manifests[] | select(.platform == $p) | .config, .layers[]' "$1"
}

# image_diff_ids JSON [PLATFORM=linux/amd64]: the config's rootfs.diff_ids, comma-joined.
image_diff_ids() {
    jq -r --arg p "${2:-linux/amd64}" '.manifests[] | select(.platform == $p) | .diff_ids | join(",")' "$1"
}

# image_all_digests JSON: every blob digest (layers, configs, child manifests).
image_all_digests() { jq -r '.blobs[].digest' "$1"; }

image_is_index() { [[ $(jget "$1" .media_type) == *index* || $(jget "$1" .media_type) == *list* ]]; }

# ---------------------------------------------------------------------------------------------
# shoal

# start_shoal VAR DATA_DIR UPSTREAM [EXTRA ARGS...]: start shoal listening on a free port,
# with --upstream http://UPSTREAM and --registry docker.io=http://UPSTREAM, wait for
# GET /v2/ = 200 and set VAR=127.0.0.1:PORT, VAR_PID, VAR_LOG. Reuses the port of a previous
# start of the same VAR (restart on the same address). In E2E_DIRECT mode: VAR=UPSTREAM.
start_shoal() {
    local var=$1 data=$2 up=$3 port portvar=${1}_PORT
    shift 3
    if [[ $E2E_DIRECT == 1 ]]; then
        printf -v "$var" '%s' "$up"
        printf -v "${var}_PID" '%s' ""
        return 0
    fi
    port=${!portvar:-}
    [[ -n $port ]] || port=$(free_port)
    mkdir -p "$data"
    start_shoal_raw "$var" "$port" -- --listen "127.0.0.1:$port" --data-dir "$data" \
        --upstream "http://$up" --registry "docker.io=http://$up" "$@"
}

# start_shoal_raw VAR PORT [NAME=VALUE...] -- [RUN ARGS...]: start `shoal run RUN ARGS` with the
# given extra environment, expect it on 127.0.0.1:PORT; sets VAR, VAR_PORT, VAR_PID, VAR_LOG.
start_shoal_raw() {
    local var=$1 port=$2 envs=() pid logf n
    shift 2
    while (($#)) && [[ $1 != -- ]]; do envs+=("$1"); shift; done
    [[ ${1:-} == -- ]] && shift
    [[ -x $SHOAL_BIN ]] || die "shoal binary not found at $SHOAL_BIN (cargo build -p shoal-node)"
    n=$(find "$T" -maxdepth 1 -name "shoal-$var.*.log" | wc -l)
    logf=$T/shoal-$var.$n.log
    env RUST_LOG="${RUST_LOG:-info}" ${envs[@]+"${envs[@]}"} "$SHOAL_BIN" run "$@" >"$logf" 2>&1 &
    pid=$!
    register_pid "$pid" "shoal-$var"
    local deadline=$((SECONDS + 60))
    until http_is 200 "http://127.0.0.1:$port/v2/"; do
        if ! pid_alive "$pid"; then
            show_log "$logf"
            die "shoal exited during start-up (${envs[*]:+env ${envs[*]} }shoal run $*)"
        fi
        if ((SECONDS >= deadline)); then
            show_log "$logf"
            die "shoal did not answer GET http://127.0.0.1:$port/v2/ with 200 within 60 s (${envs[*]:+env ${envs[*]} }shoal run $*)"
        fi
        sleep 0.2
    done
    printf -v "$var" '127.0.0.1:%s' "$port"
    printf -v "${var}_PORT" '%s' "$port"
    printf -v "${var}_PID" '%s' "$pid"
    printf -v "${var}_LOG" '%s' "$logf"
    log "shoal $var on 127.0.0.1:$port (pid $pid: ${envs[*]:+${envs[*]} }shoal run $*)"
}

# stop_shoal VAR [SIGNAL=TERM]
stop_shoal() {
    local pidvar=${1}_PID
    [[ -n ${!pidvar:-} ]] || return 0
    if [[ ${2:-TERM} == KILL ]]; then
        kill -KILL "${!pidvar}" 2>/dev/null || true
        wait "${!pidvar}" 2>/dev/null || true
    else
        stop_tree "${!pidvar}" 20 "${2:-TERM}"
    fi
}

# ---------------------------------------------------------------------------------------------
# Clients. Each verifier dies with a precise message on a mismatch.

# skopeo_verify_pull SRC REPO TAG JSON [--all] [--by-digest]: copy SRC/REPO:TAG (or @digest) to a
# dir: layout and check the top-level digest (skopeo inspect --raw), the copied manifest digest
# and every copied blob's sha256 against what imagegen generated.
skopeo_verify_pull() {
    local src=$1 repo=$2 tag=$3 json=$4 copy_all=0 bydigest=0 ref out got want f expected name
    shift 4
    while (($#)); do
        case $1 in --all) copy_all=1 ;; --by-digest) bydigest=1 ;; esac
        shift
    done
    want=$(jget "$json" .manifest_digest)
    ref=$repo:$tag
    if [[ $bydigest == 1 ]]; then ref=$repo@$want; fi
    got=sha256:$(timeout 60 skopeo inspect --raw --tls-verify=false "docker://$src/$ref" | sha256sum | cut -d' ' -f1) ||
        die "skopeo inspect --raw docker://$src/$ref failed"
    [[ $got == "$want" ]] || die "skopeo inspect: $src/$ref has digest $got, pushed $want"
    out=$(mktemp -d "$T/skopeo-dir.XXXXXX")
    if [[ $copy_all == 1 ]]; then
        timeout 300 skopeo copy --quiet --all --src-tls-verify=false "docker://$src/$ref" "dir:$out" >"$out.log" 2>&1 ||
            { show_log "$out.log"; die "skopeo copy --all docker://$src/$ref failed"; }
        expected=$(image_all_digests "$json" | sort)
        [[ $(sha256_of "$out/manifest.json") == "$want" ]] || die "copied manifest.json digest $(sha256_of "$out/manifest.json") != $want"
    else
        timeout 300 skopeo copy --quiet --src-tls-verify=false "docker://$src/$ref" "dir:$out" >"$out.log" 2>&1 ||
            { show_log "$out.log"; die "skopeo copy docker://$src/$ref failed"; }
        expected=$(image_platform_blobs "$json" linux/amd64 | sort)
        local mwant
        mwant=$(image_platform_manifest "$json" linux/amd64)
        [[ $(sha256_of "$out/manifest.json") == "$mwant" ]] ||
            die "copied manifest.json digest $(sha256_of "$out/manifest.json") != linux/amd64 manifest $mwant"
    fi
    local seen=()
    for f in "$out"/*; do
        name=$(basename "$f")
        case $name in manifest.json | version | signature-*) continue ;; esac
        got=$(sha256_of "$f")
        [[ sha256:${name%.manifest.json} == "$got" ]] || die "blob $name from $src/$ref hashes to $got"
        seen+=("sha256:${name%.manifest.json}")
    done
    [[ $(printf '%s\n' "${seen[@]}" | sort) == "$expected" ]] ||
        die "blob set differs: got [$(printf '%s ' "${seen[@]}")] want [${expected//$'\n'/ }]"
    rm -rf "$out" "$out.log"
}

# --- containerd / ctr --------------------------------------------------------------------------

# start_containerd [NAME=containerd]: a private containerd (root, state, sockets, config under
# $T/NAME).
# Sets (and save_env's as "containerd") CTD_SOCK, CTD_SNAPSHOTTER (overlayfs if it works here,
# else native), CTD_DIR. skip_case (SKIP) if containerd cannot run here.
# The socket path must stay under ~100 characters (unix socket limit): $T is short enough.
start_containerd() {
    local name=${1:-containerd} d pid
    d=$T/$name
    have containerd ctr || skip_case "containerd/ctr not installed (apt-get install containerd)"
    mkdir -p "$d/root" "$d/state"
    cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.ttrpc.sock"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""
EOF
    containerd --config "$d/config.toml" >"$d/containerd.log" 2>&1 &
    pid=$!
    register_pid "$pid" "$name"
    if ! wait_until 30 ctr --address "$d/containerd.sock" version; then
        show_log "$d/containerd.log"
        skip_case "private containerd did not start: $(grep -m1 -iE 'level=(fatal|error)' "$d/containerd.log" || echo 'see log')"
    fi
    CTD_SOCK=$d/containerd.sock
    CTD_DIR=$d
    if ctr --address "$CTD_SOCK" plugins ls 2>/dev/null | grep -qE 'snapshotter.v1 +overlayfs .* ok'; then
        CTD_SNAPSHOTTER=overlayfs
    else
        CTD_SNAPSHOTTER=native
    fi
    save_env "$name" CTD_SOCK CTD_DIR CTD_SNAPSHOTTER
    log "containerd on $CTD_SOCK (snapshotter $CTD_SNAPSHOTTER)"
}

# ctr_hosts_dir MIRROR: write a hosts dir making MIRROR (HOST:PORT, plain http) the pull/resolve
# host for docker.io; ctr then asks it for /v2/<repo>/...?ns=docker.io. Prints the dir.
ctr_hosts_dir() {
    local d=$CTD_DIR/hosts-${1//[:.]/_}
    mkdir -p "$d/docker.io"
    cat >"$d/docker.io/hosts.toml" <<EOF
server = "https://registry-1.docker.io"

[host."http://$1"]
  capabilities = ["pull", "resolve"]
EOF
    echo "$d"
}

# ctr_pull MIRROR IMAGE [CTR PULL ARGS...]: pull docker.io/IMAGE (e.g. library/img:v1) via MIRROR.
ctr_pull() {
    local mirror=$1 image=$2 hosts logf
    shift 2
    hosts=$(ctr_hosts_dir "$mirror")
    logf=$(mktemp "$T/ctr-pull.XXXXXX")
    if ! timeout 300 ctr --address "$CTD_SOCK" images pull --snapshotter "$CTD_SNAPSHOTTER" \
        --hosts-dir "$hosts" "$@" "docker.io/$image" >"$logf" 2>&1; then
        show_log "$logf" 15
        die "ctr images pull docker.io/$image via $mirror failed"
    fi
}

# ctr_image_digest IMAGE: digest containerd recorded for docker.io/IMAGE.
ctr_image_digest() {
    ctr --address "$CTD_SOCK" images ls | awk -v r="docker.io/$1" '$1 == r { print $3 }'
}

# ctr_verify MIRROR IMAGE JSON [CTR PULL ARGS...]: pull and check the image digest and that every
# expected blob (all platforms with --all-platforms, else linux/amd64) is in the content store.
ctr_verify() {
    local mirror=$1 image=$2 json=$3 got want d expected content
    shift 3
    ctr_pull "$mirror" "$image" "$@"
    want=$(jget "$json" .manifest_digest)
    got=$(ctr_image_digest "$image")
    [[ $got == "$want" ]] || die "ctr recorded docker.io/$image as '$got', pushed $want"
    if [[ " $* " == *" --all-platforms "* ]]; then
        expected=$(image_all_digests "$json")
    else
        expected=$(image_platform_blobs "$json" linux/amd64)
        if image_is_index "$json"; then expected+=$'\n'$(image_platform_manifest "$json" linux/amd64); fi
    fi
    content=$(ctr --address "$CTD_SOCK" content ls -q)
    for d in $expected $want; do
        grep -qx "$d" <<<"$content" || die "containerd content store lacks $d after pulling $image"
    done
    # containerd verified each blob's digest while ingesting; re-hash them once more from disk.
    for d in $expected; do
        local f=$CTD_DIR/root/io.containerd.content.v1.content/blobs/sha256/${d#sha256:}
        [[ $(sha256_of "$f") == "$d" ]] || die "containerd blob $d on disk hashes to $(sha256_of "$f")"
    done
}

# --- podman --------------------------------------------------------------------------------------

# podman_setup MIRROR: private podman storage (vfs) and a registries.conf mirroring docker.io to
# MIRROR (insecure http); sets (and save_env's as "podman") PODMAN_DIR; use podman through `pm`.
podman_setup() {
    local d=$T/podman-${1//[:.]/_}
    have podman || skip_case "podman not installed (apt-get install podman)"
    mkdir -p "$d/root" "$d/tmp"
    # podman refuses a runroot longer than 50 characters: keep it short, outside $T.
    local run
    run=$(short_tmpdir)
    cat >"$d/registries.conf" <<EOF
unqualified-search-registries = ["docker.io"]
short-name-mode = "disabled"

[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "$1"
insecure = true
EOF
    cat >"$d/storage.conf" <<EOF
[storage]
driver = "vfs"
runroot = "$run"
graphroot = "$d/root"
EOF
    cat >"$d/containers.conf" <<EOF
[engine]
events_logger = "file"
events_logfile_path = "$d/events.log"
cgroup_manager = "cgroupfs"
EOF
    echo '{}' >"$d/auth.json"
    PODMAN_DIR=$d
    PODMAN_RUNROOT=$run
    if ! pm info >"$d/info.log" 2>&1; then
        show_log "$d/info.log"
        skip_case "podman info fails here: $(grep -m1 -i error "$d/info.log" || tail -n1 "$d/info.log")"
    fi
    save_env podman PODMAN_DIR PODMAN_RUNROOT
}

# pm ARGS...: podman with the private storage / registries of podman_setup.
pm() {
    env CONTAINERS_REGISTRIES_CONF="$PODMAN_DIR/registries.conf" \
        CONTAINERS_STORAGE_CONF="$PODMAN_DIR/storage.conf" \
        CONTAINERS_CONF="$PODMAN_DIR/containers.conf" \
        REGISTRY_AUTH_FILE="$PODMAN_DIR/auth.json" \
        TMPDIR="$PODMAN_DIR/tmp" \
        ${PM_TIMEOUT:+timeout "$PM_TIMEOUT"} \
        podman --root "$PODMAN_DIR/root" --runroot "$PODMAN_RUNROOT" --storage-driver vfs "$@"
}

# podman_verify IMAGE JSON: pull docker.io/IMAGE through the mirror; check the manifest digest
# podman recorded and the layers' diff_ids (linux/amd64).
podman_verify() {
    local image=$1 json=$2 want got layers logf
    logf=$(mktemp "$T/podman-pull.XXXXXX")
    PM_TIMEOUT=300 pm pull --arch amd64 --os linux "docker.io/$image" >"$logf" 2>&1 ||
        { show_log "$logf" 15; die "podman pull docker.io/$image failed"; }
    want=$(jget "$json" .manifest_digest)
    pm image inspect "docker.io/$image" >"$logf.inspect" || die "podman image inspect docker.io/$image failed"
    got=$(jq -r '.[0].Digest' "$logf.inspect")
    local repodigests
    repodigests=$(jq -r '.[0].RepoDigests | join(" ")' "$logf.inspect")
    [[ " $repodigests " == *"@$want "* ]] || die "podman RepoDigests of $image are [$repodigests] (.Digest $got), pushed $want"
    if ! image_is_index "$json"; then
        [[ $got == "$want" ]] || die "podman .Digest of $image is $got, pushed $want"
    fi
    layers=$(jq -r '.[0].RootFS.Layers | join(",")' "$logf.inspect")
    [[ $layers == "$(image_diff_ids "$json" linux/amd64)" ]] ||
        die "podman diff_ids of $image [$layers] != generated [$(image_diff_ids "$json" linux/amd64)]"
}

# --- dockerd -------------------------------------------------------------------------------------

# start_dockerd MIRROR: a private dockerd (data/exec root, socket, pidfile in $T; no bridge, no
# iptables) with --registry-mirror http://MIRROR. Tries the default storage driver (overlay2),
# then vfs. Sets (and save_env's as "dockerd") DOCKER_SOCK, DOCKERD_DRIVER. skip_case (SKIP) if
# dockerd cannot run here.
start_dockerd() {
    local mirror=$1 d=$T/dockerd driver pid why=
    have dockerd "$DOCKER_CLI" || skip_case "dockerd/docker not installed (apt-get install docker.io)"
    for driver in "" vfs; do
        rm -rf "$d"
        mkdir -p "$d/data" "$d/exec"
        echo '{}' >"$d/daemon.json"
        dockerd --data-root "$d/data" --exec-root "$d/exec" --host "unix://$d/docker.sock" \
            --pidfile "$d/docker.pid" --config-file "$d/daemon.json" --bridge=none --iptables=false \
            --ip6tables=false --ip-masq=false --userland-proxy=false \
            --registry-mirror "http://$mirror" ${driver:+--storage-driver "$driver"} \
            >"$d/dockerd.log" 2>&1 &
        pid=$!
        register_pid "$pid" dockerd
        if wait_until 45 "$DOCKER_CLI" -H "unix://$d/docker.sock" info; then
            DOCKER_SOCK=$d/docker.sock
            DOCKERD_DRIVER=$("$DOCKER_CLI" -H "unix://$DOCKER_SOCK" info --format '{{.Driver}}')
            save_env dockerd DOCKER_SOCK DOCKERD_DRIVER
            log "dockerd on $DOCKER_SOCK (storage driver $DOCKERD_DRIVER, mirror http://$mirror)"
            return 0
        fi
        why=$(grep -m1 -iE 'level=(fatal|error)|failed to start' "$d/dockerd.log" || tail -n1 "$d/dockerd.log")
        show_log "$d/dockerd.log" 15
        stop_tree "$pid" 20
        unmount_under "$d"
    done
    skip_case "private dockerd did not start (overlay2 nor vfs): $why"
}

# dk ARGS...: the docker client against the private dockerd.
dk() { "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" "$@"; }

# docker_verify NAME:TAG JSON: `docker pull NAME:TAG` (Docker Hub "library/NAME" via the mirror);
# check RepoDigests holds the pushed digest and the layers' diff_ids (linux/amd64).
docker_verify() {
    local image=$1 json=$2 want repodigests layers logf
    logf=$(mktemp "$T/docker-pull.XXXXXX")
    timeout 300 "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" pull "$image" >"$logf" 2>&1 ||
        { show_log "$logf" 15; die "docker pull $image failed"; }
    want=$(jget "$json" .manifest_digest)
    grep -q "Digest: $want" "$logf" || die "docker pull $image printed $(grep -m1 Digest: "$logf" || echo 'no digest'), pushed $want"
    repodigests=$(dk image inspect --format '{{join .RepoDigests " "}}' "$image")
    [[ " $repodigests " == *"@$want "* ]] || die "docker RepoDigests of $image are [$repodigests], pushed $want"
    layers=$(dk image inspect --format '{{join .RootFS.Layers ","}}' "$image")
    [[ $layers == "$(image_diff_ids "$json" linux/amd64)" ]] ||
        die "docker diff_ids of $image [$layers] != generated [$(image_diff_ids "$json" linux/amd64)]"
}

# metric_value ADDR NAME [LABEL_SUBSTRING]: sum of the samples of metric NAME (exact name, any
# labels containing LABEL_SUBSTRING) from http://ADDR/metrics; dies if /metrics does not answer.
metric_value() {
    local addr=$1 name=$2 label=${3:-} f
    f=$(mktemp "$T/metrics.XXXXXX")
    [[ $(curl -sS -o "$f" -w '%{http_code}' --max-time 10 "http://$addr/metrics" || true) == 200 ]] ||
        die "GET http://$addr/metrics failed"
    awk -v n="$name" -v l="$label" '
        $1 == n || index($1, n "{") == 1 { if (l == "" || index($1, l) > 0) sum += $NF }
        END { printf "%d\n", sum }' "$f"
    rm -f "$f"
}

# ---------------------------------------------------------------------------------------------
# Raw HTTP helpers against shoal

# fetch_verify BASE_URL REPO DIGEST [CURL ARGS...]: GET /v2/REPO/blobs/DIGEST; require 200 and
# a body hashing to DIGEST.
fetch_verify_blob() {
    local base=$1 repo=$2 digest=$3 f code
    shift 3
    f=$(mktemp "$T/blob.XXXXXX")
    code=$(curl -sS -L -o "$f" -w '%{http_code}' --max-time 300 "$@" "$base/v2/$repo/blobs/$digest" || echo 000)
    [[ $code == 200 ]] || { rm -f "$f"; die "GET $base/v2/$repo/blobs/$digest -> HTTP $code"; }
    [[ $(sha256_of "$f") == "$digest" ]] || { local g; g=$(sha256_of "$f"); rm -f "$f"; die "GET blob $digest returned content hashing to $g"; }
    rm -f "$f"
}

# fetch_manifest_digest BASE_URL REPO REF [CURL ARGS...]: print sha256 of GET /v2/REPO/manifests/REF
# (all manifest media types accepted); dies unless HTTP 200.
fetch_manifest_digest() {
    local base=$1 repo=$2 ref=$3 f code
    shift 3
    f=$(mktemp "$T/manifest.XXXXXX")
    code=$(curl -sS -o "$f" -w '%{http_code}' --max-time 60 \
        -H 'Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json' \
        "$@" "$base/v2/$repo/manifests/$ref" || echo 000)
    [[ $code == 200 ]] || { rm -f "$f"; die "GET $base/v2/$repo/manifests/$ref -> HTTP $code"; }
    sha256_of "$f"
    rm -f "$f"
}

# ---------------------------------------------------------------------------------------------
# Swarm (peer-to-peer) helpers

# p2p_supported: the shoal binary has the peer-to-peer flags (`shoal run --help` lists
# --p2p-listen).
p2p_supported() { "$SHOAL_BIN" run --help 2>/dev/null | grep -q -- '--p2p-listen'; }

# free_ports N: print N distinct 127.0.0.1 ports (one a line), each free for TCP and UDP alike
# (a node's --p2p-listen port carries the DHT on TCP and QUIC on UDP).
free_ports() {
    "$E2E_PYTHON" - "$1" <<'PY'
import socket, sys
n, held, out = int(sys.argv[1]), [], []
for _ in range(1000):
    if len(out) == n:
        break
    t = socket.socket()
    t.bind(("127.0.0.1", 0))
    p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); u.close(); continue
    held += [t, u]
    out.append(p)
print("\n".join(map(str, out)))
PY
}

# start_counting_proxy VAR TARGET [PROXY ARGS...]: counting_proxy.py in front of TARGET
# (HOST:PORT). Sets VAR=127.0.0.1:PORT, VAR_PID, VAR_STATS (its stats JSON, rewritten every
# 200 ms), VAR_LOG (one line per blob/manifest request).
start_counting_proxy() {
    local var=$1 target=$2 dir=$T/cproxy-$1 pid
    shift 2
    mkdir -p "$dir"
    rm -f "$dir/port"
    "$E2E_PYTHON" "$E2E_DIR/counting_proxy.py" --target "$target" --port-file "$dir/port" \
        --stats "$dir/stats.json" "$@" >>"$dir/log" 2>&1 &
    pid=$!
    register_pid "$pid" "cproxy-$var"
    wait_until 10 test -s "$dir/port" || { show_log "$dir/log"; die "counting proxy $var did not start"; }
    printf -v "$var" '127.0.0.1:%s' "$(cat "$dir/port")"
    printf -v "${var}_PID" '%s' "$pid"
    printf -v "${var}_STATS" '%s' "$dir/stats.json"
    printf -v "${var}_LOG" '%s' "$dir/log"
    log "counting proxy $var on 127.0.0.1:$(cat "$dir/port") -> $target"
}

# proxy_stat VAR [JQ FILTER=.]: jq -r FILTER over proxy VAR's current counters (asks a live proxy
# for a fresh write with SIGUSR1 and waits for it; a stopped proxy's last write is used).
proxy_stat() {
    local var=$1 filter=${2:-.} pidvar=${1}_PID statsvar=${1}_STATS seq
    local f=${!statsvar}
    if pid_alive "${!pidvar}"; then
        seq=$(jq -r .seq "$f" 2>/dev/null || echo 0)
        kill -USR1 "${!pidvar}" 2>/dev/null || true
        local i
        for i in $(seq 50); do
            (($(jq -r .seq "$f" 2>/dev/null || echo 0) > seq)) && break
            sleep 0.05
        done
    fi
    jq -r "$filter" "$f"
}

# start_swarm_node VAR DATA_DIR UPSTREAM P2P_PORT [RUN ARGS...]: start_shoal with
# --p2p-listen 127.0.0.1:P2P_PORT; also sets VAR_P2P=127.0.0.1:P2P_PORT.
start_swarm_node() {
    local var=$1 data=$2 up=$3 p2p=$4
    shift 4
    start_shoal "$var" "$data" "$up" --p2p-listen "127.0.0.1:$p2p" "$@"
    printf -v "${var}_P2P" '127.0.0.1:%s' "$p2p"
}

# shoal_pulls ADDR: print GET http://ADDR/_shoal/pulls (JSON); dies unless HTTP 200.
shoal_pulls() {
    local f code
    f=$(mktemp "$T/pulls.XXXXXX")
    code=$(curl -sS -o "$f" -w '%{http_code}' --max-time 10 "http://$1/_shoal/pulls" || true)
    [[ $code == 200 ]] || { rm -f "$f"; die "GET http://$1/_shoal/pulls -> HTTP ${code:-000}"; }
    cat "$f"
    rm -f "$f"
}

# shoal_pull_record ADDR DIGEST: the /_shoal/pulls record of DIGEST ("null" if none).
shoal_pull_record() {
    shoal_pulls "$1" | jq -c --arg d "$2" '[.pulls[] | select(.digest == $d)] | .[0]'
}

# pulls_summary ADDR [PEER_NAMES_FILE]: one line from /_shoal/pulls: bytes fetched from the
# upstream and from peers (per peer), bytes served, records and their states. PEER_NAMES_FILE
# ("PEER_ID NAME" lines) replaces peer ids by node names.
pulls_summary() {
    local addr=$1 names=${2:-} line id name f code
    f=$(mktemp "$T/pulls.XXXXXX")
    code=$(curl -sS -o "$f" -w '%{http_code}' --max-time 10 "http://$addr/_shoal/pulls" 2>/dev/null || true)
    if [[ $code != 200 ]]; then
        rm -f "$f"
        echo "(GET /_shoal/pulls -> HTTP ${code:-000})"
        return 0
    fi
    line=$(jq -r '
        [.pulls[]] as $p
        | ([$p[] | .fetched_from_peers // {} | to_entries[]] | group_by(.key)
           | map("\(.[0].key)=\(map(.value) | add)") | join(" ")) as $peers
        | "upstream=\([$p[].fetched_from_upstream // 0] | add // 0)"
          + " peers=\([$p[] | .fetched_from_peers // {} | to_entries[].value] | add // 0) [\($peers)]"
          + " served_cache=\([$p[].served_from_cache // 0] | add // 0)"
          + " served_arriving=\([$p[].served_while_arriving // 0] | add // 0)"
          + " records=\($p | length) states=[\([$p[].state] | group_by(.) | map("\(.[0])x\(length)") | join(","))]"' "$f" 2>&1 || echo "(unparsable /_shoal/pulls: $(head -c 200 "$f"))")
    rm -f "$f"
    if [[ -n $names && -s $names ]]; then
        while read -r id name; do
            [[ -n $id ]] && line=${line//$id/$name}
        done <"$names"
    fi
    printf '%s\n' "$line"
}

# served_by_source ADDR: "cache=N upstream=N peer=N" from shoal_served_bytes_total{source=...}
# (diagnostics: never fails).
served_by_source() {
    local f
    f=$(mktemp "$T/metrics.XXXXXX")
    if [[ $(curl -sS -o "$f" -w '%{http_code}' --max-time 10 "http://$1/metrics" 2>/dev/null || true) != 200 ]]; then
        rm -f "$f"
        echo "(GET /metrics failed)"
        return 0
    fi
    awk '
        index($1, "shoal_served_bytes_total{") == 1 {
            if (match($1, /source="[^"]*"/)) s[substr($1, RSTART + 8, RLENGTH - 9)] += $NF
        }
        END { printf "cache=%d upstream=%d peer=%d\n", s["cache"], s["upstream"], s["peer"] }' "$f"
    rm -f "$f"
}

# log_peer_id FILE: the libp2p peer id a shoal log states as its own (empty if none).
log_peer_id() {
    [[ -f $1 ]] || return 0
    grep -iE 'local peer id|peer id|peer_id|local_peer|PeerId|listening' "$1" 2>/dev/null |
        sed 's/\x1b\[[0-9;]*m//g' | grep -oE '(12D3KooW|Qm)[1-9A-HJ-NP-Za-km-z]{40,}' | head -n1 || true
}

# shoal_peer_id VAR: the node's own libp2p peer id, from its log (empty if not found).
shoal_peer_id() {
    local logvar=${1}_LOG
    log_peer_id "${!logvar:-}"
}

# peer_names_file FILE: write "PEER_ID VAR" for every shoal log of this run ($T/shoal-VAR.N.log)
# that states a peer id (for pulls_summary).
peer_names_file() {
    local f v id
    : >"$1"
    for f in "$T"/shoal-*.log; do
        [[ -f $f ]] || continue
        v=$(basename "$f")
        v=${v#shoal-}
        v=${v%%.*}
        id=$(log_peer_id "$f")
        if [[ -n $id ]]; then printf '%s %s\n' "$id" "$v" >>"$1"; fi
    done
}

# verify_dir_copy DIR JSON [PLATFORM=linux/amd64]: a skopeo dir: copy of a single-platform
# pull holds the platform's manifest and exactly its config and layers, each hashing to its name.
verify_dir_copy() {
    local out=$1 json=$2 plat=${3:-linux/amd64} f name got expected mwant seen=()
    mwant=$(image_platform_manifest "$json" "$plat")
    [[ -f $out/manifest.json ]] || die "no manifest.json in $out"
    got=$(sha256_of "$out/manifest.json")
    [[ $got == "$mwant" ]] || die "copied manifest.json digest $got != $plat manifest $mwant"
    expected=$(image_platform_blobs "$json" "$plat" | sort)
    for f in "$out"/*; do
        name=$(basename "$f")
        case $name in manifest.json | version | signature-*) continue ;; esac
        got=$(sha256_of "$f")
        [[ sha256:$name == "$got" ]] || die "blob $name in $out hashes to $got"
        seen+=("sha256:$name")
    done
    [[ $(printf '%s\n' ${seen[@]+"${seen[@]}"} | sort) == "$expected" ]] ||
        die "blob set in $out differs: got [${seen[*]:-}] want [${expected//$'\n'/ }]"
}

# swarm_pull SRC REF JSON OUT [TIMEOUT=180]: skopeo copy docker://SRC/REF (REF = repo:tag or
# repo@digest) to dir:OUT, then verify_dir_copy. Prints "pulled SRC/REF in N s".
swarm_pull() {
    local src=$1 ref=$2 json=$3 out=$4 tmo=${5:-180} t0=$SECONDS
    mkdir -p "$out"
    timeout "$tmo" skopeo copy --quiet --src-tls-verify=false "docker://$src/$ref" "dir:$out" \
        >"$out.log" 2>&1 || { show_log "$out.log" 10; die "skopeo copy docker://$src/$ref failed after $((SECONDS - t0)) s: $(tail -n1 "$out.log")"; }
    verify_dir_copy "$out" "$json"
    echo "pulled $src/$ref in $((SECONDS - t0)) s"
}
