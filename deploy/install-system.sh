#!/bin/sh
# Install a self-contained memcr that any member of GROUP can run with
# CAP_SYS_PTRACE and nothing else (see docs/SECURITY.md). Run as root:
#   sh deploy/install-system.sh PREFIX GROUP [PYTHON]
set -eu
prefix=$1
group=$2
python=${3:-/usr/bin/python3}
here=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" -eq 0 ] || { echo "install-system: run as root (it sets a file capability)" >&2; exit 1; }
[ -x "$python" ] || { echo "install-system: $python missing: install Debian's python3 and python3-venv" >&2; exit 1; }
getent group "$group" >/dev/null || groupadd --system "$group"

# a venv on the system interpreter: one under /root would be unreachable for other users
"$python" -m venv --clear "$prefix/venv"
"$prefix/venv/bin/python" -m pip install -q --upgrade pip
# the client distribution from this tree too: memcr depends on it, and it is not on PyPI. Built from a
# copy: its folder is the package itself, and a build would leave a second copy of it inside
client=$(mktemp -d)
trap 'rm -rf "$client"' EXIT
cp -R "$here/memcr_client" "$client/"
rm -rf "$client/memcr_client/build" "$client/memcr_client/"*.egg-info
"$prefix/venv/bin/python" -m pip install -q "$client/memcr_client" "$here"

mkdir -p "$prefix/bin" "$prefix/share"
gcc -O2 -Wall -Wextra -Werror -DPYTHON="\"$prefix/venv/bin/python\"" \
    -o "$prefix/bin/memcr.new" "$here/deploy/memcr-launch.c"
# only GROUP may start a program that can read every process's memory
chown root:"$group" "$prefix/bin/memcr.new"
chmod 0750 "$prefix/bin/memcr.new"
setcap cap_sys_ptrace=ep "$prefix/bin/memcr.new"
mv "$prefix/bin/memcr.new" "$prefix/bin/memcr"
ln -sf ../venv/bin/memcr-client "$prefix/bin/memcr-client"
for unit in memcr.service memcr.socket; do
    sed "s|@PREFIX@|$prefix|g; s|@GROUP@|$group|g" "$here/deploy/$unit" > "$prefix/share/$unit"
done
chmod -R go-w "$prefix"
chmod -R a+rX "$prefix/venv" "$prefix/share"
echo "install-system: memcr in $prefix/bin (CAP_SYS_PTRACE, group $group); units in $prefix/share (memcr.service, memcr.socket)"
