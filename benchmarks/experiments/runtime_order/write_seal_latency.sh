#!/bin/bash
# usage: latency.sh BIN LABEL ; 6 runs over samples/, prints write/seal p50 per run and overall median of write+seal
BIN=$1; LABEL=$2; W=/tmp/wm8/lat-$LABEL; rm -rf $W; mkdir -p $W
export HOME=$W/home MEDSEC_EDGE_KEYS=$W/ring MEDSEC_EDGE_KEY=$W/wm.key MEDSEC_EDGE_THREADS=1
for i in 1 2 3 4 5 6; do
  $BIN run /work/main/samples --out $W/out$i --json --bundle /work/main/bundles/default > /dev/null 2>&1 || echo "run $i rc=$?"
done
python3 - $W <<'PY'
import json, sys, glob, statistics
sums, w, s = [], [], []
for f in sorted(glob.glob(sys.argv[1] + "/out*/report.json")):
    r = json.load(open(f))
    for rec in r["records"]:
        lat = rec["latency_ms"]; sums.append(lat["write"] + lat["seal"]); w.append(lat["write"]); s.append(lat["seal"])
print(f"n={len(sums)} write p50={statistics.median(w):.2f} ms seal p50={statistics.median(s):.2f} ms write+seal p50={statistics.median(sums):.2f} ms")
PY
