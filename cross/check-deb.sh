#!/usr/bin/env bash
# The package test: installs a nanodetd .deb into a throw-away root with
# dpkg itself (--root, maintainer scripts run chrootless with DPKG_ROOT
# set), and checks the file list, the conffile, the system user, that
# nothing was enabled, that an upgrade keeps an edited config, and that
# remove and purge take away what they should. Needs root (dpkg --root,
# useradd --root).
#
# Usage: cross/check-deb.sh target/debian/nanodetd_<version>_amd64.deb
set -euo pipefail
deb=$(realpath "$1")
arch=$(dpkg-deb -f "$deb" Architecture)
root=$(mktemp -d /tmp/nanodetd-deb-root.XXXXXX)
trap 'rm -rf "$root" "$root.log"' EXIT
failures=0
check() {
    local what=$1
    shift
    if "$@"; then
        echo "ok   $what"
    else
        echo "FAIL $what"
        failures=$((failures + 1))
    fi
}

# --- The archive itself.
contents=$(dpkg-deb -c "$deb" | awk '{print $1, $6}')
has() { grep -qx -- "$1" <<<"$contents"; }
check "binary at /usr/bin/nanodetd, mode 755" has "-rwxr-xr-x ./usr/bin/nanodetd"
check "config at /etc/nanodetd/nanodetd.toml, mode 644" has "-rw-r--r-- ./etc/nanodetd/nanodetd.toml"
check "systemd unit" has "-rw-r--r-- ./lib/systemd/system/nanodetd.service"
check "README in the docs" has "-rw-r--r-- ./usr/share/doc/nanodetd/README.md"
check "docs/MQTT.md in the docs" has "-rw-r--r-- ./usr/share/doc/nanodetd/MQTT.md"
# The demo runs from a clone (its model, photos and broker are not packaged).
check "no demo config" test -z "$(grep demo.toml <<<"$contents" || true)"
check "copyright file" has "-rw-r--r-- ./usr/share/doc/nanodetd/copyright"
check "Prometheus alert rules" has "-rw-r--r-- ./usr/share/nanodetd/prometheus/nanodetd-alerts.yml"
check "Grafana dashboard" has "-rw-r--r-- ./usr/share/nanodetd/grafana/nanodetd-dashboard.json"
unexpected=$(grep -v -E '^d|/usr/bin/nanodetd$|/etc/nanodetd/nanodetd.toml$|/lib/systemd/system/nanodetd.service$|/usr/share/doc/nanodetd/|/usr/share/nanodetd/(prometheus/nanodetd-alerts.yml|grafana/nanodetd-dashboard.json)$' <<<"$contents" || true)
check "nothing else in the archive${unexpected:+: $unexpected}" test -z "$unexpected"
control=$(mktemp -d)
dpkg-deb -e "$deb" "$control"
check "conffiles lists the config, and only it" \
    test "$(cat "$control/conffiles")" = /etc/nanodetd/nanodetd.toml
for script in postinst prerm postrm; do
    check "maintainer script $script is executable and parses" \
        bash -c "test -x '$control/$script' && sh -n '$control/$script'"
done
check "no maintainer script enables or starts the service" \
    bash -c "! grep -hE 'systemctl (enable|start|restart )|deb-systemd-helper enable' '$control'/p*"
depends=$(dpkg-deb -f "$deb" Depends)
check "depends on libc6 >= 2.31 and libgcc-s1, nothing GPU (got: $depends)" \
    test "$depends" = "libc6 (>= 2.31), libgcc-s1 | libgcc1"
rm -rf "$control"
tmp_bin=$(mktemp -d)
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp_bin" ./usr/bin/nanodetd
case $arch in
amd64) elf="x86-64" ;;
arm64) elf="ARM aarch64" ;;
*) elf="unknown" ;;
esac
check "the binary is an $elf ELF" bash -c "file -b '$tmp_bin/usr/bin/nanodetd' | grep -q '$elf'"
# The glibc floor: JetPack 5 and Ubuntu 20.04 have 2.31.
floor=$(readelf -V "$tmp_bin/usr/bin/nanodetd" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)
check "needs at most GLIBC_2.31 (needs $floor)" \
    test "$(printf '%s\n' "$floor" GLIBC_2.31 | sort -V | tail -1)" = GLIBC_2.31
if [[ $arch == "$(dpkg --print-architecture)" ]]; then
    check "the binary runs (--version)" bash -c "'$tmp_bin/usr/bin/nanodetd' --version | grep -q '^nanodetd '"
fi
rm -rf "$tmp_bin"

# --- A throw-away root with just what the maintainer scripts need: the
# user database, and a dpkg database of its own.
mkdir -p "$root"/etc "$root"/var/lib/dpkg/{info,updates} "$root"/usr/sbin
install -m 755 /dev/null "$root/usr/sbin/nologin"
: >"$root/var/lib/dpkg/status"
printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
printf 'root:*:19000:0:99999:7:::\n' >"$root/etc/shadow"
printf 'root:x:0:\nvideo:x:44:\n' >"$root/etc/group"
printf 'root:*::\nvideo:*::\n' >"$root/etc/gshadow"
dpkg_root() {
    # Dependencies (libc6) are the host's, not in this root's database.
    # Its warnings about those are expected; the log is shown on failure.
    if ! DPKG_ROOT=$root dpkg --root="$root" --force-script-chrootless --force-depends \
        --force-architecture --log=/dev/null "$@" >"$root.log" 2>&1; then
        cat "$root.log"
        echo "FAIL dpkg $*"
        exit 1
    fi
}

dpkg_root -i "$deb"
check "installed: the binary" test -x "$root/usr/bin/nanodetd"
check "installed: the config" test -f "$root/etc/nanodetd/nanodetd.toml"
check "installed: the unit" test -f "$root/lib/systemd/system/nanodetd.service"
check "dpkg records the config as a conffile" \
    bash -c "grep -A2 '^Conffiles:' '$root/var/lib/dpkg/status' | grep -q '/etc/nanodetd/nanodetd.toml [0-9a-f]\{32\}'"
check "system user nanodetd, no login shell, home /var/lib/nanodetd" \
    bash -c "grep -q '^nanodetd:x:[0-9]*:[0-9]*:[^:]*:/var/lib/nanodetd:/usr/sbin/nologin$' '$root/etc/passwd'"
uid=$(awk -F: '$1 == "nanodetd" {print $3}' "$root/etc/passwd")
check "nanodetd is a system user (uid ${uid:-none} < 1000)" test "${uid:-1000}" -lt 1000
check "nanodetd is in the video group" bash -c "grep -q '^video:x:44:.*nanodetd' '$root/etc/group'"
check "state and cache directories belong to nanodetd" \
    bash -c "test \"\$(stat -c %u '$root/var/lib/nanodetd') \$(stat -c %u '$root/var/cache/nanodetd')\" = '$uid $uid'"
check "nothing enabled: no wants symlink" \
    bash -c "! find '$root/etc' -path '*systemd*' -name 'nanodetd.service' | grep -q ."

# --- Upgrade (a reinstall goes through the same scripts): an edited config
# is kept, the user is not duplicated.
echo '# edited by the operator' >>"$root/etc/nanodetd/nanodetd.toml"
dpkg_root -i "$deb"
check "upgrade keeps the edited config" grep -q 'edited by the operator' "$root/etc/nanodetd/nanodetd.toml"
check "upgrade does not add the user twice" test "$(grep -c '^nanodetd:' "$root/etc/passwd")" = 1

# --- Remove keeps the config; purge takes it, and the state, away.
dpkg_root -r nanodetd
check "remove: the binary is gone" test ! -e "$root/usr/bin/nanodetd"
check "remove: the unit is gone" test ! -e "$root/lib/systemd/system/nanodetd.service"
check "remove: the edited config stays" grep -q 'edited by the operator' "$root/etc/nanodetd/nanodetd.toml"
dpkg_root --purge nanodetd
check "purge: the config is gone" test ! -e "$root/etc/nanodetd/nanodetd.toml"
check "purge: state and cache are gone" test ! -e "$root/var/lib/nanodetd" -a ! -e "$root/var/cache/nanodetd"

if ((failures)); then
    echo "$(basename "$deb"): $failures check(s) failed"
    exit 1
fi
echo "$(basename "$deb"): all package checks passed"
