#!/bin/bash
# Installs everything strata needs on Debian 12, as root, and builds .venv.
# Safe to run again: it installs only what is missing and rebuilds the venv
# only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-dev, gcc, pkg-config, libfuse3-dev and patch build pyfuse3; fuse3 brings
# fusermount3 and /dev/fuse support; fuse-overlayfs and unionfs-fuse are
# benchmark peers; dpkg-dev, xz-utils and debian-archive-keyring fetch and
# unpack the libfuse source that passthrough needs (see below).
# The image tests run a real registry (docker-registry, with htpasswd and an
# openssl-made CA) and build and check images with skopeo, umoci,
# busybox-static and debootstrap; the runtime tests run containers on strata
# mounts with runc, crun, bubblewrap and podman; the rootless podman and buildah
# tests need uidmap's newuidmap/newgidmap for a user made by the test; strace
# counts the daemon's syscalls in a test of its request loop; containerd (with
# runc) runs containers through `strata snapshotter` in its tests, and
# stargz-snapshotter's ctr-remote pulls lazily through it.
packages=(
  python3 python3-venv python3-dev gcc pkg-config patch
  fuse3 libfuse3-dev fuse-overlayfs unionfs-fuse
  util-linux mount procps ca-certificates strace dpkg-dev xz-utils debian-archive-keyring
  docker-registry skopeo umoci busybox-static debootstrap apache2-utils openssl zstd
  runc crun bubblewrap podman buildah uidmap containerd stargz-snapshotter
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

# FUSE passthrough (the kernel reads and writes a file's host copy itself)
# needs libfuse 3.17; Debian 12 has 3.14. Where the system's is older, libfuse
# is built from Debian 13's fuse3 source package into $libfuse_prefix, fetched
# with a private apt configuration that leaves the machine's untouched, and
# pyfuse3 is linked against it. STRATA_LIBFUSE=system skips that (as on a
# machine that cannot fetch the source): strata then runs without passthrough.
libfuse_prefix=/usr/local/lib/strata-libfuse

# Prints the mirror the machine's apt uses for Debian itself.
debian_mirror() {
  local uri
  uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
          /etc/apt/sources.list.d/*.sources | grep -v security |
        sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' |
        awk '{print $1; exit}')
  echo "${uri:-http://deb.debian.org/debian}"
}

# Builds libfuse from Debian 13's source package into $libfuse_prefix.
build_libfuse() {
  local work apt_opts source
  work=$(mktemp -d)
  mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/apt/parts" "$work/src"
  printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
    "$(debian_mirror)" /usr/share/keyrings/debian-archive-keyring.gpg > "$work/apt/parts/trixie.sources"
  apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/apt/parts"
            -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
            -o APT::Sandbox::User=root)
  if apt-get "${apt_opts[@]}" update -qq &&
     (cd "$work/src" && apt-get "${apt_opts[@]}" source -qq --download-only fuse3) &&
     source=$(cd "$work/src" && compgen -G 'fuse3_3.1[7-9]*.dsc' | head -n 1) &&
     [[ -n "$source" ]] &&
     (cd "$work/src" && dpkg-source --no-check -x "$source" fuse3 >/dev/null 2>&1) &&
     /usr/bin/python3 -m venv "$work/tools" &&
     "$work/tools/bin/python" -m pip --quiet --disable-pip-version-check install meson ninja &&
     (cd "$work/src/fuse3" && PATH="$work/tools/bin:$PATH" meson setup build \
        --prefix="$libfuse_prefix" --libdir=lib -Dutils=false -Dtests=false -Dexamples=false \
        -Dinitscriptdir= -Duseroot=false >/dev/null &&
      PATH="$work/tools/bin:$PATH" ninja -C build install >/dev/null); then
    rm -rf "$work"
    return 0
  fi
  rm -rf "$work" "$libfuse_prefix"
  return 1
}

pyfuse3_env=()
passthrough=no
if pkg-config --atleast-version=3.17 fuse3; then
  passthrough=yes  # the system's libfuse can
elif [[ "${STRATA_LIBFUSE:-build}" != system ]]; then
  if [[ ! -f "$libfuse_prefix/lib/pkgconfig/fuse3.pc" ]]; then
    echo "setup: building libfuse 3.17 (Debian 13) for FUSE passthrough" >&2
    build_libfuse || echo "setup: could not build libfuse 3.17; strata runs without passthrough" >&2
  fi
  if [[ -f "$libfuse_prefix/lib/pkgconfig/fuse3.pc" ]]; then
    passthrough=yes
    # -L first: the Python build puts the system library directory before the
    # extension's own flags.
    pyfuse3_env=(PKG_CONFIG_PATH="$libfuse_prefix/lib/pkgconfig"
                 LDFLAGS="-L$libfuse_prefix/lib -Wl,-rpath,$libfuse_prefix/lib")
  fi
fi

# pyfuse3 is built from its released source with eleven small patches: they let
# a filesystem leave directories unopened, so the kernel caches listings; have
# the kernel cache symlink targets; spare a close its flush request; read
# a queued request without a trip through the event loop; keep a file's
# cached pages when its mtime changes; serve fallocate; name pyfuse3's
# version without importlib.metadata, 1.5 MiB of every daemon; answer
# request after request without trio's scheduler while no handler waits;
# apply the umask itself, where a default ACL replaces it; serve the ioctls
# of chattr and lsattr; and tell a time set to "now" from one given (see each
# patch's header). With libfuse 3.17
# three more give it passthrough, let it clear set-id bits itself (no getxattr
# before every write) and serve O_TMPFILE. strata runs on an unpatched pyfuse3
# too, without them.
pyfuse3_version=3.5.0
pyfuse3_sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
pyfuse3_patches=(
  tools/pyfuse3-no-opendir.patch tools/pyfuse3-cache-symlinks.patch tools/pyfuse3-noflush.patch
  tools/pyfuse3-direct-reads.patch tools/pyfuse3-keep-data.patch tools/pyfuse3-fallocate.patch
  tools/pyfuse3-no-metadata.patch tools/pyfuse3-idle-wait.patch tools/pyfuse3-dont-mask.patch
  tools/pyfuse3-ioctl.patch tools/pyfuse3-time-now.patch
)
if [[ $passthrough == yes ]]; then
  pyfuse3_patches+=(tools/pyfuse3-passthrough.patch tools/pyfuse3-killpriv.patch
                    tools/pyfuse3-tmpfile.patch)
fi

# Two environments: .venv in the checkout (editable, with the test and bench
# tools) and an installed copy in $installed for the commands on the system
# PATH. The copy is what mount.fuse3 and containers-storage run, often as an
# unprivileged user who cannot read a checkout under a root-only directory.
installed=/usr/local/lib/strata
want=$( (cat pyproject.toml "${pyfuse3_patches[@]}"; echo "${pyfuse3_env[*]}") | sha256sum | cut -d' ' -f1)
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
  env "${pyfuse3_env[@]}" "${pip[@]}" wheel --no-deps --wheel-dir "$build/wheels" "$build/pyfuse3-$pyfuse3_version"
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

# The request path compiled with mypyc (unionfs/native.py), once per change
# of its sources, into each environment's strata-native: the checkout's
# .venv builds it (it has mypy), the installed copy gets the same build
# (same interpreter, same sources). A build that fails leaves strata running
# that code as Python, slower but the same; STRATA_NATIVE=0 at run time does too.
native_fresh() {
  "$1/bin/python" -I -c 'import sys; from unionfs import native
sys.exit(0 if native.is_fresh(native.DIRECTORY) else 1)'
}
if ! native_fresh .venv; then
  echo "setup: compiling the request path (mypyc, about 2 minutes)" >&2
  if ! .venv/bin/python -c 'from unionfs import native; native.build(native.DIRECTORY)' \
      > .venv/strata-native.log 2>&1; then
    echo "setup: compiling failed (see .venv/strata-native.log); strata runs it as Python" >&2
  fi
fi
if native_fresh .venv && ! native_fresh "$installed"; then
  rm -rf "$installed/strata-native"
  cp -r .venv/strata-native "$installed/strata-native"
  chmod -R a+rX "$installed/strata-native"
fi

# `mount -t fuse.strata` (fstab) runs mount.fuse3, which finds `strata` only on
# the system PATH; the same holds for tools given `strata-overlayfs` by name.
for command in strata strata-overlayfs; do
  ln -sfn "$installed/bin/$command" "/usr/local/bin/$command"
done
