"""Bad inputs for the before/after measurements of issue 8 point 6 (reading side)."""
import os, struct, zlib, shutil
from pathlib import Path
import numpy as np, pydicom, warnings
from pydicom.data import get_testdata_file
warnings.simplefilter("ignore")
d = Path("/tmp/ioread8/bad"); shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
os.mkfifo(d / "fifo.dcm")
os.symlink("/dev/zero", d / "zero.dcm")
def chunk(k, b): return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))
w = h = 20000
comp = zlib.compressobj(9)
row = b"\x00" * (w * 6 + 1)
parts = [comp.compress(row) for _ in range(h)] + [comp.flush()]
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
(d / "bomb16.png").write_bytes(png)
src = get_testdata_file("CT_small.dcm", download=False)
ds = pydicom.dcmread(src); ds.Rows = 65535; ds.Columns = 65535; ds.save_as(d / "huge_rows.dcm")
ds = pydicom.dcmread(src); ds.NumberOfFrames = 1000000; ds.save_as(d / "million_frames.dcm")
for name, val in (("slope_nan", "NaN"), ("slope_inf", "inf"), ("slope_1e308", "1e308")):
    ds = pydicom.dcmread(src); ds.RescaleSlope = val; ds.save_as(d / f"{name}.dcm")
ds = pydicom.dcmread(src); ds.RescaleIntercept = "NaN"; ds.save_as(d / "intercept_nan.dcm")
ds = pydicom.dcmread(src); ds.WindowCenter = "NaN"; ds.WindowWidth = "inf"; ds.save_as(d / "window_nan.dcm")
rng = np.random.default_rng(8)
(d / "random_after_dicm.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(4000))
for name in ("MR_small_RLE.dcm", "JPEG2000.dcm"):
    p = get_testdata_file(name, download=False)
    ds = pydicom.dcmread(p); ds.Rows = 65535; ds.Columns = 65535; ds.save_as(d / f"huge_{name}")
    ds = pydicom.dcmread(p); ds.NumberOfFrames = 1000000; ds.save_as(d / f"frames_{name}")
print(len(list(d.iterdir())), "files;", len(png), "byte PNG")
