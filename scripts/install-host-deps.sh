#!/usr/bin/env bash
# Install what qvirtd and its tests need from Debian, if it is missing: QEMU, qemu-img, the
# UEFI firmware (ovmf) for `firmware: uefi`, python3-venv (Debian's python3 cannot make a
# virtualenv without it), systemd-analyze (the unit files are verified by the tests), mkfs.fat
# (dosfstools) and mcopy (mtools) with which tests/guest/build_guest.py makes the test guest's
# EFI system partitions, and genisoimage, with which the tests make cidata CDs.
# Runs apt-get update once, only when something has to be installed. Needs root for that.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
# mkfs.fat lives in /usr/sbin, which a user's PATH may lack.
command -v mkfs.fat >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.fat ] || [ -x /sbin/mkfs.fat ] || need+=(dosfstools)
command -v mcopy >/dev/null 2>&1 || need+=(mtools)
command -v genisoimage >/dev/null 2>&1 || need+=(genisoimage)
"${PYTHON:-python3}" -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-host-deps: missing ${need[*]}; run as root or install them with apt-get" >&2
    exit 1
fi
echo "install-host-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
