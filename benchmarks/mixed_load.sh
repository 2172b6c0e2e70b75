#!/bin/bash
# One association storing while a viewer loads the server: DCMTK storescu sends 2,000 small instances to a fresh
# `bastion serve` while two clients fetch a rendered CT frame (PNG) from its HTTP worker in a loop, and prints the
# store rate. Run it with two checkouts' src directories in turn (BENCHMARKS.md, item 62):
#
#   benchmarks/mixed_load.sh OTHER/src src OTHER/src src ...
#
# The data directories are kept under $WORKDIR (default /tmp): deleting many files slows file creation here for
# minutes afterwards (BENCHMARKS.md, section 1).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-/tmp}
CACHE="$HOME/.cache/bastion-benchmarks"
for kind in small:2000 ct:1000; do
  dir="$CACHE/${kind%%:*}-${kind##*:}"
  [ -d "$dir" ] || .venv/bin/python benchmarks/corpus.py --kind "${kind%%:*}" --count "${kind##*:}" --out "$dir"
done
free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

for src in "$@"; do
  d=$(mktemp -d -p "$WORKDIR" mixed-load.XXXX)
  port=$(free_port)
  http=$(free_port)
  PYTHONPATH=$src setsid .venv/bin/bastion serve --data "$d/data" --host 127.0.0.1 --aet BASTION \
    --dicom-port "$port" --http-port "$http" > "$d/log" 2>&1 &
  server=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$http/health" > /dev/null && break; sleep 0.1; done
  TCP_NODELAY=1 storescu -aec BASTION 127.0.0.1 "$port" "$(ls "$CACHE"/ct-1000/*.dcm | head -1)"
  url=$(.venv/bin/python - "$http" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}/dicom-web"
study = json.load(urllib.request.urlopen(f"{base}/studies"))[0]["0020000D"]["Value"][0]
inst = json.load(urllib.request.urlopen(f"{base}/studies/{study}/instances"))[0]
series, sop = inst["0020000E"]["Value"][0], inst["00080018"]["Value"][0]
print(f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1/rendered")
PY
)
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Accept: image/png" "$url")
  if [ "$code" != 200 ]; then  # the viewers' loops would spin on errors: no load, a meaningless figure
    echo "$src: the rendered frame answered HTTP $code; nothing measured" >&2
    kill -TERM "$server"
    exit 1
  fi
  viewers=()
  for _ in 1 2; do
    (while [ ! -e "$d/stop" ]; do curl -sf -o /dev/null -H "Accept: image/png" "$url"; done) &
    viewers+=($!)
  done
  sleep 1
  start=$(date +%s.%N)
  TCP_NODELAY=1 storescu -aec BASTION 127.0.0.1 "$port" "$CACHE"/small-2000/*.dcm > "$d/storescu.log" 2>&1
  end=$(date +%s.%N)
  touch "$d/stop"
  wait "${viewers[@]}"
  kill -TERM "$server"
  wait "$server" || true
  echo "$src: $(.venv/bin/python -c "print(round(2000 / ($end - $start), 1))") small instances/s over one association, two viewers rendering"
done
