import sys, time, numpy as np, warnings
warnings.simplefilter('ignore')
from pathlib import Path
from dataclasses import replace
from medsec_edge.runtime.bundle import open_bundle
from medsec_edge.runtime.watermark.models import BundleWatermarkModels
from medsec_edge.runtime.watermark.watermarker import Watermarker
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.evaluation.attacks import ATTACKS, attack_image
from medsec_edge.evaluation.measures import quality_row
from pydicom.data import get_testdata_file
bundle = sys.argv[1]; psnr = float(sys.argv[2]) if len(sys.argv) > 2 else 42.5
b = open_bundle(bundle)
wm = Watermarker(BundleWatermarkModels(b), target_psnr_db=psnr)
names = ['693_UNCR.dcm','MR2_UNCR.dcm','RG1_UNCR.dcm','JPGLosslessP14SV1_1s_1f_8b.dcm','MR-SIEMENS-DICOM-WithOverlays.dcm','emri_small.dcm','US1_UNCR.dcm','JPEG2000_UNC.dcm', 'RG3_UNCR.dcm', 'eCT_Supplemental.dcm', 'SC_rgb.dcm', 'mlut_18.dcm', 'vlut_04.dcm']
names = names[:int(sys.argv[3])] if len(sys.argv) > 3 else names
rng = np.random.default_rng(0)
res = {a: [] for a in ATTACKS}; acc = {a: [] for a in ATTACKS}
for n in names:
    img = read_image(get_testdata_file(n, download=False))
    payload = rng.bytes(8)
    r = wm.embed(img, payload); marked = replace(img, pixels=r.pixels)
    q = quality_row(img, r.pixels)
    line = []
    for a in ATTACKS:
        att = attack_image(marked, a, rng)
        ex = wm.extract(att)
        ok = ex.found and ex.payload == payload.hex()
        res[a].append(ok); acc[a].append(ex.raw_bit_accuracy(r.code_bits))
        line.append(f"{a}:{'Y' if ok else 'n'}{ex.raw_bit_accuracy(r.code_bits):.2f}")
    print(n, img.pixels.shape, f"psnr {q['psnr_window']:.2f} ssim {q['ssim_window']:.4f}", ' '.join(line), flush=True)
print('recovery', {a: f"{np.mean(v)*100:.0f}%" for a, v in res.items()})
print('bitacc', {a: round(float(np.mean(v)),3) for a, v in acc.items()})
