"""What integrators do with bundles: ``bundle inspect``, ``verify``, ``install``, ``rollback``.

Layer: runtime (cli), over ``bundle.py`` (open_bundle, peek_manifest) and ``bundle_store.py``
(the device directory). ``--bundle DIR`` of every image command, and each BUNDLE argument here,
may name a bundle (folder or ``.tar``) or a device directory (then its current bundle).

``inspect`` shows a bundle that fails verification too, so one can see what it claims, but says
NOT VERIFIED (or that it cannot run here) on stdout and stderr and exits 3: what it shows then is
no more trustworthy than any unsigned file. Exit codes: 0 ok, 2 usage (a bad --trusted-keys),
3 bundle refused (unsigned, untrusted signer, altered, incompatible) or no previous to roll back to.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import typer

from medsec_edge.runtime.cli.help import command, group
from medsec_edge.runtime.cli.output import error as _error
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.cli.output import json_line, record, stdout, table
from medsec_edge.runtime.errors import BundleError, MedsecError

__all__ = ["register"]

BundleArg = typer.Argument(..., metavar="BUNDLE",
                           help="Bundle folder, .tar, or a device directory (its current bundle).")
TrustedKeysOpt = typer.Option(
    None, "--trusted-keys", metavar="DIR",
    help="Trusted signers' .pub files (default: $MEDSEC_EDGE_TRUSTED_KEYS, else the repo's bundles/trusted_keys).")
DeviceOpt = typer.Option(..., "--device", metavar="DIR",
                         help="Device directory: versions/, current and previous links, install.log.")
JsonOpt = typer.Option(False, "--json", help="One JSON object on stdout.")

SHORT_LINES = 8  # summary lines per section (calibration, evaluation) in the table view
SHORT_LEAVES = 4  # values per summary line
SHORT_CHARS = 160
SHORT_VALUE = 48  # characters of one value in a summary line


def register(app: typer.Typer) -> None:
    """Add ``bundle inspect|verify|install|rollback`` to ``app``."""
    bundle_app = group(
        "Inspect, verify, install and roll back signed model bundles.\n\nA device directory keeps "
        "each installed release under versions/ and a 'current' link that every command's --bundle "
        "DIR follows; install and rollback switch it atomically.",
        """
        medsec-edge bundle verify model.tar
        medsec-edge bundle install model.tar --device /var/lib/medsec/bundles""")
    command(bundle_app, bundle_inspect, "medsec-edge bundle inspect bundles/default --json", "inspect")
    command(bundle_app, bundle_verify, "medsec-edge bundle verify model.tar --trusted-keys keys/", "verify")
    command(bundle_app, bundle_install, """
        medsec-edge bundle install model.tar --device /var/lib/medsec/bundles
        medsec-edge run scans/ --out out/ --bundle /var/lib/medsec/bundles""", "install")
    command(bundle_app, bundle_rollback, "medsec-edge bundle rollback --device /var/lib/medsec/bundles",
            "rollback")
    app.add_typer(bundle_app, name="bundle")


# --------------------------------------------------------------------------------------------
# inspect


def bundle_inspect(
    bundle: Path = BundleArg,
    trusted_keys: Optional[Path] = TrustedKeysOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show a bundle: name, signer, models (variants under their model), payload, budgets,
    requirements, short calibration and evaluation summaries, the training and export commands.

    A bundle that fails verification is shown too, marked NOT VERIFIED, and exits 3."""
    try:
        info = describe(bundle, trusted_keys)
    except MedsecError as exc:
        _fail(exc)
        return
    if as_json:
        json_line(info)
    else:
        _print_description(info)
    if info["status"] != "verified":
        _error(f"{_STATUS_TEXT[info['status']]}: {info['problem']}")
        raise typer.Exit(3)


_STATUS_TEXT = {"verified": "verified", "cannot run here": "verified, but CANNOT RUN HERE",
                "not verified": "NOT VERIFIED"}


def describe(bundle: Path, trusted_keys: Optional[Path] = None) -> dict[str, Any]:
    """The inspect view of ``bundle`` as one JSON-ready dict, with the verification verdict:
    ``status`` is ``verified``, ``cannot run here`` (signature and files good, compatibility
    not) or ``not verified`` (then everything else is only what the manifest claims)."""
    from medsec_edge.runtime.bundle import (
        model_compatibility,
        open_bundle,
        peek_manifest,
        split_variant,
        version_id,
    )
    from medsec_edge.runtime.bundle_store import resolve_bundle_path

    path = resolve_bundle_path(bundle)
    status, problem = "verified", None
    try:
        opened = open_bundle(path, trusted_keys=trusted_keys)
    except BundleError as exc:
        opened, problem = None, str(exc)
        try:
            intact = open_bundle(path, trusted_keys=trusted_keys, check_compatibility=False)
        except BundleError:
            status = "not verified"
        else:
            status = "cannot run here"
    if opened is not None:
        manifest, manifest_bytes, signer = opened.manifest, opened.manifest_bytes, opened.key_id
        compatibility = opened.compatibility
    elif status == "cannot run here":
        manifest, manifest_bytes, signer = intact.manifest, intact.manifest_bytes, intact.key_id
        compatibility = model_compatibility(manifest)
    else:
        try:
            manifest, manifest_bytes = peek_manifest(path)
        except BundleError:
            raise BundleError(problem) from None  # nothing to show: the refusal says why
        signer, compatibility = manifest.key_id, {}

    models = []
    for name in sorted(manifest.models, key=lambda n: (split_variant(n)[0], "@" in n, n)):
        entry = manifest.models[name]
        reason = compatibility.get(name)
        base, variant = split_variant(name)
        models.append({
            "model": base,
            "name": name,
            "variant": variant,
            "precision": entry.precision,
            "target": entry.target,
            "file": entry.file,
            "sha256": entry.sha256,
            "inputs": [spec.to_dict() for spec in entry.inputs],
            "outputs": [spec.to_dict() for spec in entry.outputs],
            "runs_here": (reason is None) if name in compatibility else None,
            "reason": reason,
        })
    sections = {k: getattr(manifest, k) for k in ("training", "export", "calibration", "evaluation", "extra")}
    return {
        "path": str(path),
        "status": status,
        "verified": status != "not verified",
        "problem": problem,
        "name": manifest.name,
        "manifest_version": manifest.version,
        "created": manifest.created,
        "key_id": signer,
        "version_id": version_id(manifest.name, manifest_bytes),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "models": models,
        "payload": manifest.payload,
        "budgets_ms": manifest.budgets_ms,
        "requires": manifest.requires,
        "calibration": _brief(manifest.calibration),
        "evaluation": _brief(manifest.evaluation),
        "commands": {path_: text for section, data in sections.items() for path_, text in _commands(data, section)},
    }


def _commands(data: Any, prefix: str):
    """Every ``command`` string in a section, by dotted path (the exact commands that made it)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "command" and isinstance(value, str):
                yield f"{prefix}.command", value
            else:
                yield from _commands(value, f"{prefix}.{key}")


def _leaves(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for key, value in data.items():
            if key != "command":
                yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        yield prefix, f"[{len(data)} items]"
    else:
        yield prefix, data


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= SHORT_VALUE else text[: SHORT_VALUE - 1] + "…"


def _brief(section: dict) -> list[str]:
    """One short line per top-level key: its first few values by dotted path."""
    lines = []
    for key, value in section.items():
        if key == "command":
            continue
        if not isinstance(value, dict):
            lines.append(f"{key}: {_value(next(_leaves(value))[1])}")
            continue
        leaves = list(_leaves(value))
        shown = ", ".join(f"{p}={_value(v)}" for p, v in leaves[:SHORT_LEAVES])
        more = f", … (+{len(leaves) - SHORT_LEAVES})" if len(leaves) > SHORT_LEAVES else ""
        lines.append(f"{key}: {shown}{more}" if leaves else f"{key}: (empty)")
    return [line if len(line) <= SHORT_CHARS else line[: SHORT_CHARS - 1] + "…" for line in lines]


def _tensors(specs: list[dict]) -> str:
    return ", ".join(f"{s['name']} {s['dtype']} [{','.join('?' if d is None else str(d) for d in s['shape'])}]"
                     for s in specs)


def _mapping(data: dict) -> str:
    return ", ".join(f"{k} {_value(v)}" for k, v in data.items()) if data else "none"


def _print_description(info: dict) -> None:
    status = _STATUS_TEXT[info["status"]]
    signer = info["key_id"] or "none"
    if info["status"] == "not verified":
        signer += " (claimed by the manifest, NOT verified)"
    record(f"bundle {info['name']}" + ("" if info["status"] == "verified" else f"  [{status}]"), {
        "status": status,
        "path": info["path"],
        "version id": info["version_id"],
        "manifest": f"version {info['manifest_version']}, created {info['created']}",
        "signer key id": signer,
        "requires": _mapping(info["requires"]),
        "payload": _mapping(info["payload"]),
        "budgets ms": _mapping(info["budgets_ms"]),
    })
    rows, details = [], []
    for model in info["models"]:
        rows.append({
            "model": model["model"] if model["variant"] is None else f"  @{model['variant']}",
            "precision": model["precision"],
            "target": model["target"],
            "sha256": model["sha256"][:12],
            "runs here": model["runs_here"],
        })
        details.append(f"{model['name']}: {model['file']}: {_tensors(model['inputs'])} -> {_tensors(model['outputs'])}")
        if model["reason"]:
            details.append(f"{model['name']} cannot run here: {model['reason']}")
    for title in ("calibration", "evaluation"):
        lines = info[title]
        details += [f"{title}: {line}" for line in lines[:SHORT_LINES]]
        if len(lines) > SHORT_LINES:
            details.append(f"{title}: … {len(lines) - SHORT_LINES} more in manifest.json")
    details += [f"{where}: {text}" for where, text in info["commands"].items()]
    table(None, rows, ["model", "precision", "target", "sha256", "runs here"], details)


# --------------------------------------------------------------------------------------------
# verify, install, rollback


def bundle_verify(
    bundle: Path = BundleArg,
    trusted_keys: Optional[Path] = TrustedKeysOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Verify a bundle as every command does before loading it: signature by a trusted key,
    every file's sha256, and that it can run here (medsec-edge version, ONNX opset, engine
    target). One line: OK, or the precise refusal and exit 3."""
    from medsec_edge.runtime.bundle import open_bundle
    from medsec_edge.runtime.bundle_store import resolve_bundle_path

    try:
        path = resolve_bundle_path(bundle)
        opened = open_bundle(path, trusted_keys=trusted_keys)
    except MedsecError as exc:
        if as_json:
            json_line({"path": str(bundle), "ok": False, "error": str(exc)})
        _fail(exc)
        return
    blocked = sorted(name for name, reason in opened.compatibility.items() if reason is not None)
    row = {"path": str(path), "ok": True, "name": opened.manifest.name, "version_id": opened.version_id,
           "key_id": opened.key_id, "models": len(opened.manifest.models), "cannot_run_here": blocked}
    if as_json:
        json_line(row)
        return
    note = f"; {len(blocked)} cannot run here: {', '.join(blocked)} (see 'bundle inspect')" if blocked else ""
    stdout().print(f"OK {path}: bundle {opened.manifest.name!r} ({row['models']} models) signed by "
                   f"{opened.key_id}, version {opened.version_id}{note}", highlight=False, markup=False,
                   soft_wrap=True)


def bundle_install(
    bundle: Path = BundleArg,
    device: Path = DeviceOpt,
    trusted_keys: Optional[Path] = TrustedKeysOpt,
    keep: Optional[int] = typer.Option(
        None, "--keep", min=0, metavar="N",
        help="Besides the current version, keep the N most recently used (the previous always); default: all."),
    as_json: bool = JsonOpt,
) -> None:
    """Verify a bundle (folder or .tar), copy it into DIR/versions/<name>-<sha12>, verify the
    copy, and switch DIR/current to it atomically; the old current becomes DIR/previous.
    Installing the current version again changes nothing."""
    from medsec_edge.runtime.bundle_store import install_bundle

    try:
        change = install_bundle(bundle, device, trusted_keys=trusted_keys, keep=keep)
    except MedsecError as exc:
        _fail(exc)
        return
    _print_change(change.to_dict(), as_json)


def bundle_rollback(
    device: Path = DeviceOpt,
    trusted_keys: Optional[Path] = TrustedKeysOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Switch DIR/current back to DIR/previous (and previous to what was current), after
    verifying that bundle again. Exit 3 if there is no previous."""
    from medsec_edge.runtime.bundle_store import rollback

    try:
        change = rollback(device, trusted_keys=trusted_keys)
    except MedsecError as exc:
        _fail(exc)
        return
    _print_change(change.to_dict(), as_json)


def _print_change(row: dict, as_json: bool) -> None:
    if as_json:
        json_line(row)
        return
    shown = {k: v for k, v in row.items() if k != "removed" or v}
    record(f"bundle {row['action']}: {row['current']} is current", shown)
