#!/usr/bin/env bash
# Re-resolve the locks from pyproject.toml's ranges and the *.in files here (./fleet lock). Run it when a range
# or an input changes, after `./fleet test --latest` has passed on the versions it will pick up.
#   dev.txt   CI, the demo, contributors: runtime + test + bench tools, the CPU torch wheel (Python 3.11)
#   cpu.txt   the slim image (docker/Dockerfile): runtime only, the same pins as dev.txt
#   cuda.txt  the GPU image (docker/Dockerfile.gpu, Python 3.12): runtime only, the same pins but torch's CUDA build
#   validators.txt  the deployment validators' own venv (.fleet/validators; docker/validators/install.sh)
# Every line carries its sha256 hashes; installs use `pip install --require-hashes --no-deps -r <lock>`.
set -euo pipefail
cd "$(dirname "$0")"
TOOLS=../.fleet/lock-tools
if [ ! -x "$TOOLS/bin/uv" ]; then python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q "uv>=0.9,<1"; fi
UV="$TOOLS/bin/uv"
common=(--overrides overrides.txt --generate-hashes --no-header --python-platform x86_64-manylinux_2_28 -q)
# the CPU wheel of torch (torch==X+cpu) is found in the machine's wheel folder (pip's find-links) when set
links=()
for d in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$d"); done
"$UV" pip compile ../pyproject.toml cpu.in build.in --extra test --extra bench "${common[@]}" "${links[@]}" \
  --python-version 3.11 -o dev.txt
pins=$(mktemp); trap 'rm -f "$pins" "$pins.cuda"' EXIT
grep -E '^[A-Za-z]' dev.txt | sed 's/ \\$//' > "$pins"
grep -v '^torch==' "$pins" > "$pins.cuda"
"$UV" pip compile ../pyproject.toml cpu.in build.in "${common[@]}" "${links[@]}" --constraints "$pins" \
  --python-version 3.11 -o cpu.txt
"$UV" pip compile ../pyproject.toml cuda.in build.in "${common[@]}" --constraints "$pins.cuda" \
  --python-version 3.12 -o cuda.txt
"$UV" pip compile validators.in --generate-hashes --no-header -q --python-version 3.11 -o validators.txt
echo "locked: $(grep -cE '^[A-Za-z]' dev.txt) packages (dev), $(grep -cE '^[A-Za-z]' cpu.txt) (cpu), $(grep -cE '^[A-Za-z]' cuda.txt) (cuda)"
