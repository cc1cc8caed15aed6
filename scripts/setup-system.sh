#!/bin/sh
# Install the system packages memcr needs to build and test, when missing.
# Runs as root on Debian/Ubuntu; elsewhere it only says what is missing.
set -eu
need=""
for tool in gcc:gcc make:make ld:binutils objcopy:binutils nm:binutils unshare:util-linux mount:mount \
    setpriv:util-linux setcap:libcap2-bin strace:strace useradd:passwd pkill:procps; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need="$need ${tool#*:}"
done
[ -e /usr/include/linux/socket.h ] || need="$need linux-libc-dev libc6-dev"
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need="$need python3 python3-venv"
[ -z "$need" ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "memcr: missing system packages:$need (install them, then retry)" >&2
    exit 1
fi
echo "memcr: installing system packages:$need"
apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
