#!/usr/bin/env bash
# Installs the system packages pyvmm needs to build its test guests and default Linux
# guest (Debian/Ubuntu hosts). Idempotent: does nothing when everything is present.
set -euo pipefail
pkgs=(build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils lz4 zstd
      linux-source-6.1 busybox-static e2fsprogs musl-tools passt skopeo umoci
      docker-registry)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-host: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
