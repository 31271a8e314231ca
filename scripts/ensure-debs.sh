#!/usr/bin/env bash
# Installs the Debian packages the tests start for real (DESIGN.md §Real components), only when missing.
set -euo pipefail
missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v docker-compose >/dev/null || missing+=(docker-compose)   # validates docker-compose.yml (no engine needed)
command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)   # alert routing tests (API v2)
command -v chromium >/dev/null || missing+=(chromium)   # renders the HTML report headless for the screenshot test
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages for the tests: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
