#!/bin/sh
# Take away what make install-system made (docs/SECURITY.md). As root, with the install's PREFIX:
#   make uninstall-system [PREFIX=/opt/memcr]
# which runs this script. It removes the install in PREFIX (the launcher with its capability, the
# virtual environment, the units, the folders' list) and what PREFIX/share/memcr-installed says the
# install made besides: the folders, with the dumps and sockets in them; the memberships; the users and
# groups. What the install found there already it keeps. It says what it removed.
# A user or group that a process still runs with is refused before anything is removed: once removed,
# its number may go to a new user or group, who would then share that process's rights.
set -eu
prefix=${PREFIX:-/opt/memcr}
installed=$prefix/share/memcr-installed

say() { echo "uninstall-system: $*"; }
fail() { echo "uninstall-system: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it removes users and groups)"
[ -f "$installed" ] || fail "no $installed: PREFIX=$prefix is no install of make install-system (give its PREFIX)"

# the lines of what the install made, of one kind: "user NAME", "group NAME", "member USER GROUP", "folder PATH"
listed() {
    sed -n "s/^$1 //p" "$installed"
}
# the processes that run with NUMBER among their user ids (Uid), or their group ids (Gid), supplementary included
running_with() {  # Uid|Gid NUMBER
    for status in /proc/[0-9]*/status; do
        awk -v field="$1:" -v id="$2" '$1 == field || ($1 == "Groups:" && field == "Gid:") {
            for (i = 2; i <= NF; i++) if ($i == id) held = 1 } END { exit !held }' "$status" 2>/dev/null || continue
        pid=${status#/proc/}
        printf '%s ' "${pid%/status}"
    done
}
for name in $(listed user); do
    uid=$(id -u "$name" 2>/dev/null) || continue
    pids=$(running_with Uid "$uid")
    [ -z "$pids" ] || fail "user $name (uid $uid) runs the processes ${pids}(ps -fp '${pids% }'): stop them (the" \
        "daemon: systemctl stop memcr.socket memcr.service), then uninstall again"
done
for name in $(listed group); do
    getent group "$name" >/dev/null || continue
    gid=$(getent group "$name" | cut -d: -f3)
    pids=$(running_with Gid "$gid")
    [ -z "$pids" ] || fail "group $name (gid $gid) is a group of the processes ${pids}(ps -fp '${pids% }'): stop" \
        "them, or start them again once their users are out of it (gpasswd -d USER $name), then uninstall again"
    owners=$(getent passwd | awk -F: -v gid="$gid" '$4 == gid { print $1 }' | grep -vxF "$(listed user)" |
        tr '\n' ' ' || true)
    [ -z "$owners" ] || fail "group $name (gid $gid) is the primary group of the users ${owners}which the" \
        "install did not make: give them another (usermod -g GROUP USER), then uninstall again"
done
for copy in /etc/systemd/system/memcr.service /etc/systemd/system/memcr.socket /etc/tmpfiles.d/memcr*.conf; do
    if [ -e "$copy" ] && grep -qF "$prefix/" "$copy"; then
        say "warning: $copy names this install, which goes now: remove it (a unit after systemctl disable" \
            "--now memcr.socket memcr.service)"
    fi
done

for folder in $(listed folder); do
    [ -e "$folder" ] || continue
    rm -rf -- "$folder"
    say "removed the folder $folder and what it held"
done
for pair in $(listed member | tr ' ' ':'); do
    name=${pair%%:*} group=${pair#*:}
    # a user or a group that goes takes the membership with it
    if ! listed user | grep -qxF "$name" && ! listed group | grep -qxF "$group" && id -nG "$name" 2>/dev/null |
        tr ' ' '\n' | grep -qxF "$group"; then
        gpasswd -d "$name" "$group" >/dev/null
        say "took user $name out of group $group"
    fi
done
# the install's groups still here, before userdel takes one of them (below)
groups=$(for name in $(listed group); do if getent group "$name" >/dev/null; then echo "$name"; fi; done)
for name in $(listed user); do
    getent passwd "$name" >/dev/null || continue
    userdel "$name"
    say "removed user $name"
done
for name in $groups; do
    # userdel removes the user's primary group too when it bears the user's name (USERGROUPS_ENAB)
    ! getent group "$name" >/dev/null || groupdel "$name"
    say "removed group $name"
done
rm -rf -- "$prefix/venv"
rm -f -- "$prefix/bin/memcr" "$prefix/bin/memcr-client" "$prefix/share/memcr.service" "$prefix/share/memcr.socket" \
    "$prefix/share/memcr-tmpfiles.conf" "$installed"
say "removed the install in $prefix: the launcher with CAP_SYS_PTRACE, the virtual environment, memcr-client," \
    "the units and the folders' list"
for folder in "$prefix/bin" "$prefix/share" "$prefix"; do
    rmdir -- "$folder" 2>/dev/null || say "kept $folder: it holds other files"
done
