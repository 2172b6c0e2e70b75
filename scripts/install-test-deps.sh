#!/usr/bin/env bash
# Installs what the integration tests drive: DCMTK's clients, Orthanc (peer and benchmark reference),
# Chromium (the viewer test) and the npm packages of the browser test. Idempotent; quiet when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing Debian packages: ${need[*]} (run as root or install them)" >&2; exit 1; fi
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The bundled OHIF viewer and the browser test's driver (npm registry, pinned).
if [ -x scripts/fetch-ohif.sh ]; then scripts/fetch-ohif.sh; fi
if [ -f tests/browser/package.json ] && [ ! -d tests/browser/node_modules ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
