#!/bin/bash
# Runs xfstests, the suite Linux filesystems are held to, against
# strata-overlayfs and the kernel's overlayfs: each test is its own `./check`
# under a timeout, in a private mount namespace, over ext4 loop images of its
# own. Not part of CI (a full run takes an hour or more); the
# issues' acceptance oracle for POSIX behaviour beyond pjdfstest.
#
#   bash tools/xfstests.sh [--source DIR] [--driver NAME]... [--out DIR]
#                          [--timeout SECONDS] [TEST...]
#
# --source  an xfstests checkout (built here if it is not); without it, the
#           public repository is cloned into $STRATA_XFSTESTS_CACHE
#           (default /var/cache/strata-xfstests).
# --driver  strata (strata-overlayfs as FSTYP=fuse) or overlay
#           (./check -overlay); default: both.
# --out     where the table and each failed test's output go
#           (default ./xfstests-results).
# TEST      e.g. generic/003; default: the `quick` group's generic tests
#           numbered 001-150.
#
# strata-overlayfs is reached as mount.fuse3's `PROGRAM#SOURCE` helper: a
# small script that turns SOURCE (test, scratch) into lowerdir/upperdir/workdir
# on that loop filesystem, names the mount by the device xfstests knows it by
# (fsname=) and gives it the type `fuse` its checks compare with (subtype=).
# fuse-overlayfs cannot be run this way: it always shows fuse.fuse-overlayfs.
# The lower layer is empty, so every file the tests make is in the upper
# layer, as with `./check -overlay`. Needs root; installs xfstests' build and run
# dependencies with apt and adds the users its tests switch to (fsgqa,
# fsgqa2, 123456-fsgqa).
set -euo pipefail

xfstests_git=https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git
cache=${STRATA_XFSTESTS_CACHE:-/var/cache/strata-xfstests}
source_dir=
drivers=()
out=$PWD/xfstests-results
per_test_timeout=600
tests=()

fail() { echo "xfstests.sh: $*" >&2; exit 1; }

while (($#)); do
  case $1 in
    --source) source_dir=$(realpath "${2:?--source needs a directory}"); shift 2 ;;
    --driver) drivers+=("${2:?--driver needs a name}"); shift 2 ;;
    --out) out=$(realpath -m "${2:?--out needs a directory}"); shift 2 ;;
    --timeout) per_test_timeout=${2:?--timeout needs seconds}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) fail "unknown option $1" ;;
    *) tests+=("$1"); shift ;;
  esac
done
((${#drivers[@]})) || drivers=(strata overlay)
for driver in "${drivers[@]}"; do
  case $driver in
    strata|overlay) ;;
    *) fail "unknown driver $driver (strata or overlay)" ;;
  esac
done
[[ $per_test_timeout =~ ^[0-9]+$ ]] || fail "--timeout takes whole seconds"
(( EUID == 0 )) || fail "run as root: the tests mount filesystems and switch users"

# What xfstests needs to build and to run its generic tests.
packages=(
  make gcc autoconf automake libtool libtool-bin pkg-config git
  xfslibs-dev uuid-dev libacl1-dev libaio-dev liburing-dev libattr1-dev
  libgdbm-dev libcap-dev xfsprogs e2fsprogs acl attr bc psmisc gawk
  util-linux fuse3
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "xfstests.sh: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null \
    || fail "apt-get could not install ${missing[*]}"
fi
if [[ " ${drivers[*]} " == *" strata "* ]] && ! command -v strata-overlayfs > /dev/null; then
  fail "strata-overlayfs is not on PATH: run tools/setup.sh first"
fi

if [[ -z $source_dir ]]; then
  source_dir=$cache/xfstests-dev
  if [[ ! -d $source_dir/.git ]]; then
    mkdir -p "$cache"
    git clone --quiet --depth 1 "$xfstests_git" "$source_dir" || fail "could not clone $xfstests_git"
  fi
fi
[[ -f $source_dir/check && -d $source_dir/tests/generic ]] || fail "$source_dir is not an xfstests checkout"
if [[ ! -x $source_dir/ltp/fsx || ! -f $source_dir/tests/generic/group.list ]]; then
  echo "xfstests.sh: building xfstests in $source_dir"
  make -C "$source_dir" -j"$(nproc)" > "$source_dir/strata-build.log" 2>&1 \
    || fail "building xfstests failed; see $source_dir/strata-build.log"
fi

for user in fsgqa fsgqa2 123456-fsgqa; do
  getent passwd "$user" > /dev/null || useradd --badname -m "$user" 2> /dev/null || useradd -m "$user" \
    || fail "could not add the user $user"
done

if ((${#tests[@]} == 0)); then
  # The quick group's generic tests numbered 001-150.
  mapfile -t tests < <(awk '!/^#/ && / quick( |$)/ && $1 <= 150 { print "generic/" $1 }' \
    "$source_dir/tests/generic/group.list")
fi
for test in "${tests[@]}"; do
  [[ $test =~ ^[a-z]+/[0-9]+$ && -f $source_dir/tests/$test ]] || fail "no such test: $test"
done

work=$(mktemp -d /var/tmp/strata-xfstests.XXXXXX)
chmod 755 "$work"  # the tests also run as fsgqa
loops=()
cleanup() {
  for loop in "${loops[@]}"; do losetup -d "$loop" 2> /dev/null || true; done
  rm -rf -- "$work"
}
trap cleanup EXIT
mkdir -p "$out"

# One ext4 filesystem for TEST and one for SCRATCH, as xfstests wants them,
# made afresh for each driver.
attach_images() {
  loops=()
  local name
  for name in test scratch; do
    rm -f "$work/$name.img"
    truncate -s 4G "$work/$name.img"
    mkfs.ext4 -q -F "$work/$name.img"
    loops+=("$(losetup --find --show "$work/$name.img")")
  done
}
detach_images() {
  local loop
  for loop in "${loops[@]}"; do losetup -d "$loop"; done
  loops=()
}

# mount.fuse3 runs `HELPER SOURCE MOUNTPOINT -o OPTIONS` for the device
# HELPER#SOURCE; the helper finds the layers on SOURCE's base filesystem.
write_helper() {
  local program=$1 helper=$work/mount-${1##*/}
  cat > "$helper" << EOF
#!/bin/bash
source=\$1 mountpoint=\$2
shift 2
options=
while ((\$#)); do
  case \$1 in
    -o) options=\${options:+\$options,}\$2; shift 2 ;;
    *) shift ;;
  esac
done
base=$work/base-\$source
mkdir -p "\$base/lower" "\$base/upper" "\$base/work"
exec $program -o "lowerdir=\$base/lower,upperdir=\$base/upper,workdir=\$base/work,fsname=$helper#\$source,subtype=\${options:+,\$options}" "\$mountpoint"
EOF
  chmod +x "$helper"
  echo "$helper"
}

write_config() {
  local driver=$1 config=$work/local.config
  mkdir -p "$work/base-test" "$work/base-scratch" "$work/test" "$work/scratch" "$work/results"
  case $driver in
    overlay)
      cat > "$config" << EOF
FSTYP=ext4
TEST_DEV=${loops[0]}
TEST_DIR=$work/base-test
SCRATCH_DEV=${loops[1]}
SCRATCH_MNT=$work/base-scratch
RESULT_BASE=$work/results
EOF
      ;;
    *)
      local helper
      helper=$(write_helper "$(command -v strata-overlayfs)")
      cat > "$config" << EOF
FSTYP=fuse
TEST_DEV=$helper#test
TEST_DIR=$work/test
SCRATCH_DEV=$helper#scratch
SCRATCH_MNT=$work/scratch
RESULT_BASE=$work/results
EOF
      ;;
  esac
  echo "$config"
}

# One test in a mount namespace of its own: the base filesystems are mounted
# there (for the FUSE drivers) and vanish with it, whatever the test leaves.
run_test() {
  local driver=$1 config=$2 test=$3 log=$4 check_args=()
  [[ $driver == overlay ]] && check_args=(-overlay)
  HOST_OPTIONS=$config timeout --kill-after=30 "$per_test_timeout" \
    unshare --mount --propagation private bash -c '
      set -e
      work=$1 driver=$2 test_loop=$3 scratch_loop=$4 source_dir=$5
      shift 5
      if [[ $driver != overlay ]]; then
        mount "$test_loop" "$work/base-test"
        mount "$scratch_loop" "$work/base-scratch"
      fi
      cd "$source_dir"
      ./check "$@"
    ' run-test "$work" "$driver" "${loops[@]}" "$source_dir" "${check_args[@]}" "$test" > "$log" 2>&1
}

summary=$out/summary.tsv
printf 'driver\ttest\tresult\tseconds\n' > "$summary"
for driver in "${drivers[@]}"; do
  echo "xfstests.sh: ${#tests[@]} tests on $driver"
  attach_images
  config=$(write_config "$driver")
  mkdir -p "$out/$driver"
  for test in "${tests[@]}"; do
    log=$out/$driver/${test//\//-}.log
    start=$(date +%s)
    rc=0
    run_test "$driver" "$config" "$test" "$log" || rc=$?
    seconds=$(($(date +%s) - start))
    if ((rc == 124 || rc == 137)); then
      result=timeout
    elif grep -q '^Failures:' "$log"; then
      result=fail
    elif grep -q '^Not run:' "$log"; then
      result="not run: $(grep -m1 -o '\[not run\].*' "$log" | sed 's/\[not run\] //')"
    elif grep -q '^Passed all' "$log"; then
      result=pass
    else
      result="error (exit $rc)"
    fi
    if [[ $result == fail ]]; then
      cp "$work/results/${test}".{out.bad,full} "$out/$driver/" 2> /dev/null || true
    fi
    printf '%s\t%s\t%s\t%s\n' "$driver" "$test" "$result" "$seconds" >> "$summary"
    printf '  %-14s %-14s %s (%ss)\n' "$driver" "$test" "$result" "$seconds"
  done
  detach_images
done

echo
echo "| driver | pass | fail | not run | timeout | other |"
echo "|---|---:|---:|---:|---:|---:|"
for driver in "${drivers[@]}"; do
  awk -F'\t' -v d="$driver" '
    $1 == d { all++; n[$3 ~ /^not run/ ? "not run" : $3]++ }
    END { printf "| %s | %d | %d | %d | %d | %d |\n", d, n["pass"], n["fail"], n["not run"], n["timeout"],
          all - n["pass"] - n["fail"] - n["not run"] - n["timeout"] }' "$summary"
done
echo "xfstests.sh: results in $summary"
