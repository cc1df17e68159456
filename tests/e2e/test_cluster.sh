#!/usr/bin/env bash
# The namespace cluster harness (tools/src/bin/shoal-cluster.rs), smoke-sized: 3 hosts (network
# namespaces on a bridge in a "switch" namespace, tbf-shaped links) and a docker-registry in its
# own namespace; every host pulls a small image with skopeo straight from the registry
# (baseline) and then through its local shoal (one swarm, one cluster key).
#
#   a. the run completes and writes report.json and completion.svg
#   b. the report is sane: every host completed in both phases with the right digests, the
#      registry (its own log) sent 3 copies for the baseline and <= 1.2 for shoal, bytes by
#      source and peak RSS are there for every node
#   c. nothing is left: no namespace, process or temp dir of the run
#   d. a run interrupted with SIGTERM while its nodes pull removes everything too
#   e. `shoal-cluster cleanup --prefix` removes a leftover namespace and the process in it
#   f. two sites of two hosts behind WAN links (`--sites 2`, each node told its site): every
#      host completes with the right digests, <= 1.2 copies, and the nodes that fetched from
#      peers judged their role in their site from the sites their peers told in identify
#      (`site_role` in /_shoal/pulls: `gateway`, as every node of a two-host site is)
#   g. an edge LAN: three hosts started with `--mdns` and no `--peer` find each other by
#      multicast DNS on their bridge: every host completes with the right digests, the
#      registry sends <= 1.2 copies (each node alone would fetch a whole copy) and every host
#      got bytes from its peers
#   h. a headless service: every host bootstraps from one DNS name (`--peer shoal-peers:7000`,
#      `shoal-cluster run --dns-peers`) that resolves in its namespace to a dead address and to
#      every host: all done, digests right, <= 1.2 copies, peer bytes on every host, and the
#      per-namespace hosts files are gone after the run
#
# SKIP when not root or `ip netns` does not work. Knobs: E2E_CLUSTER_HOSTS (3),
# E2E_CLUSTER_IMAGE_SIZE (24MiB), E2E_CLUSTER_RATE (1gbit), E2E_CLUSTER_MAX_COPIES (1.2).
# SHOAL_CLUSTER: the harness binary (default: shoal-cluster next to SHOAL_IMAGEGEN).
source "$(dirname "$0")/lib.sh"
e2e_init test_cluster

HOSTS=${E2E_CLUSTER_HOSTS:-3}
SIZE=${E2E_CLUSTER_IMAGE_SIZE:-24MiB}
RATE=${E2E_CLUSTER_RATE:-1gbit}
MAX_COPIES=${E2E_CLUSTER_MAX_COPIES:-1.2}
SHOAL_CLUSTER=${SHOAL_CLUSTER:-$(dirname "$SHOAL_IMAGEGEN")/shoal-cluster}

CASE_A="a: $HOSTS namespace hosts at $RATE pull a $SIZE image (baseline and shoal); report and chart written"
CASE_B="b: report sane: all hosts done, digests right, baseline = $HOSTS copies, shoal <= $MAX_COPIES copies, sources and RSS per node"
CASE_C="c: after the run no namespace, process or temp dir of it is left"
CASE_D="d: a run interrupted by SIGTERM mid-pull removes its namespaces, processes and temp dir"
CASE_E="e: shoal-cluster cleanup --prefix removes a leftover namespace and its process"
CASE_F="f: two sites of two hosts behind WAN links: all done, digests right, <= $MAX_COPIES copies, site roles judged (gateway)"
CASE_G="g: three hosts with --mdns and no --peer find each other on their LAN: all done, digests right, <= $MAX_COPIES copies, peer bytes on every host"
CASE_H="h: three hosts bootstrap from one DNS name resolving to a dead address and every host: all done, digests right, <= $MAX_COPIES copies, peer bytes on every host"
ALL_CASES=("$CASE_A" "$CASE_B" "$CASE_C" "$CASE_D" "$CASE_E" "$CASE_F" "$CASE_G" "$CASE_H")

skip_all() {
    local c
    for c in "${ALL_CASES[@]}"; do skip "$c" "$1"; done
    e2e_finish
}
[[ $E2E_DIRECT == 1 ]] && skip_all "needs shoal (E2E_DIRECT=1)"
[[ $(id -u) == 0 ]] || skip_all "needs root (network namespaces, tc)"
have ip tc || skip_all "ip/tc (iproute2) not installed"
ip netns list >/dev/null 2>&1 || skip_all "'ip netns' does not work here"
# can this kernel make a namespace, a veth pair into it and a tbf qdisc?
probe=shc-e2e-probe-$$
if ! { ip netns add "$probe" && ip -n "$probe" link add name vp0 type veth peer name vp1 &&
    tc -n "$probe" qdisc replace dev vp0 root tbf rate 100mbit burst 64kb latency 50ms; } >/dev/null 2>&1; then
    ip netns del "$probe" 2>/dev/null || true
    skip_all "cannot create a namespace with a tbf-shaped veth here"
fi
ip netns del "$probe"
[[ -x $SHOAL_CLUSTER ]] || die "harness not found at $SHOAL_CLUSTER (cargo build -p shoal-tools)"
[[ -x $SHOAL_BIN ]] || die "shoal binary not found at $SHOAL_BIN (cargo build -p shoal-node)"
p2p_supported || skip_all "$SHOAL_BIN has no p2p flags"

# leftovers ID: namespaces, processes and temp dirs of run shc-ID (one per line; empty if none)
leftovers() {
    local id=$1 ns
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^shc-$id-" | sed 's/^/namespace /' || true
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^shc-$id-" || true); do
        ip netns pids "$ns" 2>/dev/null | sed "s/^/process in $ns: /" || true
    done
    pgrep -af "/tmp/shc-$id/" | sed 's/^/process /' || true
    [[ -e /tmp/shc-$id ]] && echo "temp dir /tmp/shc-$id"
    return 0
}

# --- a/b/c: one smoke run -----------------------------------------------------------------------
OUT=$T/out
RUN_PID=
smoke_run() {
    local rc=0
    "$SHOAL_CLUSTER" run --hosts "$HOSTS" --rate "$RATE" --registry-rate "$RATE" --image-size "$SIZE" \
        --layers 3 --timeout 90 --settle 2 --shoal "$SHOAL_BIN" --imagegen "$SHOAL_IMAGEGEN" \
        --out "$OUT" >"$T/run.log" 2>&1 &
    RUN_PID=$!
    register_pid "$RUN_PID" shoal-cluster
    echo "$RUN_PID" >"$T/run.pid"
    wait "$RUN_PID" || rc=$?
    sed 's/^/  | /' "$T/run.log" >&2
    ((rc == 0)) || die "shoal-cluster run exited $rc: $(grep -m1 'shoal-cluster:' "$T/run.log" || tail -n1 "$T/run.log")"
    [[ -s $OUT/report.json ]] || die "no report.json"
    jq -e . "$OUT/report.json" >/dev/null || die "report.json is not JSON"
    grep -q '<svg' "$OUT/completion.svg" && grep -q '</svg>' "$OUT/completion.svg" || die "completion.svg is not an SVG"
    grep -c '<polyline' "$OUT/completion.svg" | grep -qx 3 || die "completion.svg lacks the shoal, baseline and ideal lines"
}
run_case "$CASE_A" smoke_run

report_sane() {
    local r=$OUT/report.json why='' p n
    [[ -s $r ]] || die "no report (case a failed)"
    n=$(jq '.config.hosts' "$r")
    ((n == HOSTS)) || why+="config.hosts=$n; "
    for p in baseline shoal; do
        jq -e ".$p.all_completed == true and .$p.hosts_completed == $HOSTS" "$r" >/dev/null ||
            why+="$p: $(jq -r ".$p.hosts_completed" "$r")/$HOSTS hosts completed ($(jq -c "[.$p.hosts[] | select(.ok != true) | {host, error}]" "$r")); "
        jq -e ".$p.digests_ok == true and ([.$p.hosts[] | select(.verified != true)] | length == 0)" "$r" >/dev/null ||
            why+="$p: digests wrong: $(jq -c "[.$p.hosts[] | select(.verified != true) | {host, verify_error}]" "$r"); "
        jq -e ".$p.p50_s > 0 and .$p.p50_s <= .$p.p99_s and .$p.p99_s <= .$p.max_s and .$p.ratio_to_ideal.max > 0" "$r" >/dev/null ||
            why+="$p: completion times not ordered: $(jq -c "{p50: .$p.p50_s, p99: .$p.p99_s, max: .$p.max_s}" "$r"); "
    done
    jq -e '.ideal_s > 0 and .image.blob_bytes > 0' "$r" >/dev/null || why+="no ideal/image size; "
    # the registry's own log saw every baseline host fetch the whole image
    jq -e ".baseline.upstream.copies >= $HOSTS - 0.01 and .baseline.upstream.copies <= $HOSTS + 0.01" "$r" >/dev/null ||
        why+="baseline: registry log counted $(jq '.baseline.upstream.copies' "$r") copies for $HOSTS hosts; "
    jq -e ".shoal.upstream.copies >= 0.99 and .shoal.upstream.copies <= $MAX_COPIES" "$r" >/dev/null ||
        why+="shoal: registry sent $(jq '.shoal.upstream.copies' "$r") copies (want 1..$MAX_COPIES; by host: $(jq -c '.shoal.upstream.registry_log.blob_bytes_by_host' "$r")); "
    # the link counter agrees with the log within headers' overhead
    jq -e '.shoal.upstream.registry_link_bytes_tc >= .shoal.upstream.blob_bytes' "$r" >/dev/null ||
        why+="shoal: registry link sent fewer bytes ($(jq '.shoal.upstream.registry_link_bytes_tc' "$r")) than the log's blob bytes; "
    # every node accounts for the whole image (upstream + peers) and has a peak RSS
    jq -e '[.shoal.hosts[] | select((.bytes_by_source.upstream + .bytes_by_source.peers) < 1 or (.rss_peak_kib // 0) < 1000)] | length == 0' "$r" >/dev/null ||
        why+="shoal: node without bytes by source or RSS: $(jq -c '[.shoal.hosts[] | {host, src: .bytes_by_source, rss_peak_kib}]' "$r"); "
    jq -e '([.shoal.hosts[].bytes_by_source.upstream] | add) <= .shoal.upstream.blob_bytes * 1.01 + 1000000' "$r" >/dev/null ||
        why+="shoal: nodes claim more upstream bytes ($(jq '[.shoal.hosts[].bytes_by_source.upstream] | add' "$r")) than the registry sent ($(jq '.shoal.upstream.blob_bytes' "$r")); "
    info_line
    [[ -z $why ]] || die "$why"
}
info_line() {
    jq -r '"INFO test_cluster: ideal \(.ideal_s) s; " + ([.baseline, .shoal] | map("\(.phase): p50 \(.p50_s) s, max \(.max_s) s, \(.upstream.copies) copies") | join("; ")) + "; peak RSS max \(.shoal.rss_peak_kib.max) KiB"' "$OUT/report.json" || true
}
run_case "$CASE_B" report_sane

nothing_left() {
    local id left
    id=$(cat "$T/run.pid" 2>/dev/null) || die "no run (case a failed)"
    left=$(leftovers "$id")
    [[ -z $left ]] || die "left behind: ${left//$'\n'/; }"
}
run_case "$CASE_C" nothing_left

# --- d: interrupted -------------------------------------------------------------------------------
interrupted() {
    local pid rc=0 left t0
    # slow enough that the pulls are still running when the signal comes
    "$SHOAL_CLUSTER" run --hosts 2 --rate 40mbit --image-size 64MiB --layers 2 --timeout 90 --settle 1 \
        --no-baseline --shoal "$SHOAL_BIN" --imagegen "$SHOAL_IMAGEGEN" --out "$T/out-int" >"$T/int.log" 2>&1 &
    pid=$!
    register_pid "$pid" shoal-cluster-int
    wait_until 60 grep -q 'hosts pull through their local shoal' "$T/int.log" ||
        { show_log "$T/int.log"; die "the run did not reach the pulls within 60 s"; }
    sleep 2
    [[ -n $(leftovers "$pid") ]] || die "no namespaces while the run is pulling?"
    t0=$SECONDS
    kill -TERM "$pid"
    wait "$pid" || rc=$?
    ((rc != 0)) || die "interrupted run exited 0"
    left=$(leftovers "$pid")
    [[ -z $left ]] || { show_log "$T/int.log"; die "left behind after SIGTERM: ${left//$'\n'/; }"; }
    ((SECONDS - t0 <= 30)) || die "clean-up after SIGTERM took $((SECONDS - t0)) s"
}
run_case "$CASE_D" interrupted

# --- e: cleanup subcommand ------------------------------------------------------------------------
cleanup_cmd() {
    local ns=shc-e2e$$-h1 pid left
    ip netns add "$ns"
    ip netns exec "$ns" sleep 300 &
    pid=$!
    register_pid "$pid" leftover-sleep
    if ! wait_until 10 bash -c "[[ -n \$(ip netns pids $ns) ]]"; then
        kill "$pid" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        die "no process in $ns"
    fi
    if ! "$SHOAL_CLUSTER" cleanup --prefix "shc-e2e$$-" >"$T/cleanup.log" 2>&1; then
        ip netns del "$ns" 2>/dev/null || true
        show_log "$T/cleanup.log"
        die "cleanup failed"
    fi
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        ip netns del "$ns" 2>/dev/null || true
        die "namespace $ns still there after cleanup"
    fi
    wait_until 5 bash -c "! kill -0 $pid 2>/dev/null" || die "process $pid in $ns still running after cleanup"
    "$SHOAL_CLUSTER" cleanup --prefix "not-ours" >/dev/null 2>&1 && die "cleanup accepted a prefix other than shc-"
    return 0
}
run_case "$CASE_E" cleanup_cmd

# cluster_run NAME HOSTS [HARNESS ARGS...]: a small `shoal-cluster run --no-baseline` of HOSTS
# hosts into $T/NAME; dies unless it exits 0. Sets R (its report.json) and WHY (empty, or why
# not every host completed with the right digests, or the registry sent more than
# MAX_COPIES); the cases append their own checks to WHY.
cluster_run() {
    local name=$1 hosts=$2 rc=0
    shift 2
    "$SHOAL_CLUSTER" run --hosts "$hosts" "$@" --no-baseline --timeout 90 --settle 2 --shoal "$SHOAL_BIN" \
        --imagegen "$SHOAL_IMAGEGEN" --out "$T/$name" >"$T/$name.log" 2>&1 || rc=$?
    sed 's/^/  | /' "$T/$name.log" >&2
    ((rc == 0)) || die "shoal-cluster run $* exited $rc: $(grep -m1 'shoal-cluster:' "$T/$name.log" || tail -n1 "$T/$name.log")"
    R=$T/$name/report.json
    WHY=''
    jq -e ".shoal.all_completed == true and .shoal.hosts_completed == $hosts and .shoal.digests_ok == true" "$R" >/dev/null ||
        WHY+="not every host completed with the right digests: $(jq -c '[.shoal.hosts[] | {host, ok, error, verified}]' "$R"); "
    jq -e ".shoal.upstream.copies >= 0.99 and .shoal.upstream.copies <= $MAX_COPIES" "$R" >/dev/null ||
        WHY+="registry sent $(jq '.shoal.upstream.copies' "$R") copies (each node alone would fetch a whole copy); "
    [[ -z $(leftovers "$(jq -r '.run' "$R" | sed 's/^shc-//')") ]] || WHY+="leftovers after the run; "
}

# --- f: sites -------------------------------------------------------------------------------------
sites_run() {
    cluster_run sites 4 --sites 2 --rate "$RATE" --wan-rate 200mbit --registry-rate "$RATE" \
        --image-size 16MiB --layers 2
    # a node of a two-host site is never a member; the peers' sites came from identify
    jq -e '([.shoal.hosts[].bytes_by_source.site_roles.gateway // 0] | add) >= 1 and ([.shoal.hosts[].bytes_by_source.site_roles.member // 0] | add) == 0' "$R" >/dev/null ||
        WHY+="site roles: $(jq -c '[.shoal.hosts[] | {host, roles: .bytes_by_source.site_roles}]' "$R"); "
    [[ -z $WHY ]] || die "$WHY"
}
run_case "$CASE_F" sites_run

# --- g, h: discovery without a bootstrap address --------------------------------------------------
# discovery_run NAME FLAG: a 3-host run with FLAG (the report's config.NAME); bytes from peers
# on every host, no hosts file left in /etc/netns.
discovery_run() {
    local name=$1 flag=$2 id
    cluster_run "$name" 3 "$flag" --rate "$RATE" --registry-rate "$RATE" --image-size 24MiB --layers 3
    jq -e ".config.${name} == true" "$R" >/dev/null || WHY+="the run's config does not say $name; "
    jq -e '[.shoal.hosts[] | select((.bytes_by_source.peers // 0) < 1)] | length == 0' "$R" >/dev/null ||
        WHY+="hosts without bytes from peers: $(jq -c '[.shoal.hosts[] | {host, src: .bytes_by_source}]' "$R"); "
    id=$(jq -r '.run' "$R" | sed 's/^shc-//')
    if compgen -G "/etc/netns/shc-$id-*" >/dev/null; then WHY+="hosts files left in /etc/netns; "; fi
    [[ -z $WHY ]] || die "$WHY"
}
run_case "$CASE_G" discovery_run mdns --mdns
run_case "$CASE_H" discovery_run dns_peers --dns-peers

e2e_finish
