#!/bin/sh
# Install the real apps the app suite parks (tests/apps), when missing:
# a JDK (javac and java), Node.js, redis and nginx, from Debian packages.
# Their services are not started: the tests run their own copies.
set -eu
need=""
for tool in javac:default-jdk-headless node:nodejs redis-server:redis-server nginx:nginx-light; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || need="$need ${tool#*:}"
done
[ -z "$need" ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "memcr: the app suite needs:$need (install them, then retry)" >&2
    exit 1
fi
echo "memcr: installing the apps the app suite parks:$need"
# no package may start its service: policy-rc.d says no for the install's length
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
