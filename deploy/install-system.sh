#!/bin/sh
# Install a self-contained memcr for a non-root deployment (docs/SECURITY.md). As root:
#   make install-system [PREFIX=/opt/memcr MEMCR_USER=memcr MEMCR_GROUP=memcr MEMCR_CLIENTS=memcr-clients
#                        MEMCR_TARGETS=memcr-targets MEMCR_RUN=/run/memcr MEMCR_STATE=/var/lib/memcr
#                        MEMCR_ALLOW_TMP_PREFIX=1 (folders the units cannot see: for a start by hand)]
# which runs this script with those variables. It makes whatever of these is missing, and says so:
# the daemon's user, and its group, which alone may start the launcher that holds CAP_SYS_PTRACE;
# the clients' group (-g) and the targets' group (-G), which are other groups; the folders; the
# virtual environment, the launcher and the systemd units, which name all of them. The users, groups,
# memberships and folders it made are listed in PREFIX/share/memcr-installed, for make uninstall-system.
set -eu
# what this script makes is root's and writable by root alone, whatever umask it was started with
umask 022
prefix=${PREFIX:-/opt/memcr}
user=${MEMCR_USER:-memcr}
group=${MEMCR_GROUP:-memcr}
clients=${MEMCR_CLIENTS:-memcr-clients}
targets=${MEMCR_TARGETS:-memcr-targets}
run=${MEMCR_RUN:-/run/memcr}
state=${MEMCR_STATE:-/var/lib/memcr}
python=${MEMCR_PYTHON:-/usr/bin/python3}
here=$(cd "$(dirname "$0")/.." && pwd)
installed=$prefix/share/memcr-installed

say() { echo "install-system: $*"; }
fail() { echo "install-system: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it makes users and groups and sets a file capability)"
[ -x "$python" ] || fail "$python missing: install Debian's python3 and python3-venv"
tmpfiles=$(command -v systemd-tmpfiles) || fail "systemd-tmpfiles missing (Debian: systemd): it makes memcr's folders"
# the launcher's group is the power to read and write every process: no group the docs give others to join
for other in "$clients" "$targets"; do
    [ "$other" != "$group" ] || fail "MEMCR_GROUP=$group may start the launcher, which holds CAP_SYS_PTRACE:" \
        "the clients' group (MEMCR_CLIENTS) and the targets' group (MEMCR_TARGETS) must be other groups"
done
# the targets' users join the targets' group: were it the clients' too, each of them could drive the daemon
[ "$clients" != "$targets" ] || fail "MEMCR_CLIENTS=$clients and MEMCR_TARGETS=$targets are one group: every" \
    "user whose processes memcr parks would then drive the daemon, and so park any process, root's included:" \
    "give the clients and the targets a group each"
for variable in PREFIX="$prefix" MEMCR_RUN="$run" MEMCR_STATE="$state"; do
    case ${variable#*=} in
        /*/ | *//* | */./* | */. | */../* | */..) ;;
        /?*) continue ;;
    esac
    fail "$variable: give the folder as an absolute path without '.', '..', '//' or a trailing '/'"
done

# memcr.service runs with PrivateTmp=yes (a /tmp and /var/tmp of its own) and ProtectHome=yes (no /home,
# /root or /run/user): it could not start memcr from there, nor reach its folders
hidden=
for variable in PREFIX="$prefix" MEMCR_RUN="$run" MEMCR_STATE="$state"; do
    case ${variable#*=}/ in
        /tmp/* | /var/tmp/* | /home/* | /root/* | /run/user/*) hidden="$hidden $variable" ;;
    esac
done
if [ -n "$hidden" ]; then
    [ "${MEMCR_ALLOW_TMP_PREFIX:-}" = 1 ] || fail "${hidden# }: memcr.service cannot see /tmp, /var/tmp" \
        "(PrivateTmp=yes), /home, /root or /run/user (ProtectHome=yes), so the units could not start memcr: choose" \
        "other folders, or set MEMCR_ALLOW_TMP_PREFIX=1 to install for a start by hand only"
    say "WARNING:$hidden: memcr.service cannot see /tmp, /var/tmp, /home, /root or /run/user, so the units" \
        "in $prefix/share cannot start this memcr: start it by hand only (MEMCR_ALLOW_TMP_PREFIX=1)"
fi

# PREFIX holds what the launcher runs with CAP_SYS_PTRACE; MEMCR_RUN and MEMCR_STATE, memcr's sockets and
# dumps. Whoever owns one of them or a folder above, or may write in it, could swap what it holds (say
# PREFIX/venv/bin/python for a program of theirs), so, as memcr judges a dump folder a client names, each
# folder on the way must be root's and writable by root alone, or sticky (as /tmp) above the install's
# folder: nobody else may rename what is root's in it. MEMCR_RUN and MEMCR_STATE, which the install gives
# the daemon's user, may be its already.
check_folders() {  # VARIABLE FOLDER WHAT [UID that may own FOLDER itself besides root]
    walk=$2
    while :; do
        if [ -e "$walk" ] || [ -L "$walk" ]; then
            read -r uid owner raw perms <<EOF
$(stat -c '%u %U %f %a' -- "$walk")
EOF
            where="$1=$2: $walk"
            if [ $((0x$raw & 0170000)) -eq $((0120000)) ]; then
                fail "$where is a symlink, which its owner or whoever may write in its folder could point" \
                    "elsewhere: give the real path ($(realpath -m -- "$2"))"
            fi
            [ $((0x$raw & 0170000)) -eq $((0040000)) ] || fail "$where is not a folder"
            if [ "$uid" -ne 0 ] && { [ "$walk" != "$2" ] || [ "$uid" != "${4:-0}" ]; }; then
                fail "$where belongs to user $owner (uid $uid), who could swap $3 in it: choose folders of" \
                    "root's, or make them so once you trust what they hold (chown root $walk)"
            fi
            if [ $((0x$raw & 022)) -ne 0 ] && { [ "$walk" = "$2" ] || [ $((0x$raw & 01000)) -eq 0 ]; }; then
                fail "$where may be written by users other than its owner (mode $perms), who could swap $3" \
                    "in it: take that right away (chmod go-w $walk) or choose other folders"
            fi
        fi
        [ "$walk" != / ] || break
        walk=$(dirname -- "$walk")
    done
}
daemon_uid=$(id -u "$user" 2>/dev/null) || daemon_uid=0
check_folders PREFIX "$prefix" "the programs the launcher runs with CAP_SYS_PTRACE"
check_folders MEMCR_RUN "$run" "memcr's sockets" "$daemon_uid"
check_folders MEMCR_STATE "$state" "memcr's dumps" "$daemon_uid"
if [ -d "$prefix" ]; then
    strangers=$(find "$prefix" ! -user 0 | head -n 3 | tr '\n' ' ')
    [ -z "$strangers" ] || fail "PREFIX=$prefix holds files that are not root's, whose owners could have swapped" \
        "what the launcher runs: ${strangers}(find $prefix ! -user root): remove them, or choose another PREFIX"
fi
mkdir -p "$prefix/share"
# a prefix made just now under a sticky folder: someone may have made it first
check_folders PREFIX "$prefix" "the programs the launcher runs with CAP_SYS_PTRACE"

# what the install made outside PREFIX, a line each, for make uninstall-system to take away that and no more
made() {
    echo "$*" >>"$installed"
}
make_group() {
    getent group "$1" >/dev/null && return
    groupadd --system "$1"
    made group "$1"
    say "created group $1: $2"
}
make_group "$group" "the daemon's user's; only it may start the launcher"
make_group "$clients" "the clients' (-g): add each user who may ask the daemon"
make_group "$targets" "the targets' (-G): add each user whose processes the daemon parks"
if ! getent passwd "$user" >/dev/null; then
    useradd --system --gid "$group" --home-dir "$state" --no-create-home --shell /usr/sbin/nologin "$user"
    made user "$user"
    say "created user $user, the daemon's, of group $group"
fi
# the launcher's group to start it; -g's, to give its socket that group; -G's, to reach the parasites' sockets
for needed in "$group" "$clients" "$targets"; do
    if ! id -nG "$user" | tr ' ' '\n' | grep -qx "$needed"; then
        usermod -aG "$needed" "$user"
        made member "$user" "$needed"
        say "added user $user to group $needed"
    fi
done
gid=$(getent group "$group" | cut -d: -f3)
others=$({ getent group "$group" | cut -d: -f4 | tr ',' '\n'; getent passwd | awk -F: -v gid="$gid" '$4 == gid { print $1 }'; } |
    grep -vx -e "$user" -e '' | sort -u | tr '\n' ' ' || true)
[ -z "$others" ] || say "warning: besides $user, these users are in group $group and so may start the launcher," \
    "which holds CAP_SYS_PTRACE (they could freeze, read and kill any process): ${others}(gpasswd -d USER $group)"

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

mkdir -p "$prefix/bin"
gcc -O2 -Wall -Wextra -Werror -DPYTHON="\"$prefix/venv/bin/python\"" \
    -o "$prefix/bin/memcr.new" "$here/deploy/memcr-launch.c"
# only GROUP, the daemon's user's, may start a program that can read every process's memory
chown root:"$group" "$prefix/bin/memcr.new"
chmod 0750 "$prefix/bin/memcr.new"
setcap cap_sys_ptrace=ep "$prefix/bin/memcr.new"
mv "$prefix/bin/memcr.new" "$prefix/bin/memcr"
ln -sf ../venv/bin/memcr-client "$prefix/bin/memcr-client"
for file in memcr.service memcr.socket memcr-tmpfiles.conf; do
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@USER@|$user|g" -e "s|@GROUP@|$group|g" -e "s|@CLIENTS@|$clients|g" \
        -e "s|@TARGETS@|$targets|g" -e "s|@RUN@|$run|g" -e "s|@STATE@|$state|g" -e "s|@TMPFILES@|$tmpfiles|g" \
        "$here/deploy/$file" > "$prefix/share/$file"
done
chmod -R go-w "$prefix"
chmod -R a+rX "$prefix/venv" "$prefix/share"

missing=
for folder in "$run" "$run/targets" "$state"; do
    [ -e "$folder" ] || missing="$missing $folder"
done
"$tmpfiles" --create "$prefix/share/memcr-tmpfiles.conf"
for folder in $missing; do
    made folder "$folder"
done
[ -z "$missing" ] || say "created the folders$missing ($prefix/share/memcr-tmpfiles.conf lists them)"
say "memcr in $prefix/bin (the launcher, with CAP_SYS_PTRACE for group $group alone; memcr-client);" \
    "in $prefix/share the units memcr.service and memcr.socket, and memcr-tmpfiles.conf"
say "next, for each user whose processes memcr parks: usermod -aG $targets USER; for each who asks it:" \
    "usermod -aG $clients USER. Then start it (docs/SECURITY.md):"
say "  runuser -u $user -- $prefix/bin/memcr -l $run/memcr.sock -g $clients -S $run/targets -G $targets -d $state"
