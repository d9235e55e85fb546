#!/usr/bin/env bash
# Installs everything replfs and its tests need on a Debian 12 machine (run as root),
# and creates the virtual environment .venv/ with replfs installed in it (editable).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
      qemu-utils libnbd-bin python3-libnbd nbdkit fio e2fsprogs util-linux openssl)

missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's python3, so that python3-libnbd (a Debian package) is importable in the venv.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c 'import replfs, pyfuse3, trio, xxhash, rich, prometheus_client, pytest, hypothesis, pytest_timeout' 2>/dev/null; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
fi
