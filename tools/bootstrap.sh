#!/usr/bin/env bash
# Prepare a fresh Debian bookworm machine for pyiommufd: the system packages
# the VM tier and the conformance probe need, then pyiommufd itself (editable,
# with the test extra). Safe to run again: it installs only what is missing.
# Linux 7.3 sources and headers are fetched later, on demand, from
# trixie-backports through a private apt configuration (pyiommufd.vm.debian),
# never by adding that suite to this machine's apt sources.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 kexec-tools busybox-static flex bison bc libelf-dev libssl-dev cpio gcc make xz-utils)
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

python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import pyiommufd._uapi" || { echo "bootstrap: pyiommufd._uapi was not generated" >&2; exit 1; }
