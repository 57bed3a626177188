"""Modules entered and layer climbs over one watermark_file call (CT_small, sealed).

Climb: a call from a function of module A into module B where B imports A (transitively,
lazy imports included), i.e. a lower layer calling back into a higher one. Counted as distinct
(caller function -> callee function) edges and as total call events.
"""
import ast, importlib, sys, tempfile
from pathlib import Path

repo = Path(sys.argv[1])
pipeline = importlib.import_module("medsec_edge.runtime.pipeline")
try:
    from medsec_edge.runtime.crypto.device_keys import load_or_create_ring
except ImportError:
    from medsec_edge.runtime.seal_stage import load_or_create_ring

tmp = Path(tempfile.mkdtemp())
ring = load_or_create_ring(tmp / "ring")
wm, bundle = pipeline.load_watermarker(repo / "bundles" / "default", threads=1)
checker = pipeline.load_checker(repo / "bundles" / "default", threads=1)
src = repo / "samples" / "CT_small.dcm"
explicit = bytes.fromhex("0123456789abcdef")
def once(name):
    return pipeline.watermark_file(src, tmp / name, wm, bundle, None, explicit, checker=checker, keyring=ring)
r = once("warm.dcm")
assert r.status == "ok" and r.sealed, r

def module_file(name):
    m = sys.modules.get(name)
    return getattr(m, "__file__", None)

def imports_of(name):
    f = module_file(name)
    if not f: return set()
    tree = ast.parse(Path(f).read_text())
    pkg = name if f.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("medsec_edge") and m in sys.modules}

ours = [m for m in sys.modules if m.startswith("medsec_edge")]
direct = {m: imports_of(m) for m in ours}
def closure(m, seen=None):
    seen = set() if seen is None else seen
    for d in direct.get(m, ()):
        if d not in seen:
            seen.add(d); closure(d, seen)
    return seen
deps = {m: closure(m) for m in ours}

entered, edges, events = set(), set(), 0
hops = set()
io_counts = {}
def prof(frame, event, arg):
    global events
    if event == "c_call":
        n = getattr(arg, "__name__", "")
        if n in ("replace", "fsync", "rename"): io_counts[n] = io_counts.get(n, 0) + 1
        return
    if event != "call": return
    if frame.f_code.co_name in ("dcmread", "dcmwrite") and frame.f_globals.get("__name__", "").startswith("pydicom"):
        io_counts[frame.f_code.co_name] = io_counts.get(frame.f_code.co_name, 0) + 1
    callee = frame.f_globals.get("__name__", "")
    if not callee.startswith("medsec_edge"): return
    entered.add(callee)
    back = frame.f_back
    while back is not None and not back.f_globals.get("__name__", "").startswith("medsec_edge"):
        back = back.f_back
    if back is None: return
    caller = back.f_globals["__name__"]
    if caller != callee: hops.add((f"{caller}.{back.f_code.co_name}", f"{callee}.{frame.f_code.co_name}"))
    if caller != callee and caller in deps.get(callee, ()):
        events += 1
        edges.add((f"{caller}.{back.f_code.co_name}", f"{callee}.{frame.f_code.co_name}"))
sys.setprofile(prof)
r = once("out.dcm")
sys.setprofile(None)
assert r.status == "ok" and r.sealed
print("modules entered:", len(entered))
print("io:", dict(sorted(io_counts.items())))
for m in sorted(entered): print("  ", m)
print("cross-module call edges (distinct):", len(hops))
print("climbs (distinct edges):", len(edges), " climb events:", events)
for e in sorted(hops): print("   hop", e[0], "->", e[1])
for e in sorted(edges): print("  ", e[0], "->", e[1])
