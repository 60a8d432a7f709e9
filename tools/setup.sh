#!/bin/bash
# Installs everything strata needs on Debian 12, as root, and builds .venv.
# Safe to run again: it installs only what is missing and rebuilds the venv
# only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-dev, gcc, pkg-config and libfuse3-dev build pyfuse3; fuse3 brings
# fusermount3 and /dev/fuse support; fuse-overlayfs is a benchmark peer.
# The image tests run a real registry (docker-registry, with htpasswd and an
# openssl-made CA) and build and check images with skopeo, umoci,
# busybox-static and debootstrap; the runtime tests run containers on strata
# mounts with runc, crun, bubblewrap and podman.
packages=(
  python3 python3-venv python3-dev gcc pkg-config
  fuse3 libfuse3-dev fuse-overlayfs
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

want=$(sha256sum pyproject.toml | cut -d' ' -f1)
stamp=.venv/.strata-setup
if [[ ! -x .venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: building .venv" >&2
  /usr/bin/python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  echo "$want" > "$stamp"
fi

# `mount -t fuse.strata` (fstab) runs mount.fuse3, which finds `strata` only on
# the system PATH; the same holds for tools given `strata-overlayfs` by name.
for command in strata strata-overlayfs; do
  ln -sfn "$PWD/.venv/bin/$command" "/usr/local/bin/$command"
done
