#!/usr/bin/env bash
# Build cae2's images with docker or podman (whichever runs here): cae2:cpu or cae2:gpu. The build log goes to
# stderr; stdout gets one line, the image and its size.
#
#   bash docker/build.sh {cpu|gpu} [--local-base] [--wheelhouse DIR] [--certs DIR] [--tag NAME]
#
#   (default)         public bases: python:3.11 slim; torch from PyTorch's CPU index (cpu) or PyPI (gpu)
#   --local-base      no registry: a Debian 12 base made here with debootstrap (root; cached as localhost/cae2-base)
#   --wheelhouse DIR  install every Python package from DIR, no index (air-gapped sites). Where this machine has
#                     Python 3.11 on the image's architecture, DIR is first brought up to date with `pip download`;
#                     elsewhere it is used as it is.
#   --certs DIR       extra CA certificates (*.crt) for the build and the image, e.g. a site's intercepting proxy.
#                     Default with --local-base: this machine's local ones (/usr/local/share/ca-certificates).
#   --tag NAME        image name (default cae2:cpu / cae2:gpu)
# Environment: CAE2_ENGINE (docker|podman), CAE2_DOCKER_CACHE (the base tarball; default ~/.cache/cae2/docker),
# DEBIAN_MIRROR (default: this machine's apt source). Podman on hosts with hybrid cgroups or tight ulimits needs
# runc and ulimits in a containers.conf named by CONTAINERS_CONF (docs/guide.md, "Docker images").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "error: $*" >&2; exit 2; }

variant=${1:-}
[[ $variant == cpu || $variant == gpu ]] || die "give the image to build: bash docker/build.sh {cpu|gpu} [options]"
shift
local_base=0 wheelhouse="" certs="" tag="cae2:$variant"
while [[ $# -gt 0 ]]; do
  case $1 in
    --local-base) local_base=1 ;;
    --wheelhouse) [[ $# -ge 2 ]] || die "--wheelhouse needs a folder"; wheelhouse=$2; shift ;;
    --certs) [[ $# -ge 2 ]] || die "--certs needs a folder"; certs=$2; shift ;;
    --tag) [[ $# -ge 2 ]] || die "--tag needs a name"; tag=$2; shift ;;
    *) die "unknown option $1 (options: --local-base, --wheelhouse DIR, --certs DIR, --tag NAME)" ;;
  esac
  shift
done

engine=${CAE2_ENGINE:-}
if [[ -z $engine ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else die "neither a running docker engine nor podman is here; install one (Debian: apt-get install podman runc)"
  fi
fi
cache=${CAE2_DOCKER_CACHE:-$HOME/.cache/cae2/docker}
mkdir -p "$cache"
build_args=()

if [[ $local_base == 1 ]]; then
  base=localhost/cae2-base:bookworm
  if ! "$engine" image inspect "$base" >/dev/null 2>&1; then
    tarball=$cache/base-bookworm.tar
    if [[ ! -s $tarball ]]; then
      command -v debootstrap >/dev/null || die "--local-base needs debootstrap (Debian: apt-get install debootstrap)"
      [[ $(id -u) == 0 ]] || die "--local-base makes its base with debootstrap, which needs root"
      mirror=${DEBIAN_MIRROR:-$(sed -n -e 's/^URIs: *\([^ ]*debian\)\/*$/\1/p' -e 's/^deb \(\[[^]]*\] \)\?\([^ ]*debian\)\/* .*/\2/p' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null | head -n 1 || true)}
      [[ -n $mirror ]] || die "no Debian mirror found in /etc/apt: set DEBIAN_MIRROR"
      dir=$(mktemp -d "$cache/rootfs.XXXXXX")
      echo "making the base: debootstrap bookworm from $mirror" >&2
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$dir" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || die "debootstrap failed: see $cache/debootstrap.log"
      rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
      tar -C "$dir" -c . >"$tarball.partial" && mv "$tarball.partial" "$tarball"
      rm -rf "$dir"
    fi
    "$engine" import "$tarball" "$base" >/dev/null
  fi
  build_args+=(--build-arg "BASE_IMAGE=$base")
  if [[ -z $certs ]] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    certs=/usr/local/share/ca-certificates
  fi
fi

empty=$(mktemp -d)
trap 'rm -rf "$empty"' EXIT
if [[ -n $wheelhouse ]]; then
  mkdir -p "$wheelhouse"
  wheelhouse=$(cd "$wheelhouse" && pwd)
  python=${PYTHON:-python3}
  if [[ $("$python" -c 'import platform, sys; print(sys.version_info[:2] == (3, 11), platform.machine())' 2>/dev/null) \
        == "True $(uname -m)" ]]; then
    # Brought up to date on every build (what is there already is kept): a new requirement lands in it too.
    echo "filling the wheelhouse $wheelhouse (pip download)" >&2
    reqs=$("$python" -c 'import tomllib; p = tomllib.load(open("'"$ROOT"'/pyproject.toml", "rb"))
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))')
    # shellcheck disable=SC2086  # one requirement per line, none with spaces
    "$python" -m pip download -q -d "$wheelhouse" -r "$ROOT/scripts/torch.txt" $reqs -c "$ROOT/scripts/torch.txt" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  elif ! compgen -G "$wheelhouse/torch-*.whl" >/dev/null; then
    die "--wheelhouse $wheelhouse holds no torch wheel and $python is not Python 3.11 on $(uname -m): fill it with \
pip download on such a machine (see docs/guide.md, Docker images)"
  else
    echo "using the wheelhouse $wheelhouse as it is ($python is not Python 3.11 on $(uname -m))" >&2
  fi
  build_args+=(--build-arg TORCH_INDEX_URL= --build-arg PACKAGE_INDEX_URL= --build-context "wheelhouse=$wheelhouse")
else
  build_args+=(--build-context "wheelhouse=$empty")
fi
build_args+=(--build-context "certs=${certs:-$empty}")

echo "building $tag with $engine (docker/Dockerfile.$variant)" >&2
start=$SECONDS
if [[ $engine == docker ]]; then
  DOCKER_BUILDKIT=1 docker build -f "$ROOT/docker/Dockerfile.$variant" -t "$tag" "${build_args[@]}" "$ROOT" >&2
else
  podman build --layers --format docker -f "$ROOT/docker/Dockerfile.$variant" -t "$tag" "${build_args[@]}" "$ROOT" >&2
fi
echo "built in $((SECONDS - start)) s:" >&2
"$engine" image inspect "$tag" --format '{{.Size}}' | awk -v t="$tag" '{printf "%s\t%.0f MB\n", t, $1 / 1e6}'
