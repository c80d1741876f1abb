#!/usr/bin/env bash
# Builds (once) kube-apiserver v1.20.2 from Debian bookworm's source; caches it and a matching kubectl outside the repo.
# Idempotent and safe to run concurrently; the last stdout line is the kube-apiserver path, progress goes to stderr.
set -Eeuo pipefail

K8S_VERSION=v1.20.2
DEB_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE="${LAMBDAGATE_CACHE:-$HOME/.cache/lambdagate}"
APISERVER="$CACHE/kube-apiserver-$K8S_VERSION"
KUBECTL="$CACHE/kubectl-$K8S_VERSION"
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2
export DEBIAN_FRONTEND=noninteractive

log() { printf 'build-apiserver: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
trap 'log "ERROR: exit $? at line $LINENO: $BASH_COMMAND"' ERR

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install apt packages"
    SUDO=(sudo -n)
fi

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -q >&2
        APT_UPDATED=1
    fi
}

# Installs the given packages that dpkg does not already report as installed.
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_update_once
    log "apt-get install ${missing[*]}"
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# `apt-get source` needs deb-src entries; derive them from the machine's own deb entries (same mirror, suites, key).
ensure_deb_src() {
    if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Version:'; then
        return 0
    fi
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        log "adding deb-src entries as /etc/apt/sources.list.d/lambdagate-src.sources"
        sed -E 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            | "${SUDO[@]}" tee /etc/apt/sources.list.d/lambdagate-src.sources >/dev/null
    elif [ -f /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list; then
        log "adding deb-src entries as /etc/apt/sources.list.d/lambdagate-src.list"
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list \
            | "${SUDO[@]}" tee /etc/apt/sources.list.d/lambdagate-src.list >/dev/null
    else
        die "no Debian apt sources found to derive deb-src entries from"
    fi
    APT_UPDATED=0
    apt_update_once
    apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Version:' || die "source package 'kubernetes' still unknown to apt"
}

# kubectl comes from the kubernetes-client .deb, unpacked into the cache rather than installed: another package
# (e.g. Google's `kubectl`) may already own /usr/bin/kubectl, and dpkg refuses to overwrite it.
ensure_kubectl() {
    [ -x "$KUBECTL" ] && return 0
    local tmp
    tmp="$(mktemp -d "$CACHE/kubectl.XXXXXX")"
    log "fetching kubectl ($K8S_VERSION) from the kubernetes-client package"
    apt-cache show kubernetes-client >/dev/null 2>&1 || apt_update_once
    (cd "$tmp" && apt-get download -q kubernetes-client >&2) || { rm -rf "$tmp"; die "apt-get download kubernetes-client failed"; }
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/kubectl" "$KUBECTL.tmp.$$"
    mv -f "$KUBECTL.tmp.$$" "$KUBECTL"
    rm -rf "$tmp"
}

build_apiserver() {
    apt_install golang-go rsync jq make dpkg-dev golang-github-modern-go-reflect2-dev
    ensure_deb_src

    local work src built
    work="$(mktemp -d "$CACHE/build.XXXXXX")"
    # The source tree and Go build cache are several GB; they go whether the build succeeds or not.
    trap 'rm -rf "$work"' EXIT
    log "building kube-apiserver $K8S_VERSION in $work (first run only; 4 to 11 minutes on 2 cores)"
    cd "$work"
    if ! apt-get source -q --download-only "kubernetes=$DEB_SRC_VERSION" >&2; then
        # The archive keeps only the newest security update; any bookworm revision of 1.20.2 will do.
        log "kubernetes=$DEB_SRC_VERSION unavailable; trying the archive's current 1.20.2 revision"
        apt-cache showsrc kubernetes | grep -q '^Version: .*really1\.20\.2' || die "no kubernetes 1.20.2 source in apt"
        apt-get source -q --download-only kubernetes >&2 || die "apt-get source kubernetes failed"
    fi
    dpkg-source -x ./kubernetes_*.dsc src >&2
    src="$work/src"

    # The vendored reflect2 1.0.1 crashes under Go >= 1.18 on the first custom-object write; 1.0.2 is the fix.
    [ -d "$REFLECT2" ] || die "$REFLECT2 missing (golang-github-modern-go-reflect2-dev)"
    rm -f "$src"/vendor/github.com/modern-go/reflect2/*.go "$src"/vendor/github.com/modern-go/reflect2/*.s
    find "$REFLECT2" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
        -exec cp {} "$src/vendor/github.com/modern-go/reflect2/" \;

    (
        cd "$src"
        export GOPROXY=off CGO_ENABLED=0 GOCACHE="$work/gocache" GOPATH="$work/gopath"
        export KUBE_GIT_VERSION="$K8S_VERSION" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean
        make WHAT=cmd/kube-apiserver >&2
    ) || die "make WHAT=cmd/kube-apiserver failed (see output above)"

    built="$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n1)"
    [ -n "$built" ] || die "build finished but no kube-apiserver binary under $src/_output"
    "$built" --version >&2
    install -m 0755 "$built" "$APISERVER.tmp.$$"
    mv -f "$APISERVER.tmp.$$" "$APISERVER"
    cd /
    rm -rf "$work"
    trap - EXIT
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
    log "another build holds $CACHE/.build.lock; waiting"
    flock 9
fi

apt_install etcd-server openssl
command -v etcd >/dev/null || die "etcd not on PATH after installing etcd-server"
ensure_kubectl
if [ -x "$APISERVER" ]; then
    log "cached: $APISERVER"
else
    start=$SECONDS
    build_apiserver
    log "built $APISERVER in $((SECONDS - start)) s"
fi
echo "$APISERVER"
