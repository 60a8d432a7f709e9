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
# mounts with runc, crun, bubblewrap and podman; the rootless podman and buildah
# tests need uidmap's newuidmap/newgidmap for a user made by the test; strace
# counts the daemon's syscalls in a test of its request loop.
packages=(
  python3 python3-venv python3-dev gcc pkg-config patch
  fuse3 libfuse3-dev fuse-overlayfs unionfs-fuse
  util-linux mount procps ca-certificates strace
  docker-registry skopeo umoci busybox-static debootstrap apache2-utils openssl zstd
  runc crun bubblewrap podman buildah uidmap
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

# pyfuse3 is built from its released source with six small patches: they let
# a filesystem leave directories unopened, so the kernel caches listings; have
# the kernel cache symlink targets; spare a close its flush request; read
# a queued request without a trip through the event loop; keep a file's
# cached pages when its mtime changes; and serve fallocate (see each patch's
# header). strata runs on an unpatched pyfuse3 too, without them.
pyfuse3_version=3.5.0
pyfuse3_sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
pyfuse3_patches=(
  tools/pyfuse3-no-opendir.patch tools/pyfuse3-cache-symlinks.patch tools/pyfuse3-noflush.patch
  tools/pyfuse3-direct-reads.patch tools/pyfuse3-keep-data.patch tools/pyfuse3-fallocate.patch
)

# Two environments: .venv in the checkout (editable, with the test and bench
# tools) and an installed copy in $installed for the commands on the system
# PATH. The copy is what mount.fuse3 and containers-storage run, often as an
# unprivileged user who cannot read a checkout under a root-only directory.
installed=/usr/local/lib/strata
want=$(cat pyproject.toml "${pyfuse3_patches[@]}" | sha256sum | cut -d' ' -f1)
stamp=.venv/.strata-setup
if [[ ! -x .venv/bin/python || ! -x "$installed/bin/python" ||
      "$(cat "$stamp" 2>/dev/null)" != "$want" ||
      "$(cat "$installed/.strata-setup" 2>/dev/null)" != "$want" ]]; then
  echo "setup: building .venv and $installed" >&2
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  /usr/bin/python3 -m venv --clear .venv
  pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
  "${pip[@]}" install --upgrade pip
  "${pip[@]}" download --no-deps --no-binary :all: "pyfuse3==$pyfuse3_version" -d "$build"
  sdist="$build/pyfuse3-$pyfuse3_version.tar.gz"
  echo "$pyfuse3_sha256  $sdist" | sha256sum --check --quiet
  tar -xzf "$sdist" -C "$build"
  for pyfuse3_patch in "${pyfuse3_patches[@]}"; do
    patch --quiet --directory "$build/pyfuse3-$pyfuse3_version" -p1 < "$pyfuse3_patch"
  done
  "${pip[@]}" wheel --no-deps --wheel-dir "$build/wheels" "$build/pyfuse3-$pyfuse3_version"
  "${pip[@]}" install "$build"/wheels/pyfuse3-*.whl
  "${pip[@]}" install -e '.[dev,bench]'
  echo "$want" > "$stamp"
  /usr/bin/python3 -m venv --clear "$installed"
  pip=("$installed/bin/python" -m pip --quiet --disable-pip-version-check)
  "${pip[@]}" install --upgrade pip setuptools
  "${pip[@]}" install "$build"/wheels/pyfuse3-*.whl .
  echo "$want" > "$installed/.strata-setup"
  chmod -R a+rX "$installed"
fi

# The installed copy follows the checkout's source: reinstalled (without its
# dependencies, from a copy of the source so the checkout stays clean) when it changed.
source_hash=$(find pyproject.toml unionfs -type f -name '*.py' -o -type f -name '*.toml' |
  LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$installed/.strata-source" 2>/dev/null)" != "$source_hash" ]]; then
  copy=$(mktemp -d)
  cp -r pyproject.toml README.md unionfs "$copy"
  find "$copy" -name __pycache__ -prune -exec rm -rf {} +
  "$installed/bin/python" -m pip --quiet --disable-pip-version-check install \
    --no-deps --no-build-isolation --force-reinstall "$copy"
  rm -rf "$copy"
  echo "$source_hash" > "$installed/.strata-source"
  chmod -R a+rX "$installed"
fi

# `mount -t fuse.strata` (fstab) runs mount.fuse3, which finds `strata` only on
# the system PATH; the same holds for tools given `strata-overlayfs` by name.
for command in strata strata-overlayfs; do
  ln -sfn "$installed/bin/$command" "/usr/local/bin/$command"
done
