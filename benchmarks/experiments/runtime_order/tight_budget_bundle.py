"""A copy of bundles/default with budgets of 0.01 ms (every stage misses), signed by a new key."""
import shutil, sys
from pathlib import Path
from medsec_edge.runtime.bundle import open_bundle, write_bundle, generate_signing_key, default_trust_dir
root = Path(sys.argv[1]); src = Path(sys.argv[2])
trust = root / "trust"; trust.mkdir(parents=True, exist_ok=True)
for pub in default_trust_dir().glob("*.pub"):
    shutil.copy(pub, trust / pub.name)
kid = generate_signing_key(root / "sign.pem", root / "sign.pub")
shutil.copy(root / "sign.pub", trust / f"{kid}.pub")
b = open_bundle(src)
data = b.manifest.to_dict()
data["budgets_ms"] = {k: 0.01 for k in data["budgets_ms"]}
files = {n: src / e.file for n, e in b.manifest.models.items()}
write_bundle(root / "tight", data, files, root / "sign.pem")
print(trust, root / "tight")
