import sys, io, pydicom
from pathlib import Path
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.dicom_writer import build_derived_dataset
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
for f in sys.argv[2:]:
    try:
        img = read_image(f)
        ds = build_derived_dataset(img, img.pixels, record={"x": 1})
    except Exception as e:
        print("skip", Path(f).name, type(e).__name__, str(e)[:80]); continue
    ds.save_as(out / Path(f).name, enforce_file_format=True)
    print("ok", Path(f).name)
