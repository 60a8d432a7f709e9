#!/bin/bash
# Installs everything strata needs on Debian 12, as root, and builds .venv.
# Safe to run again: it installs only what is missing and rebuilds the venv
# only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-dev, gcc, pkg-config, libfuse3-dev and patch build pyfuse3; fuse3 brings
# fusermount3 and /dev/fuse support; fuse-overlayfs and unionfs-fuse are
# benchmark peers.
# The image tests run a real registry (docker-registry, with htpasswd and an
# openssl-made CA) and build and check images with skopeo, umoci,
# busybox-static and debootstrap; the runtime tests run containers on strata
# mounts with runc, crun, bubblewrap and podman.
packages=(
  python3 python3-venv python3-dev gcc pkg-config patch
  fuse3 libfuse3-dev fuse-overlayfs unionfs-fuse
  util-linux mount procps ca-certificates
  docker-registry skopeo umoci busybox-static debootstrap apache2-utils openssl zstd
  runc crun bubblewrap podman
)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pyfuse3 is built from its released source with one small patch that lets a
# filesystem leave directories unopened, so the kernel caches listings (see
# the patch's header); strata runs on an unpatched pyfuse3 too, without that cache.
pyfuse3_version=3.5.0
pyfuse3_sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
pyfuse3_patch=tools/pyfuse3-no-opendir.patch

want=$(cat pyproject.toml "$pyfuse3_patch" | sha256sum | cut -d' ' -f1)
stamp=.venv/.strata-setup
if [[ ! -x .venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: building .venv" >&2
  /usr/bin/python3 -m venv .venv
  pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
  "${pip[@]}" install --upgrade pip
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  "${pip[@]}" download --no-deps --no-binary :all: "pyfuse3==$pyfuse3_version" -d "$build"
  sdist="$build/pyfuse3-$pyfuse3_version.tar.gz"
  echo "$pyfuse3_sha256  $sdist" | sha256sum --check --quiet
  tar -xzf "$sdist" -C "$build"
  patch --quiet --directory "$build/pyfuse3-$pyfuse3_version" -p1 < "$pyfuse3_patch"
  "${pip[@]}" install "$build/pyfuse3-$pyfuse3_version"
  "${pip[@]}" install -e '.[dev,bench]'
  echo "$want" > "$stamp"
fi

# `mount -t fuse.strata` (fstab) runs mount.fuse3, which finds `strata` only on
# the system PATH; the same holds for tools given `strata-overlayfs` by name.
for command in strata strata-overlayfs; do
  ln -sfn "$PWD/.venv/bin/$command" "/usr/local/bin/$command"
done
