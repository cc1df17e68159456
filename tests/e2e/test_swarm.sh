#!/usr/bin/env bash
# The swarm: shoal nodes on loopback find each other over the DHT (--p2p-listen, TCP) and
# exchange digest-verified chunks over QUIC (same port, UDP), sharing one --cluster-key-file.
# Upstream egress is measured at the registry side by counting_proxy.py, not taken from shoal.
#
#   a. 5 nodes (nodes 2-5 bootstrap from node 1, one of them by the name localhost) pull a
#      4 x 16 MiB image at once: every digest right, registry blob egress <= 1.2 image copies.
#   b. registry stopped; a 6th (late) node pulls the image by digest from the peers alone.
#   c. registry stopped; nodes with another cluster key / none cannot fetch from the swarm, a
#      keyed late node can.
#   d. a 128 MiB layer seeded on 2 nodes, upstream gone; a 3rd node pulls it and the seeder
#      serving it is killed -9 mid-transfer: the pull still completes with the right digest.
#   e. 3 nodes pull the 128 MiB layer at once through a throttled upstream; the node fetching
#      from the upstream is killed -9 mid-way: the others take over and complete.
#   f. 3 nodes pull the 128 MiB layer at once through a slow upstream (8 MiB/s: ~16 s) and
#      nobody fails: the others fetch from the seeder while the layer arrives, registry egress
#      <= 1.2 copies.
#   g. a poisoned peer (--fault-corrupt-chunks: it corrupts every chunk it serves) and an
#      honest one hold the layer, the upstream is gone; a third node pulls it: digest right,
#      corrupt chunks rejected, the liar banned.
#
# Every case is SKIP when the shoal binary has no p2p flags (no --p2p-listen in `run --help`).
# Knobs: E2E_SWARM_LAYERS (4), E2E_SWARM_LAYER_SIZE (16MiB), E2E_SWARM_BIG_SIZE (128MiB),
# E2E_SWARM_RATE (throttle for e, B/s per connection, 24 MiB/s), E2E_SWARM_SLOW_RATE (for f,
# 8 MiB/s), E2E_SWARM_MAX_COPIES (1.2),
# E2E_SWARM_NODE_ARGS (extra `shoal run` args for every node, e.g. "--seeders 1").
source "$(dirname "$0")/lib.sh"
e2e_init test_swarm

LAYERS=${E2E_SWARM_LAYERS:-4}
LAYER_SIZE=${E2E_SWARM_LAYER_SIZE:-16MiB}
BIG_SIZE=${E2E_SWARM_BIG_SIZE:-128MiB}
RATE=${E2E_SWARM_RATE:-$((24 << 20))}
SLOW_RATE=${E2E_SWARM_SLOW_RATE:-$((8 << 20))}
MAX_COPIES=${E2E_SWARM_MAX_COPIES:-1.2}
read -r -a NODE_ARGS <<<"${E2E_SWARM_NODE_ARGS:-}"

CASE_A="a: 5 nodes pull a $LAYERS x $LAYER_SIZE image at once; digests right; registry blob egress <= $MAX_COPIES copies"
CASE_B="b: registry stopped; a late 6th node pulls the image by digest from peers alone"
CASE_C="c: registry stopped; nodes with another cluster key or none cannot fetch from the swarm, a keyed late node can"
CASE_D="d: a peer serving a $BIG_SIZE layer is killed -9 mid-transfer; the pull completes from the other seeder, digest right"
CASE_E="e: the node fetching from the (throttled) upstream is killed -9 mid-way; the other nodes take over and complete"
CASE_F="f: a healthy seeder on a slow upstream ($((SLOW_RATE >> 20)) MiB/s): the other nodes wait for it; registry egress <= $MAX_COPIES copies"
CASE_G="g: a poisoned peer serves corrupt chunks of a layer an honest peer also holds; a new node pulls it with the right digest and bans the liar"
ALL_CASES=("$CASE_A" "$CASE_B" "$CASE_C" "$CASE_D" "$CASE_E" "$CASE_F" "$CASE_G")

# info MSG: a measurement / observation line on stdout.
info() { printf 'INFO %s: %s\n' "$E2E_NAME" "$*"; }

if [[ $E2E_DIRECT == 1 ]]; then
    for c in "${ALL_CASES[@]}"; do skip "$c" "needs shoal (E2E_DIRECT=1)"; done
    e2e_finish
fi
[[ -x $SHOAL_BIN ]] || die "shoal binary not found at $SHOAL_BIN (cargo build -p shoal-node)"
if ! p2p_supported; then
    for c in "${ALL_CASES[@]}"; do
        skip "$c" "$SHOAL_BIN has no p2p flags ('shoal run --help' lists no --p2p-listen)"
    done
    e2e_finish
fi

# --- set-up: registry, images, cluster keys -----------------------------------------------------
start_registry REG
save_env registry REG REG_PID REG_DIR
push_image "$REG" library/swarm-img v1 --seed 501 --layers "$LAYERS" --layer-size "$LAYER_SIZE"
IMG=$PUSH_JSON
IMG_DIGEST=$PUSH_DIGEST
push_image "$REG" library/swarm-big v1 --seed 502 --layers 1 --layer-size "$BIG_SIZE"
BIG=$PUSH_JSON
BIG_LAYER=$(jq -r '.manifests[0].layers[0]' "$BIG")
BIG_LAYER_SIZE=$(jq -r --arg d "$BIG_LAYER" '.blobs[] | select(.digest == $d) | .size' "$BIG")

# blob_bytes JSON: config + layer bytes of the linux/amd64 image (what a pull downloads as blobs).
blob_bytes() {
    jq -r '(.manifests[] | select(.platform == "linux/amd64") | [.config] + .layers) as $d
        | [.blobs[] | select(.digest as $x | $d | index($x)) | .size] | add' "$1"
}
IMG_BLOB_BYTES=$(blob_bytes "$IMG")

KEY=$T/cluster.key
OTHER_KEY=$T/other-cluster.key
printf 'shoal-e2e-swarm-%s\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$KEY"
printf 'not-the-swarm-key-%s\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$OTHER_KEY"
chmod 600 "$KEY" "$OTHER_KEY"
PEER_NAMES=$T/peer-names # "PEER_ID NODE" lines (from the node logs), to print node names

# start_node VAR P2P_PORT UPSTREAM [ARGS...]: a swarm node with data dir $T/nodes/VAR.
start_node() {
    local var=$1 port=$2 up=$3
    shift 3
    start_swarm_node "$var" "$T/nodes/$var" "$up" "$port" ${NODE_ARGS[@]+"${NODE_ARGS[@]}"} "$@"
}

# peers_metric ADDR: name of a gauge counting connected peers in /metrics, if shoal has one.
peers_metric() {
    curl -sS --max-time 5 "http://$1/metrics" 2>/dev/null |
        grep -oE '^shoal_[a-z_]*peers[a-z_]*' | grep -vE '_total$|bytes' | head -n1 || true
}

# settle VAR...: give the DHT time to form: wait (at most 20 s) until each node's peer gauge is
# > 0 if /metrics has one, else sleep 3 s.
settle() {
    local m v deadline=$((SECONDS + 20))
    m=$(peers_metric "${!1}")
    if [[ -z $m ]]; then
        sleep 3
        return 0
    fi
    for v in "$@"; do
        until (($(metric_value "${!v}" "$m" 2>/dev/null || echo 0) > 0)); do
            if ((SECONDS >= deadline)); then
                log "$v: $m still 0 after 20 s"
                break
            fi
            sleep 0.3
        done
    done
}

# report VAR...: each node's /_shoal/pulls summary and served bytes by source.
report() {
    local v
    peer_names_file "$PEER_NAMES"
    for v in "$@"; do
        info "  $v /_shoal/pulls: $(pulls_summary "${!v}" "$PEER_NAMES")"
        info "  $v shoal_served_bytes_total: $(served_by_source "${!v}")"
    done
}

# ratio A B: A / B with 2 decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f\n", (b > 0 ? a / b : 0) }'; }

# blob_gets ADDR REPO JSON: GET every blob of the image (config, layers) by digest from ADDR;
# print "digest-prefix:HTTP-code:ok|bad" per blob (diagnostics; never fails).
blob_gets() {
    local d code f out=''
    f=$(mktemp "$T/blobget.XXXXXX")
    for d in $(image_platform_blobs "$3"); do
        code=$(curl -sS -o "$f" -w '%{http_code}' --max-time 60 "http://$1/v2/$2/blobs/$d" 2>/dev/null || true)
        if [[ $code == 200 && $(sha256_of "$f") == "$d" ]]; then out+="${d:7:12}:$code:ok "; else out+="${d:7:12}:${code:-000}:bad "; fi
    done
    rm -f "$f"
    echo "${out% }"
}

# ensure_registry: the registry is up (restarted on its data dir if a case stopped it).
ensure_registry() {
    load_env registry || true
    if ! pid_alive "$REG_PID"; then
        start_registry REG
        save_env registry REG REG_PID REG_DIR
    fi
}

# stop_nodes ENVNAME VAR...: stop the nodes saved by an earlier case (frees CPU for the next).
stop_nodes() {
    local v pv
    load_env "$1" || return 0
    shift
    for v in "$@"; do
        pv=${v}_PID
        [[ -n ${!pv:-} ]] && stop_tree "${!pv}" 10
    done
    return 0
}

# --- a: 5 nodes, one image, at once --------------------------------------------------------------
five_nodes() {
    need_shoal
    local ports i v peer pids=() rc=0 why='' t0 blob copies d n
    start_counting_proxy UPA "$REG"
    mapfile -t ports < <(free_ports 5)
    start_node N1 "${ports[0]}" "$UPA" --cluster-key-file "$KEY"
    for i in 2 3 4 5; do
        peer=127.0.0.1:${ports[0]}
        ((i == 5)) && peer=localhost:${ports[0]} # by name: exercises resolution
        start_node "N$i" "${ports[i - 1]}" "$UPA" --cluster-key-file "$KEY" --peer "$peer"
    done
    save_env swarm N1 N1_PID N1_LOG N1_P2P N2 N2_PID N2_LOG N2_P2P N3 N3_PID N3_LOG N3_P2P \
        N4 N4_PID N4_LOG N4_P2P N5 N5_PID N5_LOG N5_P2P UPA UPA_PID UPA_STATS UPA_LOG
    settle N1 N2 N3 N4 N5
    mkdir -p "$T/a"
    t0=$SECONDS
    for i in 1 2 3 4 5; do
        v=N$i
        (swarm_pull "${!v}" library/swarm-img:v1 "$IMG" "$T/a/pull-$i" 240) >"$T/a/pull-$i.out" 2>&1 &
        pids+=($!)
    done
    for i in 1 2 3 4 5; do
        if ! wait "${pids[i - 1]}"; then
            rc=1
            why+="N$i: $(grep -m1 'error:' "$T/a/pull-$i.out" | sed 's/^ *error: //'); "
        fi
    done
    info "a: 5 parallel pulls finished in $((SECONDS - t0)) s: $(cat "$T"/a/pull-*.out | grep -c '^pulled') of 5 verified"
    blob=$(proxy_stat UPA .blob_bytes)
    copies=$(ratio "$blob" "$IMG_BLOB_BYTES")
    info "a: MEASURED registry-side blob egress $blob B for an image of $IMG_BLOB_BYTES blob bytes = $copies copies" \
        "(manifest bytes $(proxy_stat UPA .manifest_bytes), requests $(proxy_stat UPA .requests))"
    for d in $(image_platform_blobs "$IMG"); do
        n=$(proxy_stat UPA ".by_blob[\"$d\"] // 0")
        info "a:   ${d:7:12}: registry sent $n B = $(ratio "$n" "$(jq -r --arg d "$d" '.blobs[] | select(.digest == $d) | .size' "$IMG")") copies"
    done
    report N1 N2 N3 N4 N5
    ((rc == 0)) || die "pulls failed: $why"
    awk -v c="$copies" -v m="$MAX_COPIES" 'BEGIN { exit !(c <= m) }' ||
        die "the registry sent $copies copies of the image's blobs ($blob B), more than $MAX_COPIES"
}
run_case "$CASE_A" five_nodes

# --- b: registry stopped, a late node --------------------------------------------------------------
late_node() {
    need_shoal
    load_env swarm || die "no swarm (case a did not start it)"
    local port out up peers
    stop_registry REG
    [[ $(http_code "http://$REG/v2/") == 000 ]] || die "registry still answers after being stopped"
    port=$(free_ports 1)
    start_node N6 "$port" "$UPA" --cluster-key-file "$KEY" --peer "$N2_P2P"
    save_env late N6 N6_PID N6_LOG N6_P2P
    settle N6
    if ! out=$(swarm_pull "$N6" "library/swarm-img@$IMG_DIGEST" "$IMG" "$T/b/pull" 150); then
        # which part failed? the manifest by digest, the blobs by digest, or both
        info "b: pull failed; N6 manifest by digest: HTTP $(http_code "http://$N6/v2/library/swarm-img/manifests/$IMG_DIGEST" \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json'); blobs by digest: $(blob_gets "$N6" library/swarm-img "$IMG")"
        report N6
        exit 1 # the reason is swarm_pull's
    fi
    info "b: $out"
    report N6
    up=$(shoal_pulls "$N6" | jq '[.pulls[].fetched_from_upstream // 0] | add // 0') || exit 1
    peers=$(shoal_pulls "$N6" | jq '[.pulls[] | .fetched_from_peers // {} | to_entries[].value] | add // 0') || exit 1
    ((up == 0)) || die "N6 reports $up bytes fetched from the upstream, which is down"
    ((peers >= IMG_BLOB_BYTES)) ||
        die "N6 completed but /_shoal/pulls accounts only $peers bytes from peers (image blobs: $IMG_BLOB_BYTES)"
}
run_case "$CASE_B" late_node

# --- c: cluster key ---------------------------------------------------------------------------
outsiders() {
    need_shoal
    load_env swarm || die "no swarm (case a did not start it)"
    local ports v i rc t0 why='' code got peers
    stop_registry REG
    mapfile -t ports < <(free_ports 3)
    start_node X7 "${ports[0]}" "$UPA" --cluster-key-file "$OTHER_KEY" --peer "$N1_P2P" --peer "$N2_P2P"
    start_node X8 "${ports[1]}" "$UPA" --peer "$N1_P2P" --peer "$N2_P2P"
    start_node K9 "${ports[2]}" "$UPA" --cluster-key-file "$KEY" --peer "$N1_P2P"
    save_env outsiders X7 X7_PID X7_LOG K9 K9_PID K9_LOG X8 X8_PID X8_LOG
    settle K9
    mkdir -p "$T/c"
    t0=$SECONDS
    local pids=()
    for v in X7 X8 K9; do
        (swarm_pull "${!v}" "library/swarm-img@$IMG_DIGEST" "$IMG" "$T/c/pull-$v" 90) >"$T/c/pull-$v.out" 2>&1 &
        pids+=($!)
    done
    i=0
    for v in X7 X8 K9; do
        rc=0
        wait "${pids[i]}" || rc=$?
        i=$((i + 1))
        info "c: $v pull: exit $rc after <= $((SECONDS - t0)) s: $(grep -m1 -E 'error:|^pulled' "$T/c/pull-$v.out" | sed 's/^ *//')"
        case $v in
            K9) ((rc == 0)) || why+="the keyed node K9 failed to pull from the swarm; " ;;
            *) ((rc != 0)) || why+="$v (wrong/no key) pulled the image with the registry down; " ;;
        esac
    done
    # Raw blob GETs too: an outsider must not get a complete, verified layer from the swarm.
    local layer
    layer=$(jq -r '.manifests[0].layers[0]' "$IMG")
    for v in X7 X8; do
        code=$(curl -sS -o "$T/c/$v.blob" -w '%{http_code}' --max-time 60 \
            "http://${!v}/v2/library/swarm-img/blobs/$layer" 2>/dev/null || true)
        got=$(sha256_of "$T/c/$v.blob" 2>/dev/null || echo none)
        info "c: $v GET layer ${layer:7:12}: HTTP ${code:-000}, $(stat -c %s "$T/c/$v.blob" 2>/dev/null || echo 0) B"
        if [[ $code == 200 && $got == "$layer" ]]; then why+="$v served the layer (from the swarm?) with the registry down; "; fi
        peers=$(shoal_pulls "${!v}" | jq '[.pulls[] | .fetched_from_peers // {} | to_entries[].value] | add // 0') || exit 1
        ((peers == 0)) || why+="$v reports $peers bytes fetched from peers; "
    done
    # the keyed control gets the same layer by digest from the swarm
    code=$(curl -sS -o "$T/c/K9.blob" -w '%{http_code}' --max-time 60 \
        "http://$K9/v2/library/swarm-img/blobs/$layer" 2>/dev/null || true)
    info "c: K9 (keyed) GET layer ${layer:7:12}: HTTP ${code:-000}, $(stat -c %s "$T/c/K9.blob" 2>/dev/null || echo 0) B"
    if [[ $code != 200 || $(sha256_of "$T/c/K9.blob") != "$layer" ]]; then
        why+="the keyed node K9 could not GET the layer by digest from the swarm; "
    fi
    report X7 X8 K9
    [[ -z $why ]] || die "$why"
}
run_case "$CASE_C" outsiders

# --- d: a serving peer killed mid-transfer --------------------------------------------------------
serving_peer_killed() {
    need_shoal
    stop_nodes swarm N1 N2 N3 N4 N5
    stop_nodes late N6
    stop_nodes outsiders X7 X8 K9
    ensure_registry
    local ports rec after got code victim='' v id best=-1 b trigger kpid t0 peers names D1_ID D2_ID
    start_counting_proxy UPD "$REG"
    mapfile -t ports < <(free_ports 3)
    start_node D1 "${ports[0]}" "$UPD" --cluster-key-file "$KEY"
    start_node D2 "${ports[1]}" "$UPD" --cluster-key-file "$KEY" --peer "$D1_P2P"
    start_node D3 "${ports[2]}" "$UPD" --cluster-key-file "$KEY" --peer "$D1_P2P" --peer "$D2_P2P"
    save_env peer-killed D1 D1_PID D2 D2_PID D3 D3_PID
    settle D1 D2 D3
    wait_until 5 test -n "$(shoal_peer_id D1)" || true
    wait_until 5 test -n "$(shoal_peer_id D2)" || true
    # shellcheck disable=SC2034 # read through ${!id} below
    D1_ID=$(shoal_peer_id D1)
    # shellcheck disable=SC2034
    D2_ID=$(shoal_peer_id D2)
    # seed the layer on D1, then D2
    t0=$SECONDS
    fetch_verify_blob "http://$D1" library/swarm-big "$BIG_LAYER"
    fetch_verify_blob "http://$D2" library/swarm-big "$BIG_LAYER"
    info "d: seeded ${BIG_LAYER:7:12} ($BIG_LAYER_SIZE B) on D1 and D2 in $((SECONDS - t0)) s;" \
        "registry sent $(proxy_stat UPD .blob_bytes) B"
    report D1 D2
    stop_tree "$UPD_PID" 5 # from now on the upstream is unreachable: D3 can only use peers
    mkdir -p "$T/d"
    curl -sS --max-time 150 -o "$T/d/blob" -w '%{http_code}' \
        "http://$D3/v2/library/swarm-big/blobs/$BIG_LAYER" >"$T/d/code" 2>"$T/d/curl.err" &
    kpid=$!
    trigger=$((BIG_LAYER_SIZE / 8))
    t0=$SECONDS
    while ((SECONDS - t0 < 90)); do
        rec=$(curl -sS --max-time 2 "http://$D3/_shoal/pulls" 2>/dev/null |
            jq -c --arg d "$BIG_LAYER" '[.pulls[] | select(.digest == $d)][0] // {}' 2>/dev/null || echo '{}')
        got=$(jq '[.fetched_from_peers // {} | to_entries[].value] | add // 0' <<<"$rec")
        if ((got >= trigger)); then break; fi
        pid_alive "$kpid" || break
        sleep 0.05
    done
    if ((got >= BIG_LAYER_SIZE)) || ! pid_alive "$kpid"; then
        die "D3 had $got of $BIG_LAYER_SIZE B from peers (curl $(pid_alive "$kpid" && echo running || echo finished)) before the kill could happen: not mid-transfer (raise E2E_SWARM_BIG_SIZE)"
    fi
    # kill at once the seeder that has sent D3 the most so far (D1 if peer ids are unknown)
    for v in D1 D2; do
        id=${v}_ID
        [[ -n ${!id} ]] || continue
        b=$(jq --arg id "${!id}" '.fetched_from_peers[$id] // 0' <<<"$rec")
        if ((b > best)); then best=$b victim=$v; fi
    done
    [[ -n $victim ]] || victim=D1
    stop_shoal "$victim" KILL
    after=$(curl -sS --max-time 2 "http://$D3/_shoal/pulls" 2>/dev/null |
        jq -c --arg d "$BIG_LAYER" '[.pulls[] | select(.digest == $d)][0] // {}' 2>/dev/null || echo '{}')
    peer_names_file "$PEER_NAMES"
    names=$(awk '{ printf "s/%s/%s/g;", $1, $2 }' "$PEER_NAMES")
    info "d: killed -9 $victim; last sample before: D3 had $got of $BIG_LAYER_SIZE B from peers" \
        "($(jq -r '.state // "?"' <<<"$rec")) $(jq -c '.fetched_from_peers' <<<"$rec" | sed "$names");" \
        "first sample after: $(jq -c '.fetched_from_peers' <<<"$after" | sed "$names") ($(jq -r '.state // "?"' <<<"$after"))"
    ((got < BIG_LAYER_SIZE)) || die "D3 had the whole layer before $victim was killed: not mid-transfer (raise E2E_SWARM_BIG_SIZE)"
    if ((best == 0)); then
        die "$victim had sent D3 nothing before the kill: it was not serving (D3 fetched from the other seeder only)"
    fi
    wait "$kpid" || true
    code=$(cat "$T/d/code")
    info "d: D3 GET finished $((SECONDS - t0)) s after it started: HTTP $code, $(stat -c %s "$T/d/blob") B $(head -c 200 "$T/d/curl.err")"
    report D3
    [[ $code == 200 ]] || die "D3's GET of the layer -> HTTP $code after $victim was killed ($(head -c 200 "$T/d/curl.err"))"
    [[ $(sha256_of "$T/d/blob") == "$BIG_LAYER" ]] ||
        die "D3 served $(stat -c %s "$T/d/blob") B hashing to $(sha256_of "$T/d/blob") after $victim was killed"
    peers=$(shoal_pull_record "$D3" "$BIG_LAYER" | jq '[.fetched_from_peers // {} | to_entries[].value] | add // 0') || exit 1
    ((peers >= BIG_LAYER_SIZE)) || info "d: note: D3 accounts only $peers B from peers for a $BIG_LAYER_SIZE B layer"
    # cross-check the accounting: what the surviving seeder says it served vs what D3 credits it
    local survivor=D2
    [[ $victim == D2 ]] && survivor=D1
    id=${survivor}_ID
    info "d: $survivor says it served $(metric_value "${!survivor}" shoal_peer_served_bytes_total) B to peers;" \
        "D3 credits it $(shoal_pull_record "$D3" "$BIG_LAYER" | jq --arg id "${!id}" '.fetched_from_peers[$id] // 0') B"
    # a second GET comes from D3's verified store
    fetch_verify_blob "http://$D3" library/swarm-big "$BIG_LAYER"
}
run_case "$CASE_D" serving_peer_killed

# --- e: the seeding node killed -------------------------------------------------------------------
seeder_killed() {
    need_shoal
    ensure_registry
    stop_nodes peer-killed D1 D2 D3
    local ports i v pids=() rc why='' b best=-1 victim='' t0 got total=0 at_kill
    start_throttle THR "$REG" "$RATE"
    for i in 1 2 3; do start_counting_proxy "EP$i" "$THR"; done
    mapfile -t ports < <(free_ports 3)
    start_node E1 "${ports[0]}" "$EP1" --cluster-key-file "$KEY"
    start_node E2 "${ports[1]}" "$EP2" --cluster-key-file "$KEY" --peer "$E1_P2P"
    start_node E3 "${ports[2]}" "$EP3" --cluster-key-file "$KEY" --peer "$E1_P2P"
    save_env seeder-killed E1 E1_PID E2 E2_PID E3 E3_PID
    settle E1 E2 E3
    mkdir -p "$T/e"
    t0=$SECONDS
    for i in 1 2 3; do
        v=E$i
        (swarm_pull "${!v}" library/swarm-big:v1 "$BIG" "$T/e/pull-$i" 240) >"$T/e/pull-$i.out" 2>&1 &
        pids+=($!)
    done
    # wait until some node has fetched a quarter of the layer from the upstream; kill the one
    # that fetched the most
    while ((SECONDS - t0 < 90)); do
        best=-1
        for i in 1 2 3; do
            v=EP${i}_STATS
            b=$(jq --arg d "$BIG_LAYER" '.by_blob[$d] // 0' "${!v}" 2>/dev/null || echo 0)
            if ((b > best)); then best=$b victim=E$i; fi
        done
        ((best >= BIG_LAYER_SIZE / 4)) && break
        sleep 0.1
    done
    ((best >= BIG_LAYER_SIZE / 4)) || die "no node fetched a quarter of the layer from the upstream within 90 s"
    ((best < BIG_LAYER_SIZE)) || die "$victim had fetched the whole layer before the kill: not mid-way (lower E2E_SWARM_RATE)"
    stop_shoal "$victim" KILL
    at_kill=$(for i in 1 2 3; do v=EP${i}_STATS; printf 'E%s=%s ' "$i" "$(jq --arg d "$BIG_LAYER" '.by_blob[$d] // 0' "${!v}")"; done)
    info "e: killed -9 $victim after $((SECONDS - t0)) s, when it had $best of $BIG_LAYER_SIZE B from the upstream" \
        "(registry-side bytes per node at the kill: ${at_kill% })"
    # A swarm shares the fetch: some node must have been getting the layer from its peers, not
    # from the upstream, or there was nothing to take over.
    [[ " $at_kill" == *"=0 "* ]] ||
        why+="every node was fetching the layer from the upstream itself when $victim was killed (no sharing: ${at_kill% }); "
    for i in 1 2 3; do
        rc=0
        wait "${pids[i - 1]}" || rc=$?
        info "e: E$i pull: exit $rc: $(grep -m1 -E 'error:|^pulled' "$T/e/pull-$i.out" | sed 's/^ *//')"
        if [[ E$i != "$victim" ]] && ((rc != 0)); then
            why+="E$i failed after $victim was killed: $(grep -m1 'error:' "$T/e/pull-$i.out" | sed 's/^ *error: //'); "
        fi
    done
    for i in 1 2 3; do
        got=$(proxy_stat "EP$i" ".by_blob[\"$BIG_LAYER\"] // 0")
        total=$((total + got))
        info "e:   E$i fetched $got B of the layer from the upstream (registry side)"
    done
    info "e: MEASURED registry-side egress for the layer: $total B = $(ratio "$total" "$BIG_LAYER_SIZE") copies (one killed mid-way)"
    for i in 1 2 3; do
        v=E$i
        [[ $v == "$victim" ]] && continue
        report "$v"
    done
    [[ -z $why ]] || die "$why"
}
run_case "$CASE_E" seeder_killed

# --- f: a healthy but slow seeder -----------------------------------------------------------------
slow_seeder() {
    need_shoal
    ensure_registry
    stop_nodes seeder-killed E1 E2 E3
    local ports i v pids=() t0 got total=0 why='' code
    start_throttle THF "$REG" "$SLOW_RATE"
    for i in 1 2 3; do start_counting_proxy "FP$i" "$THF"; done
    mapfile -t ports < <(free_ports 3)
    start_node F1 "${ports[0]}" "$FP1" --cluster-key-file "$KEY"
    start_node F2 "${ports[1]}" "$FP2" --cluster-key-file "$KEY" --peer "$F1_P2P"
    start_node F3 "${ports[2]}" "$FP3" --cluster-key-file "$KEY" --peer "$F1_P2P"
    save_env slow-seeder F1 F1_PID F2 F2_PID F3 F3_PID
    settle F1 F2 F3
    mkdir -p "$T/f"
    t0=$SECONDS
    for i in 1 2 3; do
        v=F$i
        curl -sS --max-time 150 -o "$T/f/$v.blob" -w '%{http_code}' \
            "http://${!v}/v2/library/swarm-big/blobs/$BIG_LAYER" >"$T/f/$v.code" 2>"$T/f/$v.err" &
        pids+=($!)
    done
    for i in 1 2 3; do wait "${pids[i - 1]}" || true; done
    for i in 1 2 3; do
        v=F$i
        code=$(cat "$T/f/$v.code")
        got=$(proxy_stat "FP$i" ".by_blob[\"$BIG_LAYER\"] // 0")
        total=$((total + got))
        info "f:   $v: HTTP $code after <= $((SECONDS - t0)) s; fetched $got B of the layer from the upstream (registry side)"
        if [[ $code != 200 || $(sha256_of "$T/f/$v.blob") != "$BIG_LAYER" ]]; then
            why+="$v: HTTP $code, body hashing to $(sha256_of "$T/f/$v.blob") $(head -c 200 "$T/f/$v.err"); "
        fi
    done
    info "f: MEASURED registry-side egress for the layer: $total B = $(ratio "$total" "$BIG_LAYER_SIZE") copies for 3 nodes"
    report F1 F2 F3
    [[ -z $why ]] || die "$why"
    awk -v c="$(ratio "$total" "$BIG_LAYER_SIZE")" -v m="$MAX_COPIES" 'BEGIN { exit !(c <= m) }' ||
        die "the registry sent $(ratio "$total" "$BIG_LAYER_SIZE") copies of the layer with no node failing (more than $MAX_COPIES)"
}
run_case "$CASE_F" slow_seeder

# --- g: a poisoned peer ------------------------------------------------------------------------
poisoned_peer() {
    need_shoal
    ensure_registry
    stop_nodes slow-seeder F1 F2 F3
    local ports banned rejected liar_served
    start_counting_proxy GP "$REG"
    mapfile -t ports < <(free_ports 3)
    start_node G1 "${ports[0]}" "$GP" --cluster-key-file "$KEY"
    # G2 stores what it fetches correctly, but corrupts every chunk it serves to peers.
    start_node G2 "${ports[1]}" "$GP" --cluster-key-file "$KEY" --peer "$G1_P2P" --fault-corrupt-chunks
    save_env poisoned G1 G1_PID G2 G2_PID
    settle G1 G2
    fetch_verify_blob "http://$G1" library/swarm-big "$BIG_LAYER"
    fetch_verify_blob "http://$G2" library/swarm-big "$BIG_LAYER"
    stop_tree "$GP_PID" 5 # the upstream is gone: G3 can only use peers
    start_node G3 "${ports[2]}" "$GP" --cluster-key-file "$KEY" --peer "$G2_P2P" --peer "$G1_P2P"
    save_env poisoned G1 G1_PID G2 G2_PID G3 G3_PID
    settle G3
    fetch_verify_blob "http://$G3" library/swarm-big "$BIG_LAYER"
    banned=$(metric_value "$G3" shoal_peers_banned_total)
    rejected=$(metric_value "$G3" shoal_chunks_rejected_total)
    liar_served=$(metric_value "$G2" shoal_peer_served_bytes_total)
    info "g: G3 pulled the layer with the right digest; it rejected $rejected chunk(s), banned $banned peer(s);" \
        "the liar G2 sent $liar_served B (all corrupt)"
    report G3
    ((${banned%.*} >= 1)) || die "G3 did not ban the poisoned peer (shoal_peers_banned_total = $banned, rejected $rejected)"
    ((${rejected%.*} >= 1)) || die "G3 rejected no chunk, yet the liar served $liar_served B"
}
run_case "$CASE_G" poisoned_peer

e2e_finish
