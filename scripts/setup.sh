#!/usr/bin/env bash
# Idempotent host setup for Envelope on Debian 12, run as root.
#  - system packages: bcc (python3-bpfcc), libseccomp bindings, runc, busybox-static,
#    kernel headers, bpftrace and strace (benchmark peers), the default container
#    seccomp profile (golang-github-containers-common), dnsmasq and dig (DNS test peers)
#  - kernel headers linked at /lib/modules/$(uname -r)/build when the running kernel
#    has no package of its own (the probes read only tracepoint formats and helpers)
#  - tracefs and bpffs mounted
#  - .venv from /usr/bin/python3 with --system-site-packages, so it sees bcc and seccomp
# Every step checks before it acts; a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (BPF, cgroups and runc need it)"

APT_PACKAGES=(
  python3-bpfcc bpfcc-tools python3-seccomp python3-venv python3-pip
  linux-headers-amd64 runc busybox-static bpftrace strace
  golang-github-containers-common iproute2 make gcc libc6-dev
  linux-libc-dev  # linux/capability.h: the capability table is checked against it in tests
  ruby  # parses the Vagrantfile in tests
  jq    # landlockconfig's formatting check in tests
  git   # mcp-server-git (the demo agent's MCP tools, the gateway tests) runs git
  chromium  # renders envelope report pages in tests (headless)
  # real programs the privileged suite records and confines (tests/privileged/real_programs.py);
  # git is above, sqlite3 and busybox (busybox-static) and python3-pip too
  nginx-light redis-server sqlite3
  dnsmasq-base dnsutils  # a real DNS server (the binary, no system service) and dig for the name (dns) substrate's tests
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers for BCC. Use the running kernel's own when present; otherwise link
# the newest distro headers (valid because the probes never read kernel struct offsets).
kmod="/lib/modules/$(uname -r)"
if [ ! -e "$kmod/build/include/linux/kconfig.h" ] && [ ! -e "$kmod/source/include/linux/kconfig.h" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$hdr" ] || die "no kernel headers under /usr/src; install linux-headers-amd64"
  common="${hdr%-amd64}-common"
  [ -d "$common" ] || die "$common missing; reinstall linux-headers-amd64"
  log "linking $kmod/{build,source} -> $hdr, $common"
  mkdir -p "$kmod"
  ln -sfn "$hdr" "$kmod/build"
  ln -sfn "$common" "$kmod/source"
fi

mountpoint -q /sys/kernel/tracing || { log "mounting tracefs"; mount -t tracefs nodev /sys/kernel/tracing; }
mountpoint -q /sys/fs/bpf || { log "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing Python dependencies"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,iam]'
  touch "$stamp"
fi
.venv/bin/python -c 'import bcc, seccomp' 2>/dev/null || die "bcc or seccomp not importable from .venv"

# The static Landlock launcher (no Python needed inside a container image), rebuilt when its
# source is newer than the binary.
launcher_src=enforcer/launcher/envelope-launch.c
launcher=build/envelope-launch
if [ ! -x "$launcher" ] || [ "$launcher_src" -nt "$launcher" ]; then
  log "building $launcher"
  mkdir -p build
  gcc -static -O2 -Wall -Wextra -Werror -o "$launcher.tmp" "$launcher_src" || die "building $launcher failed"
  mv "$launcher.tmp" "$launcher"
fi
log "ready"
