#!/usr/bin/env bash
# Installs what the integration tests drive: DCMTK's clients, Orthanc (peer and benchmark reference), HAProxy,
# PostgreSQL's server binaries,
# SQLite's headers (for the compiled record path), Chromium and Node.js (the viewer and admin-page browser checks in tests/browser) and the npm packages
# of those checks. Idempotent; quiet when all is there. Needs no virtualenv (make test builds it after).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v openssl >/dev/null || need+=(openssl)  # the DICOM TLS test makes its CA and certificates with it
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/chromium ] || need+=(chromium fonts-liberation)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)  # NodeSource's nodejs ships npm itself; Debian's does not
# HAProxy in front of several nodes (tests/integration/test_nodes.py, with docs/deployment.md's config); PostgreSQL's
# server binaries (initdb, pg_basebackup, pg_ctl) for the primary + replica of the fail-over test, and its client
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
# espeak-ng speaks the dictation word-error-rate sentences (tests/integration/test_dictation.py, benchmarks/dictation.py)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
# DejaVu Sans, the printable report's font (Unicode text embedded in the PDF; src/bastion/reporting/pdf.py)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# SQLite's headers: the index's common record in C (setup.py) is built, and tested, against them
[ -e /usr/include/sqlite3.h ] || need+=(libsqlite3-dev)
# A C compiler with AddressSanitizer's and UndefinedBehaviorSanitizer's runtimes (scripts/sanitizer-tests.sh)
command -v cc >/dev/null || need+=(gcc)
if command -v cc >/dev/null; then
  for lib in libasan.so libubsan.so; do
    [ -e "$(cc -print-file-name=$lib)" ] || need+=("libgcc-$(cc -dumpversion | cut -d. -f1)-dev")
  done
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing Debian packages: ${need[*]} (run as root or install them)" >&2; exit 1; fi
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# playwright-core (tests/browser) needs Node.js >= 20: Debian 13 has it; Debian 12's nodejs is 18.
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "Node.js $(node --version) is too old for the browser checks (need >= 20): install Node.js 20" \
       "or newer (Debian 12's own nodejs is 18)" >&2
  exit 1
fi

# The bundled OHIF viewer and the browser checks' driver (npm registry, pinned by package-lock.json).
if [ -x scripts/fetch-ohif.sh ]; then scripts/fetch-ohif.sh; fi
# npm ci again whenever the lock file is newer than what was installed from it.
installed=tests/browser/node_modules/.package-lock.json
if [ -f tests/browser/package.json ] && { [ ! -f "$installed" ] || [ tests/browser/package-lock.json -nt "$installed" ]; }; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

# The PostgreSQL the index tests use: 127.0.0.1:5432, user postgres with trust authentication on loopback, database
# `test` (BASTION_TEST_POSTGRESQL overrides). Started here if it is installed but not running; the tests make
# and drop their own schemas in it.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if [ "$(id -u)" = 0 ] && command -v pg_ctlcluster >/dev/null; then
    for cluster in $(pg_lsclusters -h | awk '$3 == 5432 {print $1 "/" $2}'); do
      pg_ctlcluster "${cluster%/*}" "${cluster#*/}" start || true
    done
  fi
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if pg_isready -q -h 127.0.0.1 -p 5432; then
  psql -h 127.0.0.1 -U postgres -d postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
else
  echo "PostgreSQL is not answering on 127.0.0.1:5432: the PostgreSQL index tests will fail under CI" >&2
fi
