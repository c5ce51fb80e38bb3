#!/bin/sh
# Regenerates the seed corpora under fuzz/corpus/<target>/ (gitignored), or under the directory
# given as the first argument (.ci/fuzz seeds a temporary one), from images qemu-img makes: the
# first 4 KiB of each (cluster 0 / header + start of the block map is all the header targets
# read), whole small images for the guest targets. Needs qemu-img and qemu-io (Debian package
# qemu-utils). Safe to re-run: seeds are overwritten, inputs the fuzzer added are kept.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
corpus=${1:-"$here/corpus"}
mkdir -p "$corpus"
corpus=$(cd "$corpus" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || {
        echo "seed-corpus.sh: $tool not found (Debian package qemu-utils)" >&2
        exit 1
    }
done
mkdir -p "$corpus/qcow2_header" "$corpus/qcow2_read" "$corpus/vdi_header" "$corpus/size"

# seed <format> <name> <target...> -- <qemu-img create arguments after the file name>
seed() {
    fmt=$1 name=$2
    shift 2
    targets=
    while [ "$1" != -- ]; do targets="$targets $1"; shift; done
    shift
    file="$work/$name.$fmt"
    (cd "$work" && qemu-img create -q -f "$fmt" "$@" "$file" ${SIZE:-1G})
    for t in $targets; do head -c 4096 "$file" > "$corpus/$t/$name"; done
}

q="qcow2_header qcow2_read"
seed qcow2 default                $q -- 
seed qcow2 compat-0.10            $q -- -o compat=0.10
seed qcow2 cluster-512            $q -- -o cluster_size=512
seed qcow2 cluster-2M             $q -- -o cluster_size=2M
seed qcow2 extended-l2            $q -- -o extended_l2=on
seed qcow2 zstd                   $q -- -o compression_type=zstd
seed qcow2 lazy-refcount1         $q -- -o lazy_refcounts=on,refcount_bits=1
seed qcow2 data-file              $q -- -o data_file="$work/data.raw",data_file_raw=on
seed qcow2 backing                $q -- -b default.qcow2 -F qcow2
seed qcow2 backing-v2-512         $q -- -o compat=0.10,cluster_size=512 -u -b ../x/default.qcow2 -F qcow2
seed qcow2 backing-raw-unopened   $q -- -u -b base.raw -F raw

seed vdi dynamic-1G qcow2_read vdi_header --
SIZE=16M seed vdi dynamic-16M qcow2_read vdi_header --
SIZE=5M seed vdi static-5M qcow2_read vdi_header -- -o static=on

# qcow2_read also reads anything else as raw.
head -c 4096 /dev/zero > "$corpus/qcow2_read/zeros"

# size: the forms qemu-img accepts, and edges.
i=0
for s in 0 512 4096 64k 64K 1M 1.5G 10G 2T 1P 15E 512b 0.5k .5M 18446744073709551615 \
         15.999999999999999999E " 1G " 1.0000000000000000001T 0x10000 0x1e; do
    i=$((i + 1))
    printf '%s' "$s" > "$corpus/size/seed-$i"
done

for t in qcow2_header qcow2_read vdi_header size; do
    echo "$t: $(ls "$corpus/$t" | wc -l) files"
done

# qcow2_bitmap_dir: small images with bitmaps (qemu-img bitmap, dirty bits written by qemu-io),
# and one bare directory entry for the structured path (13 parameter bytes, then the entry).
mkdir -p "$corpus/qcow2_bitmap_dir"
bm_tmp=$(mktemp -d)
for opts in "cluster_size=512" "cluster_size=4096"; do
  name="$bm_tmp/bm-$(echo "$opts" | tr ',=' '__').qcow2"
  qemu-img create -q -f qcow2 -o "$opts" "$name" 64k
  qemu-img bitmap --add "$name" auto
  qemu-img bitmap --add -g 512 --disable "$name" off 2>/dev/null ||
    qemu-img bitmap --add -g 512 "$name" off
  qemu-io -f qcow2 -c 'write 1k 3k' -c 'write -z 40k 8k' "$name" >/dev/null
  cp "$name" "$corpus/qcow2_bitmap_dir/"
done
rm -rf "$bm_tmp"
# cluster bits 9+7, 1 bitmap, 64 KiB disk | table at 0x20000, 1 entry, auto, type 1,
# granularity 2^16, name "b1", no extra data, padding
printf '\x07\x00\x00\x00\x01\x00\x00\x00\x00\x00\x01\x00\x00%b%b%b%b' \
  '\x00\x00\x00\x00\x00\x02\x00\x00' '\x00\x00\x00\x01\x00\x00\x00\x02' \
  '\x01\x10\x00\x02\x00\x00\x00\x00' 'b1\x00\x00\x00\x00\x00\x00' > "$corpus/qcow2_bitmap_dir/entry-b1"

# qcow2_guest: whole small images (512-byte clusters keep them a few KiB), with data, zero,
# compressed and extended-L2 clusters, so the fuzzer starts inside the L1/L2/data paths.
mkdir -p "$corpus/qcow2_guest"
guest_tmp=$(mktemp -d)
for opts in "cluster_size=512" "cluster_size=512,compat=0.10" "cluster_size=16k,extended_l2=on" "cluster_size=512,refcount_bits=1"; do
  name="$guest_tmp/g-$(echo "$opts" | tr ',=' '__').qcow2"
  qemu-img create -q -f qcow2 -o "$opts" "$name" 64k
  qemu-io -f qcow2 -c 'write -P 0x11 0 1k' -c 'write -z 4k 1k' -c 'write -P 0x22 20k 3k' "$name" >/dev/null
  cp "$name" "$corpus/qcow2_guest/"
done
head -c 65536 /dev/zero | tr '\0' 'a' > "$guest_tmp/a.raw"
qemu-img convert -c -O qcow2 -o cluster_size=4k "$guest_tmp/a.raw" "$corpus/qcow2_guest/compressed.qcow2"
rm -rf "$guest_tmp"

# vdi_guest: whole small VDI images made by qemu (a 3 MiB dynamic one with two blocks written,
# a 2 MiB static one), so the fuzzer starts inside the block map and data paths.
mkdir -p "$corpus/vdi_guest"
vdi_tmp=$(mktemp -d)
qemu-img create -q -f vdi "$vdi_tmp/dyn.vdi" 3M
qemu-io -f vdi -c 'write -P 0x11 0 4k' -c 'write -P 0x22 2M 4k' "$vdi_tmp/dyn.vdi" >/dev/null
qemu-img create -q -f vdi -o static=on "$vdi_tmp/static.vdi" 2M
cp "$vdi_tmp/dyn.vdi" "$vdi_tmp/static.vdi" "$corpus/vdi_guest/"
rm -rf "$vdi_tmp"
echo "vdi_guest: $(ls "$corpus/vdi_guest" | wc -l) files"

# plan and provision_report: a script with every key, and a framed report.
mkdir -p "$corpus/plan" "$corpus/provision_report"
printf '#!/bin/sh\n/* rexxjs-vm-base: gold */\n/* rexxjs-vm-memory: 2G */\n/* rexxjs-vm-cpus: 2 */\n/* rexxjs-vm-ingress-port: 8080 */\n/* rexxjs-vm-egress-ports: 80,443 */\n/* rexxjs-vm-timeout: 5m */\necho hi\n' \
    > "$corpus/plan/every-key"
printf 'COWCLONE-BEGIN n0nce\r\naGVsbG8K\r\nCOWCLONE-END n0nce 3\r\n' > "$corpus/provision_report/framed"

# chain_policy: [flags][top length, u16 LE][top][base], from qemu-made overlays (512-byte
# clusters keep them a few KiB) over a qcow2 base and a raw base, each with data written.
mkdir -p "$corpus/chain_policy"
chain_tmp=$(mktemp -d)
# chain_seed <name> <flags> <top file> <base file>
chain_seed() {
    len=$(stat -c %s "$3")
    {
        printf "\\$(printf %o "$2")"
        printf "\\$(printf %o $((len & 255)))\\$(printf %o $((len >> 8)))"
        cat "$3" "$4"
    } > "$corpus/chain_policy/$1"
}
(
    cd "$chain_tmp"
    qemu-img create -q -f qcow2 -o cluster_size=512 base 64k
    qemu-io -f qcow2 -c 'write -P 0x11 0 8k' base >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 over-qcow2.qcow2 64k
    qemu-io -f qcow2 -c 'write -P 0x22 4k 1k' over-qcow2.qcow2 >/dev/null
    head -c 65536 /dev/zero | tr '\0' '\063' > base.raw
    qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw over-raw.qcow2 64k
    qemu-io -f qcow2 -c 'write -P 0x44 0 512' over-raw.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size=512 alone.qcow2 64k
)
chain_seed qcow2-over-qcow2 0 "$chain_tmp/over-qcow2.qcow2" "$chain_tmp/base"
chain_seed qcow2-over-raw 0 "$chain_tmp/over-raw.qcow2" "$chain_tmp/base.raw"
chain_seed named-base-raw-format 9 "$chain_tmp/alone.qcow2" "$chain_tmp/base.raw"
chain_seed named-outside 2 "$chain_tmp/over-raw.qcow2" "$chain_tmp/base.raw"
chain_seed named-link-in 4 "$chain_tmp/over-qcow2.qcow2" "$chain_tmp/base"
rm -rf "$chain_tmp"
echo "chain_policy: $(ls "$corpus/chain_policy" | wc -l) files"

# qcow2_snapshot_table: [count, u16 BE][table], from a table qemu-img wrote (two snapshots).
mkdir -p "$corpus/qcow2_snapshot_table"
snap_tmp=$(mktemp -d)
qemu-img create -q -f qcow2 "$snap_tmp/s.qcow2" 1M
qemu-io -f qcow2 -c 'write 0 64k' "$snap_tmp/s.qcow2" >/dev/null
qemu-img snapshot -c first "$snap_tmp/s.qcow2"
qemu-img snapshot -c second-with-a-longer-name "$snap_tmp/s.qcow2"
offset=$(od -An -t u8 --endian=big -j 64 -N 8 "$snap_tmp/s.qcow2" | tr -d ' ')
{ printf '\000\002'; tail -c +$((offset + 1)) "$snap_tmp/s.qcow2" | head -c 4094; } \
    > "$corpus/qcow2_snapshot_table/two"
rm -rf "$snap_tmp"
echo "qcow2_snapshot_table: $(ls "$corpus/qcow2_snapshot_table" | wc -l) files"
