#!/usr/bin/env bash
# Fetches the prebuilt OHIF viewer (npm package @ohif/app, pinned version and integrity) and unpacks
# its static dist/ into <repo>/var/ohif, trimmed of what a DICOMweb PACS viewer does not use
# (dist/ort, dist/dicom-microscopy-viewer, *.map: 204 MB -> about 49 MB).
# Idempotent and quiet when already done (a stamp file records the version).
# The shipped app-config.js is left as it is: the server serves its own /app-config.js.
set -euo pipefail

OHIF_VERSION=3.13.2
OHIF_INTEGRITY='sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=='

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="$repo/var/ohif"
stamp="$dest/.bastion-ohif-version"
want="@ohif/app@$OHIF_VERSION $OHIF_INTEGRITY"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$dest/index.html" ]; then
  exit 0
fi

for tool in npm tar openssl base64; do
  command -v "$tool" >/dev/null || { echo "fetch-ohif: '$tool' is required" >&2; exit 1; }
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-ohif: fetching @ohif/app@$OHIF_VERSION"
(cd "$tmp" && npm pack "@ohif/app@$OHIF_VERSION" --silent --no-audit --no-fund >/dev/null)
tarball="$tmp/ohif-app-$OHIF_VERSION.tgz"
[ -f "$tarball" ] || { echo "fetch-ohif: npm pack produced no $tarball" >&2; exit 1; }

got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$got" != "$OHIF_INTEGRITY" ]; then
  echo "fetch-ohif: INTEGRITY MISMATCH for @ohif/app@$OHIF_VERSION" >&2
  echo "  expected $OHIF_INTEGRITY" >&2
  echo "  got      $got" >&2
  exit 1
fi

mkdir -p "$tmp/x"
tar -xzf "$tarball" -C "$tmp/x" package/dist
dist="$tmp/x/package/dist"
[ -f "$dist/index.html" ] || { echo "fetch-ohif: package has no dist/index.html" >&2; exit 1; }
rm -rf "$dist/ort" "$dist/dicom-microscopy-viewer"
find "$dist" -type f -name '*.map' -delete

# Swap in atomically-ish: build beside the destination, then replace it.
mkdir -p "$(dirname "$dest")"
staging="$dest.new.$$"
rm -rf "$staging"
mv "$dist" "$staging"
printf '%s\n' "$want" >"$staging/.bastion-ohif-version"
rm -rf "$dest"
mv "$staging" "$dest"
echo "fetch-ohif: installed $(du -sh "$dest" | cut -f1) in $dest"
