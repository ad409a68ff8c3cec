# Sourced by the scripts that install test tools from Debian: apt with a
# private configuration (its own sources, lists and cache under a work
# folder), so the system's sources and package lists are left as they are.
# It knows bookworm and bookworm-backports; qemu comes from the latter
# (bookworm's 7.2 makes apt remove the preinstalled qemu-utils).
#
#   source scripts/apt-private.sh
#   apt_private_init /path/to/work/apt
#   apt_private_install pkg...       # from bookworm-backports where newer
#   apt-get "${apt_private[@]}" download pkg

apt_private_init() {
    apt_private_dir=$1
    apt_private=(-o "Dir::Etc::SourceList=$apt_private_dir/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_private_dir/lists"
        -o "Dir::Cache=$apt_private_dir/cache")
}

apt_private_update() {
    [[ -f $apt_private_dir/updated ]] && return
    mkdir -p "$apt_private_dir/lists/partial" "$apt_private_dir/cache/archives/partial"
    cat >"$apt_private_dir/sources.list" <<'LIST'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
LIST
    apt-get "${apt_private[@]}" update -qq
    touch "$apt_private_dir/updated"
}

apt_private_install() {
    apt_private_update
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_private[@]}" install -y -qq \
        --no-install-recommends -t bookworm-backports "$@"
}
