#!/usr/bin/env bash
# Prepare a Debian bookworm machine for pyiommufd: the system packages (Python
# and venv, the VM tier's QEMU, kexec-tools and kernel build dependencies, gcc
# for the conformance probe), then pyiommufd itself, editable with the test
# extra, in the virtual environment .venv of this checkout (PEP 668: nothing
# is installed into the system's Python). The test harness (the fake kernel,
# the pytest plugin) is the second distribution in testing/, installed
# editable alongside. Safe to run again.
#
# Afterwards: .venv/bin/pyiommufd and .venv/bin/python -m pytest.
# PYTHON=/path/to/python3 picks the interpreter the venv is made from
# (default: python3 on PATH, installed from Debian if missing).
#
# Linux 7.3 sources and headers are fetched later, on demand, from
# trixie-backports through a private apt configuration (pyiommufd.vm.debian),
# never by adding that suite to this machine's apt sources.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
python=${PYTHON:-python3}

packages=(python3 python3-venv qemu-system-x86 kexec-tools busybox-static
          flex bison bc libelf-dev libssl-dev cpio gcc libc6-dev make xz-utils patch ccache)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v "$python" >/dev/null || { echo "bootstrap: $python not found" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "bootstrap: $python is $("$python" -V 2>&1); pyiommufd needs Python 3.11 or later" >&2; exit 1; }

# Reuse .venv only if its interpreter still runs (a removed pyenv version breaks it).
if ! "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
    echo "bootstrap: creating $venv with $(command -v "$python") ($("$python" -V 2>&1))"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi

# Two calls: pip 23 finds no pyiommufd for testing/'s dependency when the same
# call names '.[test]'. The second call finds the extra's pyiommufd-testing
# already satisfied by the local testing/.
echo "bootstrap: pip install -e . -e ./testing, then -e '.[test]', into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e . -e ./testing
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
"$venv/bin/python" -c "import pyiommufd._uapi" \
    || { echo "bootstrap: pip succeeded but pyiommufd._uapi cannot be imported" >&2; exit 1; }
echo "bootstrap: ready: $venv/bin/pyiommufd, $venv/bin/python -m pytest"
