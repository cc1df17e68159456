#!/usr/bin/env bash
# Tag moves: with --tag-ttl 1, shoal must notice that the upstream tag now points at a different
# image once the TTL has passed (also when the new image is of another manifest type), while the
# old image stays pullable by digest.
source "$(dirname "$0")/lib.sh"
e2e_init test_repush

TTL=1
start_registry REG
push_image "$REG" library/e2e-repush v1 --seed 301 --layers 2 --layer-size 1MiB
A=$PUSH_JSON
start_shoal SHOAL "$T/shoal-data" "$REG" --tag-ttl "$TTL"

run_case "first pull of e2e-repush:v1 sees image A" \
    skopeo_verify_pull "$SHOAL" library/e2e-repush v1 "$A"

push_image "$REG" library/e2e-repush v1 --seed 302 --layers 2 --layer-size 1MiB
B=$PUSH_JSON
sleep $((TTL + 1)).5

run_case "after the TTL, pull by tag sees image B" \
    skopeo_verify_pull "$SHOAL" library/e2e-repush v1 "$B"
run_case "image A still pullable by digest" \
    skopeo_verify_pull "$SHOAL" library/e2e-repush v1 "$A" --by-digest

raw_tag_is() {
    local json=$1 want got
    want=$(jget "$json" .manifest_digest)
    got=$(fetch_manifest_digest "http://$SHOAL" library/e2e-repush v1)
    [[ $got == "$want" ]] || die "GET manifests/v1 -> $got, want $want"
}
run_case "raw GET manifests/v1 returns image B" raw_tag_is "$B"

# Re-push the tag as a multi-arch index (manifest type changes under the same tag).
push_image "$REG" library/e2e-repush v1 --seed 303 --layers 2 --layer-size 256KiB \
    --platform linux/amd64 --platform linux/arm64
C=$PUSH_JSON
sleep $((TTL + 1)).5
run_case "after the TTL, the tag turned index is seen (skopeo --all)" \
    skopeo_verify_pull "$SHOAL" library/e2e-repush v1 "$C" --all

# And back to a single Docker-format manifest.
push_image "$REG" library/e2e-repush v1 --seed 304 --layers 1 --layer-size 256KiB --format docker
D=$PUSH_JSON
sleep $((TTL + 1)).5
run_case "after the TTL, the tag turned Docker schema 2 manifest is seen" \
    skopeo_verify_pull "$SHOAL" library/e2e-repush v1 "$D"

# Tag deleted upstream (registry delete of the manifest the tag points to).
delete_tag() {
    local want code
    want=$(jget "$D" .manifest_digest)
    code=$(http_code "http://$REG/v2/library/e2e-repush/manifests/$want" -X DELETE)
    [[ $code == 202 ]] || die "registry DELETE manifest -> HTTP $code"
    code=$(http_code "http://$REG/v2/library/e2e-repush/manifests/v1")
    [[ $code == 404 ]] || die "registry still serves the deleted tag (HTTP $code)"
}
run_case "upstream: delete the manifest behind tag v1" delete_tag

deleted_seen() {
    need_shoal
    sleep $((TTL + 1)).5
    local code
    code=$(http_code "http://$SHOAL/v2/library/e2e-repush/manifests/v1" \
        -H 'Accept: application/vnd.docker.distribution.manifest.v2+json')
    [[ $code == 404 ]] || die "shoal answers the upstream-deleted tag with HTTP $code after the TTL (want 404)"
}
run_case "after the TTL, shoal reports the deleted tag as 404" deleted_seen

e2e_finish
