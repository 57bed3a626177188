#!/usr/bin/env bash
# usage: measure.sh LABEL MEDSEC PYTHON   (run from /tmp/dicompacs-h5)
L=$1; M=$2; PY=$3; W=/tmp/dicompacs-h5; cd $W; rm -rf $L; mkdir -p $L/home
export HOME=$W/$L/home MEDSEC_EDGE_THREADS=1 MEDSEC_EDGE_KEY=$W/wm.key
read H D < orthanc/ports
echo "=== [$L] run"
$M run in --out $L/out --keys $W/keys --json 2>/dev/null | python3 -c "
import sys,json
for l in sys.stdin:
  r=json.loads(l)
  if 'input' in r: print(' ', r['input'], r['status'], r.get('sealed'))" 
echo "=== [$L] file meta of out/CT_small.dcm"
/usr/bin/dcmdump $L/out/CT_small.dcm | grep -E "\(0002,001[23]\)"
echo "=== [$L] Source Image Sequence of out/CT_sis.dcm (input had 1 item)"
/usr/bin/dcmdump $L/out/CT_sis.dcm | grep -E "\(0008,1155\)" | grep -n . | sed 's/#.*//'
echo "=== [$L] Orthanc: storescu -xi, retrieve, verify, dcmsign --verify"
for id in $(curl -s http://127.0.0.1:$H/instances | python3 -c "import json,sys;print(' '.join(json.load(sys.stdin)))"); do curl -s -X DELETE http://127.0.0.1:$H/instances/$id >/dev/null; done
/usr/bin/storescu -xi -aec ORTHANC 127.0.0.1 $D $L/out/CT_small.dcm $L/out/MR_small.dcm $L/out/emri_small.dcm; echo "  storescu -xi rc=$?"
mkdir -p $L/orthanc $L/conv
for id in $(curl -s http://127.0.0.1:$H/instances | python3 -c "import json,sys;print(' '.join(json.load(sys.stdin)))"); do curl -s http://127.0.0.1:$H/instances/$id/file -o $L/orthanc/$id.dcm; curl -s -X POST http://127.0.0.1:$H/instances/$id/modify -d '{"Transcode":"1.2.840.10008.1.2.4.80","Keep":["SOPInstanceUID"],"Force":true}' -o $L/conv/orthanc-jls-$id.dcm; done
for n in CT_small MR_small emri_small; do /usr/bin/dcmconv +ti $L/out/$n.dcm $L/conv/$n.ti.dcm; /usr/bin/dcmcjpls $L/out/$n.dcm $L/conv/$n.jls.dcm; /usr/bin/dcmcrle $L/out/$n.dcm $L/conv/$n.rle.dcm; done
for f in $L/orthanc/*.dcm $L/conv/*.dcm; do
  ts=$(/usr/bin/dcmdump $f 2>/dev/null | grep "(0002,0010)" | awk '{print $3}')
  /usr/bin/dcmsign --verify +cf $W/keys/dicom_rsa.cert.pem $f > $W/ds.txt 2>&1; rc=$?
  echo "  $(basename $f | cut -c1-28) $ts dcmsign=$rc $(grep -m1 'Verification' $W/ds.txt | sed 's/.*Verification : //' | cut -c1-60)"
done
echo "=== [$L] medsec-edge verify --keys (Orthanc-stored, then +ti/jls/rle/orthanc-jls)"
$M verify $L/orthanc/*.dcm $L/conv/*.dcm --keys $W/keys --json 2>$L/verify.err | python3 -c "
import sys,json
for l in sys.stdin:
  r=json.loads(l); s=r.get('seal') or {}; d=r.get('dicom_signature') or {}
  print(' ', r['path'].split('/')[-1][:28], 'valid=%s seal=%s sig=%s' % (r['valid'], s.get('status'), d.get('status')), '|', r['reason'][:90])"
$M verify $L/orthanc/*.dcm $L/conv/*.dcm --keys $W/keys >/dev/null 2>&1; echo "  exit=$?"
echo "=== [$L] dciodvfy errors (input -> output)"
for n in CT_small MR_small emri_small CT_sis; do a=$(/usr/bin/dciodvfy in/$n.dcm 2>&1 | grep -c "^Error"); b=$(/usr/bin/dciodvfy $L/out/$n.dcm 2>&1 | grep -c "^Error"); echo "  $n: $a -> $b"; done
echo "=== [$L] window added to a sealed file that had none"
$PY - $L <<'PY'
import sys, pydicom
L = sys.argv[1]
ds = pydicom.dcmread(f"{L}/out/emri_small.dcm")
print("  emri output has WindowCenter:", "WindowCenter" in ds)
ds.WindowCenter, ds.WindowWidth = 40, 80
ds.save_as(f"{L}/windowed.dcm")
ds = pydicom.dcmread(f"{L}/out/CT_small.dcm")
ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8.99"; ds.save_as(f"{L}/unknown_ts.dcm")
ds = pydicom.dcmread(f"{L}/out/CT_small.dcm"); ds.PixelData = b""; ds.save_as(f"{L}/empty_pixels.dcm")
import os; open(f"{L}/random.dcm","wb").write(b"\0"*128 + b"DICM" + os.urandom(4096))
PY
$M verify $L/windowed.dcm --keys $W/keys --json 2>/dev/null | cut -c1-300; $M verify $L/windowed.dcm --keys $W/keys >/dev/null 2>&1; echo "  exit=$?"
echo "=== [$L] bad files in one batch: unknown TS, empty Pixel Data, random after DICM, then a good one"
$M verify $L/unknown_ts.dcm $L/empty_pixels.dcm $L/random.dcm $L/out/CT_small.dcm --keys $W/keys --json > $L/bad.out 2> $L/bad.err; echo "  exit=$?"
python3 -c "
import json,sys
for l in open('$L/bad.out'):
  try: r=json.loads(l)
  except Exception: continue
  print(' ', r['path'].split('/')[-1], 'valid=%s' % r['valid'], '|', r['reason'][:110])"
echo "  stderr lines: $(wc -l < $L/bad.err), tracebacks: $(grep -c Traceback $L/bad.err)"; grep -m2 -E "Error|error" $L/bad.err | cut -c1-150
