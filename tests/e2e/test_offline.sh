#!/usr/bin/env bash
# Pull through shoal once (warming its cache), stop the upstream registry, and pull again by tag
# and by digest: shoal must serve everything from its store, byte-exact. The tag TTL is 1 s and
# the offline pulls start after it has run out, so tags are served as last-known-good (stale).
source "$(dirname "$0")/lib.sh"
e2e_init test_offline

start_registry REG
push_image "$REG" library/e2e-offline v1 --seed 201 --layers 3 --layer-size 2MiB
SINGLE=$PUSH_JSON
push_image "$REG" library/e2e-offline-multi v1 --seed 202 --layers 2 --layer-size 512KiB \
    --platform linux/amd64 --platform linux/arm64
MULTI=$PUSH_JSON

TTL=1
start_shoal SHOAL "$T/shoal-data" "$REG" --tag-ttl "$TTL"

# --- warm the cache (registry up) ---------------------------------------------------------------
run_case "online: skopeo copy e2e-offline:v1 via shoal" \
    skopeo_verify_pull "$SHOAL" library/e2e-offline v1 "$SINGLE"
run_case "online: skopeo copy --all e2e-offline-multi:v1 via shoal" \
    skopeo_verify_pull "$SHOAL" library/e2e-offline-multi v1 "$MULTI" --all

# containerd addresses shoal as a docker.io mirror (?ns=docker.io): warm that path too.
run_case "containerd: private daemon starts" start_containerd
CTD=0
if load_env containerd; then
    CTD=1
    run_case "online: ctr pull docker.io/library/e2e-offline:v1 via shoal" \
        ctr_verify "$SHOAL" library/e2e-offline:v1 "$SINGLE"
fi

# --- upstream gone -----------------------------------------------------------------------------
registry_down() {
    stop_registry REG
    local code
    code=$(http_code "http://$REG/v2/")
    [[ $code == 000 ]] || die "registry still answers ($code) after being stopped"
    sleep $((TTL + 1)) # every cached tag is now past its TTL
}
run_case "upstream registry stopped" registry_down

offline_skopeo() {
    need_shoal
    skopeo_verify_pull "$SHOAL" "$@"
}
run_case "offline: skopeo copy e2e-offline:v1 by tag" offline_skopeo library/e2e-offline v1 "$SINGLE"
run_case "offline: skopeo copy e2e-offline by digest" offline_skopeo library/e2e-offline v1 "$SINGLE" --by-digest
run_case "offline: skopeo copy --all e2e-offline-multi:v1 by tag" \
    offline_skopeo library/e2e-offline-multi v1 "$MULTI" --all
run_case "offline: skopeo copy --all e2e-offline-multi by digest" \
    offline_skopeo library/e2e-offline-multi v1 "$MULTI" --all --by-digest

offline_raw() {
    need_shoal
    local want got d
    want=$(jget "$SINGLE" .manifest_digest)
    got=$(fetch_manifest_digest "http://$SHOAL" library/e2e-offline v1)
    [[ $got == "$want" ]] || die "GET manifests/v1 body hashes to $got, want $want"
    got=$(fetch_manifest_digest "http://$SHOAL" library/e2e-offline "$want")
    [[ $got == "$want" ]] || die "GET manifests/$want body hashes to $got"
    # HEAD by tag must give the digest too (clients resolve tags with HEAD)
    local hdr
    hdr=$(curl -sS -I --max-time 20 \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
        "http://$SHOAL/v2/library/e2e-offline/manifests/v1" | tr -d '\r')
    grep -qi "^docker-content-digest: $want\$" <<<"$hdr" ||
        die "HEAD manifests/v1 offline lacks Docker-Content-Digest: $want; headers: $(tr '\n' '|' <<<"$hdr")"
    for d in $(image_platform_blobs "$SINGLE"); do
        fetch_verify_blob "http://$SHOAL" library/e2e-offline "$d"
    done
}
run_case "offline: raw GET/HEAD manifest by tag and digest, every blob by digest" offline_raw

offline_ctr() {
    need_shoal
    # a fresh containerd: nothing cached client-side, everything must come from shoal
    start_containerd containerd-offline
    ctr_verify "$SHOAL" library/e2e-offline:v1 "$SINGLE"
}
if [[ $CTD == 1 ]]; then
    run_case "offline: ctr pull docker.io/library/e2e-offline:v1 (?ns=docker.io) via shoal" offline_ctr
fi

not_cached() {
    need_shoal
    local code
    code=$(http_code "http://$SHOAL/v2/library/never-pushed/manifests/v1")
    [[ $code =~ ^(404|502|503|504)$ ]] || die "uncached manifest while offline -> HTTP $code (want 404 or 5xx)"
    pid_alive "$SHOAL_PID" || die "shoal died"
}
run_case "offline: uncached repo gives an error status, shoal stays up" not_cached

stale_counted() {
    need_shoal
    local n
    n=$(metric_value "$SHOAL" shoal_stale_tag_serves_total)
    ((n > 0)) || die "shoal_stale_tag_serves_total is $n after offline pulls by tag past the TTL"
    log "shoal_stale_tag_serves_total = $n"
}
run_case "offline: /metrics counts the stale tag serves" stale_counted

e2e_finish
