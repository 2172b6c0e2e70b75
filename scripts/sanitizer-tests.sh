#!/usr/bin/env bash
# Builds Bastion's C extensions with AddressSanitizer and UndefinedBehaviorSanitizer into a copy of the package
# and runs the tests that drive them (header scan fuzz, the parser fuzzing of test_fuzz_parsers.py, file writer,
# common record, journal, blob contract) against that build. The normal build in src/ is left alone. Linux with
# GCC or Clang (libasan, libubsan).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r src/bastion "$work/bastion"
find "$work/bastion" -name '*.so' -delete
flags="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
  $PY setup.py -q build_ext --build-temp "$work/build" --build-lib "$work/lib" 2>&1 | grep -v "_BetaConfiguration\|warnings.warn" || true
for so in "$work"/lib/bastion/*/*.so; do
  rel="${so#"$work"/lib/}"
  cp "$so" "$work/$rel"
done
count="$(find "$work/bastion" -name '*.so' | wc -l)"
if [ "$count" -ne 3 ]; then
  echo "sanitizer build: expected 3 extensions, built $count" >&2
  exit 1
fi
asan="$(${CC:-cc} -print-file-name=libasan.so)"
ubsan="$(${CC:-cc} -print-file-name=libubsan.so)"
# Python itself is not instrumented: the runtime is preloaded, and leaks (CPython's own, at exit) not reported.
export PYTHONPATH="$work" LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
$PY - "$work" <<'CHECK'
import sys
import bastion.blobs._cwrite, bastion.index._crecord, bastion.ingest._cscan
for mod in (bastion.blobs._cwrite, bastion.index._crecord, bastion.ingest._cscan):
    assert mod.__file__.startswith(sys.argv[1]), f"{mod.__name__} loaded from {mod.__file__}, not the sanitizer build"
print("sanitizer build loaded from", sys.argv[1])
CHECK
$PY -m pytest -q -p no:cacheprovider tests/unit/test_cscan.py tests/unit/test_header_scan.py \
    tests/unit/test_fuzz_parsers.py tests/unit/test_cwrite.py tests/unit/test_crecord.py tests/unit/test_blob_journal.py \
    tests/contract/test_blobs.py "$@"
