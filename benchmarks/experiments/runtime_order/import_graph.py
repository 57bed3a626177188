"""Import graph of a runtime tree: cycles and imports of workstation packages (relative imports resolved)."""
import ast, sys
from pathlib import Path
root = Path(sys.argv[1]) / "runtime"
def name_of(f):
    parts = list(f.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    return ".".join(["medsec_edge.runtime", *parts])
files = {name_of(f): f for f in root.rglob("*.py")}
graph, outside = {}, []
for name, f in files.items():
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("medsec_edge"): continue
            subs = [f"{mod}.{a.name}" for a in node.names]
            deps.update(subs if all(s in files for s in subs) else [mod])
    for d in deps:
        if d.split(".")[1] != "runtime": outside.append(f"{name} -> {d}")
    graph[name] = {d for d in deps if d in files and d != name}
print("modules:", len(files))
print("imports of workstation packages:", len(outside)); [print("  ", o) for o in sorted(outside)]
# strongly connected components (Tarjan)
index, low, on, st, sccs, i = {}, {}, set(), [], [], [0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v] = low[v] = i[0]; i[0] += 1; st.append(v); on.add(v)
    for w in graph[v]:
        if w not in index: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in graph:
    if v not in index: sc(v)
print("import cycles (strongly connected groups):", len(sccs)); [print("  ", " <-> ".join(c)) for c in sccs]
