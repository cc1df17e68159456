#!/usr/bin/env bash
# Crash safety: while shoal is streaming a large image (3 x 64 MiB layers, fetched through a
# rate-limited proxy so the upstream transfer is still running), kill -9 it; restart it on the same
# data dir and require that every blob it then serves hashes to its digest, that the bytes served
# before the crash were a correct prefix, and that it still answers /metrics.
source "$(dirname "$0")/lib.sh"
e2e_init test_kill9

LAYER_SIZE=${E2E_KILL9_LAYER_SIZE:-64MiB}
RATE=${E2E_KILL9_RATE:-$((24 << 20))} # bytes/s per upstream connection

start_registry REG
push_image "$REG" library/e2e-big v1 --seed 401 --layers 3 --layer-size "$LAYER_SIZE"
BIG=$PUSH_JSON
BIGDIR=$GEN_DIR
start_throttle UP "$REG" "$RATE"
DATA=$T/shoal-data
start_shoal SHOAL "$DATA" "$UP"

LAYERS=$(jq -r '.manifests[0].layers[]' "$BIG")

# blob_file DIGEST: the generated blob in the OCI layout.
blob_file() { echo "$BIGDIR/blobs/sha256/${1#sha256:}"; }

kill_mid_transfer() {
    need_shoal
    local d i=0 pids=() total size want incomplete=0
    mkdir -p "$T/partial"
    # resolve the tag first, like a client would
    [[ $(fetch_manifest_digest "http://$SHOAL" library/e2e-big v1) == "$(jget "$BIG" .manifest_digest)" ]] ||
        die "manifest via shoal does not match"
    for d in $LAYERS; do
        curl -sS --max-time 120 -o "$T/partial/$i" "http://$SHOAL/v2/library/e2e-big/blobs/$d" \
            >"$T/partial/$i.log" 2>&1 &
        pids+=($!)
        register_pid "${pids[-1]}" "curl-$i"
        i=$((i + 1))
    done
    # wait until some data has flowed (at least 4 MiB in total), then crash shoal
    partial_total() { cat "$T"/partial/[0-9] 2>/dev/null | wc -c; }
    enough_flowed() { (($(partial_total) >= 4 << 20)); }
    wait_until 60 enough_flowed ||
        die "no data flowed through shoal within 60 s ($(partial_total) bytes)"
    stop_shoal SHOAL KILL
    total=$(partial_total)
    log "killed shoal (pid $SHOAL_PID) with SIGKILL after $total bytes had reached the clients"
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    i=0
    for d in $LAYERS; do
        size=$(stat -c %s "$T/partial/$i")
        want=$(stat -c %s "$(blob_file "$d")")
        if ((size < want)); then incomplete=$((incomplete + 1)); fi
        # whatever was served before the crash must be a prefix of the real blob
        if ((size > 0)) && ! cmp -s -n "$size" "$T/partial/$i" "$(blob_file "$d")"; then
            die "before the crash shoal served $size bytes of $d that are NOT a prefix of the blob"
        fi
        if ((size == want)) && [[ $(sha256_of "$T/partial/$i") != "$d" ]]; then
            die "blob $d served complete before the crash but hashes wrong"
        fi
        i=$((i + 1))
    done
    ((incomplete > 0)) || die "every blob had been fully served before the kill: not a mid-transfer crash (raise the layer size or lower E2E_KILL9_RATE)"
    log "$incomplete of 3 layer transfers were cut by the crash"
}
run_case "kill -9 shoal in the middle of 3 x $LAYER_SIZE blob transfers" kill_mid_transfer

restart() {
    need_shoal
    start_shoal SHOAL "$DATA" "$UP"
    save_env shoal SHOAL SHOAL_PID SHOAL_LOG
}
run_case "restart shoal on the same data dir" restart
load_env shoal || true

every_blob_verifies() {
    need_shoal
    local d
    for d in $LAYERS $(jq -r '.manifests[0].config' "$BIG"); do
        fetch_verify_blob "http://$SHOAL" library/e2e-big "$d"
    done
    # and twice (the second time from shoal's store for sure)
    for d in $LAYERS; do
        fetch_verify_blob "http://$SHOAL" library/e2e-big "$d"
    done
}
run_case "after restart: every blob by digest hashes to its digest (twice)" every_blob_verifies

manifest_verifies() {
    need_shoal
    local want
    want=$(jget "$BIG" .manifest_digest)
    [[ $(fetch_manifest_digest "http://$SHOAL" library/e2e-big v1) == "$want" ]] || die "manifest by tag differs"
    [[ $(fetch_manifest_digest "http://$SHOAL" library/e2e-big "$want") == "$want" ]] || die "manifest by digest differs"
}
run_case "after restart: manifest by tag and by digest" manifest_verifies

run_case "after restart: skopeo copy of the whole image verifies" \
    skopeo_verify_pull "$SHOAL" library/e2e-big v1 "$BIG"

# Range requests (used by resuming clients) must return the right bytes too.
range_ok() {
    need_shoal
    local d f code
    d=$(head -n1 <<<"$LAYERS")
    f=$(mktemp "$T/range.XXXXXX")
    code=$(curl -sS -o "$f" -w '%{http_code}' --max-time 60 -H 'Range: bytes=1000000-1999999' \
        "http://$SHOAL/v2/library/e2e-big/blobs/$d")
    case $code in
        206) cmp -s "$f" <(tail -c +1000001 "$(blob_file "$d")" | head -c 1000000) || die "206 range body is wrong" ;;
        200) [[ $(sha256_of "$f") == "$d" ]] || die "200 (range ignored) body is wrong" ;;
        *) die "range GET -> HTTP $code" ;;
    esac
}
run_case "after restart: a Range request returns the right bytes" range_ok

metrics_sane() {
    need_shoal
    local f code bad
    f=$(mktemp "$T/metrics.XXXXXX")
    code=$(curl -sS -o "$f" -w '%{http_code}' --max-time 10 "http://$SHOAL/metrics")
    [[ $code == 200 ]] || die "GET /metrics -> HTTP $code"
    grep -iE '^[a-z_:]*(corrupt|mismatch|verif|integrity|torn|partial|quarantin)' "$f" | sed 's/^/  metric: /' >&2 || true
    # The upstream only ever sent correct bytes, so a digest mismatch can only come from shoal
    # mixing up its own (partial) files around the crash.
    bad=$(awk '/^[a-z_:]*(corrupt|mismatch)[a-z_:]*({[^}]*})? / && $NF + 0 > 0' "$f")
    [[ -z $bad ]] || die "integrity counters are non-zero after the crash: $(tr '\n' ' ' <<<"$bad")"
    pid_alive "$SHOAL_PID" || die "shoal died"
}
run_case "after restart: /metrics answers, no digest mismatch / corruption counted" metrics_sane

e2e_finish
