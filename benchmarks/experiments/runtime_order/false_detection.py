"""False detections of the payload decoder on uniformly random words (hard: errors only; soft: + erasures)."""
import sys, time
import numpy as np
try:
    from medsec_edge.runtime.watermark import payload as P
except ImportError:
    from medsec_edge.runtime import payload as P
n_hard, n_soft = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(20261204)
for name, codec, n in (("hard", P.PayloadCodec(soft=False), n_hard), ("soft", P.PayloadCodec(), n_soft)):
    found = rs = 0
    kinds = {}
    t0 = time.perf_counter()
    for start in range(0, n, 10_000):
        for x in rng.standard_normal((min(10_000, n - start), 128)):
            out = codec.decode(x)
            rs += out.bit_errors_raw is not None
            if out.found:
                found += 1
                k = getattr(out, "kind", "identity")
                kinds[k] = kinds.get(k, 0) + 1
    print(f"{P.__name__} {name}: {n} random words, RS-decoded {rs} ({rs/n:.2e}), found {found} {kinds}, "
          f"{(time.perf_counter()-t0)/n*1e6:.0f} us/word")
print(f"false_accept_bound() = {P.false_accept_bound():.3e}")
