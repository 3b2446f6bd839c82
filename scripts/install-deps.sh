#!/usr/bin/env bash
# Installs what nbdroot needs to build, test and benchmark on Debian 12.
# Runs apt only when something is missing, so a second run costs nothing.
set -euo pipefail

packages=(
  # build
  build-essential cmake ninja-build pkg-config
  liburing-dev libboost-program-options-dev libspdlog-dev libroaring-dev
  libgtest-dev libsystemd-dev libnbd-dev libgnutls28-dev libcpp-httplib-dev
  # fuzzing and sanitizers
  clang libclang-rt-14-dev
  # real NBD clients and peer servers for tests and benchmarks
  nbdkit libnbd-bin python3-libnbd qemu-utils nbd-server
  python3-pytest python3-matplotlib python3-cryptography e2fsprogs
  libext2fs-dev nlohmann-json3-dev squashfs-tools musl-tools
  # bench/httpboot.py's peer HTTP server
  nginx-light
  # /metrics checked by promtool (package prometheus); the status page in a
  # real headless browser (tests/integration/test_status_metrics.py)
  prometheus python3-selenium chromium chromium-driver
  # VM boot tests (tests/e2e). Deliberately not installed on the host:
  # nbd-client, linux-image-* (the tests download and unpack them) and
  # dracut (it replaces initramfs-tools; it goes into a chroot instead).
  qemu-system-x86 ipxe-qemu busybox-static cpio zstd xz-utils kmod
  libnl-3-200 libnl-genl-3-200 libgnutls30 debootstrap
  # TLS tier tests: psktool makes keys as stock clients expect them, tcpdump
  # captures a node's connection to show no image byte crosses in plaintext
  gnutls-bin tcpdump
  # the verification initrd's tools (initrd-hooks/mkverify.sh copies them
  # from this host), and memtest86+ under SeaBIOS and OVMF (tests/e2e)
  memtester dmidecode stress-ng memtest86+ ovmf
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
