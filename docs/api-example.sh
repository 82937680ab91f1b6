#!/bin/sh
# One image through warmfleet's HTTP API with curl (and jq): queue a job, wait for it, download its image.
# WARMFLEET_API: the API's URL (`warmfleet up` prints it; default port 9820); WARMFLEET_KEY: from `warmfleet api-key add`.
set -eu
API=${WARMFLEET_API:-http://127.0.0.1:9820}
id=$(curl -sf -H "Authorization: Bearer $WARMFLEET_KEY" -H 'Content-Type: application/json' \
     -d '{"prompt": "a red circle on the left", "seed": 7}' "$API/v1/generations" | jq -r .id)
result=$(curl -sf -H "Authorization: Bearer $WARMFLEET_KEY" "$API/v1/generations/$id?wait=30")
echo "$result" | jq -c '{status, release: .result.release, seed: .result.seed}'
curl -sf -o "$id.png" "$(echo "$result" | jq -r .image_url)"
echo "saved $id.png"
