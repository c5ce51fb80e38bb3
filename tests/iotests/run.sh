#!/usr/bin/env bash
# QEMU's own qemu-iotests as the judge of the qemu-img personality (docs/qemu-img-personality.md).
#
# Usage: tests/iotests/run.sh [--rebaseline] [-j JOBS] [TEST...]
#
# Fetches the Debian source package of the installed qemu (bookworm-backports), extracts only
# tests/qemu-iotests/ under target/iotests/, and runs the bash qcow2 tests that exercise qemu-img:
# first with the real qemu-img (the baseline, cached per qemu version), then with QEMU_IMG_PROG
# pointing at a `qemu-img` symlink to cowclone (qemu-io, qemu-nbd and qemu-system stay real).
# Prints "cowclone passes X of the Y tests real qemu-img passes", per-test results, and writes
# them as JSON to target/iotests/results.json. Failed tests' output diffs are kept under
# target/iotests/out/. Needs root for the apt steps (idempotent); nothing of qemu is committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=$root/target/iotests
export DEBIAN_FRONTEND=noninteractive

rebaseline=0
jobs=2
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rebaseline) rebaseline=1 ;;
    -j) jobs=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) only+=("$1") ;;
  esac
  shift
done

# --- qemu-utils and its source -------------------------------------------------------------
# The backports suite (binary and source) is added by copying the machine's own main-archive
# stanza with its type and suite changed, as .ci/run does: no registry host is written here.
add_suite() { # $1 = file, $2 = Types value
  local file=$1 types=$2 main=/etc/apt/sources.list.d/debian.sources
  [ -f "$file" ] && return 0
  awk -v RS= -v ORS='\n\n' '/(^|\n)Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ { print; exit }' \
    "$main" | sed -e '/^#/d' -e "s/^Types:.*/Types: $types/" \
      -e 's/^Suites:.*/Suites: bookworm-backports/' > "$file.tmp"
  grep -q '^Suites: bookworm-backports' "$file.tmp" \
    || { echo "no main-archive stanza in $main" >&2; rm -f "$file.tmp"; exit 1; }
  mv "$file.tmp" "$file"
  need_update=1
}
need_update=0
add_suite /etc/apt/sources.list.d/cowclone-backports.sources deb
add_suite /etc/apt/sources.list.d/cowclone-backports-src.sources deb-src
if [ "$need_update" = 1 ] || ! apt-cache showsrc qemu 2>/dev/null | grep bpo >/dev/null; then
  apt-get update -qq
fi
if ! qemu-img --version 2>/dev/null | grep -q 'version 10\.0' || ! command -v qemu-io >/dev/null \
    || ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-storage-daemon >/dev/null; then
  apt-get install -y -qq -t bookworm-backports qemu-utils qemu-system-x86 >/dev/null
fi
command -v python3 >/dev/null || apt-get install -y -qq python3 >/dev/null

version=$(dpkg-query -W -f '${Version}' qemu-utils)  # e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1
upstream=${version#*:}
upstream=${upstream%-*}                                # 10.0.2+ds
orig=qemu_${upstream}.orig.tar.xz
mkdir -p "$work/cache"
# The upstream tarball holds tests/qemu-iotests/ (Debian's patches do not touch it); its checksum
# is the one the source index lists for this exact version.
sum=$(apt-cache showsrc qemu | awk -v v="$version" -v f="$orig" '/^Package:/ {p=0}
  /^Version:/ {p=($2 == v)} /^Checksums-Sha256:/ {s=p; next} /^[^ ]/ {s=0}
  s && $3 == f && !n++ {print $1}')
[ -n "$sum" ] || { echo "no source entry for qemu $version (deb-src bookworm-backports)" >&2; exit 1; }
if ! echo "$sum  $work/cache/$orig" | sha256sum -c --status 2>/dev/null; then
  # The .dsc and Debian tarball are not needed; a mirror missing them does not matter.
  (cd "$work/cache" && apt-get source --download-only "qemu=$version" >/dev/null 2>&1 || true)
  echo "$sum  $work/cache/$orig" | sha256sum -c --status \
    || { echo "could not fetch $orig (apt-get source qemu=$version)" >&2; exit 1; }
fi
src=$work/src/qemu-${upstream%+ds}
iotests=$src/tests/qemu-iotests
if [ ! -x "$iotests/check" ]; then
  rm -rf "$work/src" && mkdir -p "$work/src"
  tar -xJf "$work/cache/$orig" -C "$work/src" --wildcards '*/tests/qemu-iotests/*' '*/python/*'
fi

# --- which tests -----------------------------------------------------------------------------
# bash tests (not python) that run for qcow2 and call qemu-img.
if [ ${#only[@]} -eq 0 ]; then
  for t in "$iotests"/[0-9][0-9][0-9] "$iotests"/tests/*; do
    case "${t##*/}" in *.*) continue ;; esac
    [ -f "$t" ] && head -1 "$t" | grep -q bash || continue
    grep -qE 'QEMU_IMG|_make_test_img' "$t" || continue
    grep -E '^_supported_fmt' "$t" | grep -qE 'qcow2|generic' || continue
    only+=("${t##*/}")
  done
fi

# What a test that failed midway can leave behind in scratch dir $1: a daemon it started
# (qemu-nbd --fork, whose command line names a file in $1) and a mounted FUSE export.
cleanup_scratch() {
  local proc mount
  for proc in /proc/[0-9]*; do
    if { tr '\0' ' ' < "$proc/cmdline"; } 2>/dev/null | grep -qF -- "$1/"; then
      kill "${proc#/proc/}" 2>/dev/null || true
    fi
  done
  awk -v dir="$1/" 'index($2, dir) == 1 { print $2 }' /proc/mounts | while read -r mount; do
    umount -l "$mount" || true
  done
}

# Runs ./check with QEMU_IMG_PROG=$2 on the selected tests; TAP to $work/$1.tap, diffs to
# $work/out/$1/.
run_check() {
  local label=$1 img=$2 scratch=$work/scratch-$1
  cleanup_scratch "$scratch"
  rm -rf "$scratch" "$work/out/$label"
  mkdir -p "$scratch" "$work/out/$label"
  (cd "$iotests" && TEST_DIR=$scratch SOCK_DIR=$scratch/sock QEMU_IMG_PROG=$img \
    QEMU_IO_PROG=$(command -v qemu-io) QEMU_NBD_PROG=$(command -v qemu-nbd) \
    QEMU_PROG=$(command -v qemu-system-x86_64) QSD_PROG=$(command -v qemu-storage-daemon) \
    ./check -qcow2 -tap -j "$jobs" "${only[@]}" >"$work/$label.tap" 2>"$work/out/$label/diffs.txt") \
    || true
  cleanup_scratch "$scratch"
  for bad in "$scratch"/*/*.out.bad; do
    [ -f "$bad" ] && mv "$bad" "$work/out/$label/"
  done
  return 0
}

# The baseline is kept per qemu version and test list (it does not change with cowclone).
key=$(printf '%s\n' "$version" "${only[@]}" | sha256sum | cut -c1-16)
if [ "$rebaseline" = 1 ] || [ "$(cat "$work/baseline.key" 2>/dev/null)" != "$key" ]; then
  echo "baseline: real qemu-img on ${#only[@]} tests ..." >&2
  run_check baseline "$(command -v qemu-img)"
  echo "$key" > "$work/baseline.key"
fi

# --- cowclone as qemu-img --------------------------------------------------------------------
cargo build --release -q -p cowclone-cli
mkdir -p "$work/bin"
ln -sfn "$root/target/release/cowclone" "$work/bin/qemu-img"
echo "cowclone: ${#only[@]} tests ..." >&2
run_check cowclone "$work/bin/qemu-img"

python3 - "$work" "$version" <<'EOF'
import json, re, sys
work, version = sys.argv[1], sys.argv[2]
def results(label):
    out = {}
    text = open(f"{work}/{label}.tap", encoding="utf-8", errors="replace").read()
    # With -j 2, two results can land on one line ("ok qcow2 018ok qcow2 029"): split them.
    for line in re.split(r"\n|(?<!not )(?=(?:not )?ok \S+ \S)", text):
        m = re.match(r"(not ok|ok) \S+ (\S+)(.*)", line)
        if m:
            status = "not run" if "# SKIP" in m.group(3) else ("pass" if m.group(1) == "ok" else "fail")
            out[m.group(2)] = status
    return out
base, mine = results("baseline"), results("cowclone")
passing = sorted(t for t, s in base.items() if s == "pass")
won = [t for t in passing if mine.get(t) == "pass"]
tests = {t: {"qemu-img": base.get(t), "cowclone": mine.get(t)} for t in sorted(set(base) | set(mine))}
with open(f"{work}/results.json", "w") as f:
    json.dump({"qemu-version": version, "baseline-passes": len(passing),
               "cowclone-passes": len(won), "tests": tests}, f, indent=2)
for t in passing:
    print(f"{t:40} {mine.get(t, 'missing')}")
print(f"cowclone passes {len(won)} of the {len(passing)} tests real qemu-img passes")
EOF
