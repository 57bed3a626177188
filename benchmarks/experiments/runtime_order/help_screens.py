"""Render every help screen of medsec-edge at 80 columns: how many have an example, how many show a flag as <bool>."""
import os, sys
os.environ["COLUMNS"] = "80"
import typer
from typer.testing import CliRunner
from medsec_edge.runtime.cli import app

root = typer.main.get_command(app)
paths = []
def walk(cmd, path):
    paths.append(path)
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        if not sub.hidden:
            walk(sub, path + [name])
walk(root, [])
ex = boolean = 0
for p in paths:
    out = CliRunner().invoke(app, p + ["--help"], env={"COLUMNS": "80"}).output
    has_ex = "Example" in out
    has_bool = "<bool>" in out
    ex += has_ex; boolean += has_bool
    print(f"{' '.join(p) or '(root)':28} example={has_ex!s:5} <bool>={has_bool!s:5} widest={max(len(l) for l in out.splitlines())}")
print(f"{len(paths)} help screens: {ex} with an example, {boolean} showing <bool>")
