"""Options shared by the commands, so each is spelled and explained once.

Layer: runtime (cli). One vocabulary: a key set is always ``--keys DIR``, a recipient's public
key set ``--to DIR``. The spellings of earlier versions stay as hidden options that still work
and say once on stderr what replaces them (``keys.resolve_keys``).
"""

from __future__ import annotations

import typer

BundleOpt = typer.Option(None, "--bundle", help="Model bundle (default: the repo's bundles/default).")
ThreadsOpt = typer.Option(None, "--threads", help="Inference threads (default: all cores).")
OperatingPointOpt = typer.Option(None, "--operating-point",
                                 help="Threshold set from the bundle: fpr0.1 (default) or fpr1.")
JsonOpt = typer.Option(False, "--json", help="JSON lines on stdout: one object per input.")

DEVICE_KEYS = "$MEDSEC_EDGE_KEYS or ~/.config/medsec-edge/keys"
DEVICE_REGISTRY = "$MEDSEC_EDGE_REGISTRY or ~/.local/share/medsec-edge/registry.sqlite3"


def registry_option(default_help: str) -> typer.Option:
    """``--registry PATH``: the evidence registry (SQLite) of this device."""
    return typer.Option(None, "--registry", metavar="PATH",
                        help=f"Evidence registry (default: {DEVICE_REGISTRY}; {default_help}).")


NoRegistryOpt = typer.Option(False, "--no-registry", help="Do not use the evidence registry at all.")


def keys_option(default_help: str) -> typer.Option:
    """``--keys DIR``: the key set (or ring) with every key the device uses."""
    return typer.Option(None, "--keys", metavar="DIR",
                        help=f"Key set or ring (default: the device set, {DEVICE_KEYS}; {default_help}).")


# Hidden spellings of earlier versions.
LegacyWatermarkKeyOpt = typer.Option(None, "--key", hidden=True,
                                     help="Deprecated: a watermark key file (now in the key set).")
LegacyKeySetOpt = typer.Option(None, "--key", hidden=True, help="Deprecated spelling of --keys.")
