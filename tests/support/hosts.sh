#!/usr/bin/env bash
# Test hosts for the remote-hosts tests: N libvirtd instances on this machine, each in its own
# network namespace (cowclone-hN) behind a veth link on one private bridge (10.77.0.0/24: the
# bridge is 10.77.0.1, host N is 10.77.0.(10+N)), reached through libvirt's remote protocol over
# tcp (qemu+tcp://10.77.0.(10+N)/system, no auth: test hosts only). Each daemon runs as root in
# its own mount namespace whose /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt
# and /var/log/libvirt are bind mounts of its own directories, so it shares no state with the
# machine's own libvirtd or the other hosts.
#
#   hosts.sh up [N]     make (idempotently) hosts 1..N (default 2) and start their daemons
#   hosts.sh stop I     stop host I's daemon (the namespace and its address stay)
#   hosts.sh start I    start host I's daemon again
#   hosts.sh down [N]   stop the daemons and remove namespaces, links and state
set -euo pipefail
root=${COWCLONE_TEST_HOSTS_DIR:-/var/tmp/cowclone-test-hosts}
bridge=cowclone-br0

addr() { echo "10.77.0.$((10 + $1))"; }
dir() { echo "$root/h$1"; }
pidfile() { echo "$(dir "$1")/run/libvirtd.pid"; }

daemon_pid() {
  local f; f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  local pid; pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm)" = libvirtd ] \
    && echo "$pid"
}

link_up() {
  local i=$1 ns=cowclone-h$1
  ip link show "$bridge" >/dev/null 2>&1 || {
    ip link add "$bridge" type bridge
    ip addr add 10.77.0.1/24 dev "$bridge"
    ip link set "$bridge" up
  }
  ip netns list | grep -qw "$ns" || ip netns add "$ns"
  if ! ip link show "cc-h$i" >/dev/null 2>&1; then
    ip link add "cc-h$i" type veth peer name eth0 netns "$ns"
    ip link set "cc-h$i" master "$bridge"
    ip link set "cc-h$i" up
    ip -n "$ns" addr add "$(addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  fi
}

configure() {
  local d; d=$(dir "$1")
  mkdir -p "$d"/{etc,run,lib,cache,log,pool}
  cat > "$d/etc/libvirtd.conf" <<CONF
listen_tls = 0
listen_tcp = 1
listen_addr = "$(addr "$1")"
auth_tcp = "none"
unix_sock_dir = "/run/libvirt"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
  cat > "$d/etc/qemu.conf" <<CONF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
CONF
}

start() {
  local i=$1 d; d=$(dir "$1")
  daemon_pid "$i" >/dev/null && return 0
  mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
  rm -f "$(pidfile "$i")"
  ip netns exec "cowclone-h$i" unshare -m --propagation private sh -c "
    mount --bind '$d/etc' /etc/libvirt
    mount --bind '$d/run' /run/libvirt
    mount --bind '$d/lib' /var/lib/libvirt
    mount --bind '$d/cache' /var/cache/libvirt
    mount --bind '$d/log' /var/log/libvirt
    exec libvirtd -d --listen -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid"
  for _ in $(seq 1 100); do
    virsh -c "qemu+tcp://$(addr "$i")/system" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "host $i: libvirtd does not answer at qemu+tcp://$(addr "$i")/system; see $d/log" >&2
  return 1
}

stop() {
  local pid
  pid=$(daemon_pid "$1") || return 0
  kill "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

down_one() {
  local i=$1
  if daemon_pid "$i" >/dev/null; then
    local uri="qemu+tcp://$(addr "$i")/system"
    for dom in $(virsh -c "$uri" list --all --name 2>/dev/null); do
      virsh -c "$uri" destroy "$dom" >/dev/null 2>&1 || true
    done
  fi
  stop "$i"
  ip link del "cc-h$i" 2>/dev/null || true
  ip netns del "cowclone-h$i" 2>/dev/null || true
  rm -rf "$(dir "$i")"
}

case "${1:-}" in
  up)
    n=${2:-2}
    command -v libvirtd >/dev/null || { echo "libvirtd not found: install libvirt-daemon, libvirt-daemon-driver-qemu and libvirt-daemon-driver-storage (or libvirt-daemon-system)" >&2; exit 1; }
    for i in $(seq 1 "$n"); do link_up "$i"; configure "$i"; start "$i"; done
    for i in $(seq 1 "$n"); do echo "h$i qemu+tcp://$(addr "$i")/system $(dir "$i")/pool"; done ;;
  stop) stop "$2" ;;
  start) start "$2" ;;
  down)
    n=${2:-2}
    for i in $(seq 1 "$n"); do down_one "$i"; done
    ip link del "$bridge" 2>/dev/null || true ;;
  *) echo "usage: $0 up [N] | stop I | start I | down [N]" >&2; exit 2 ;;
esac
