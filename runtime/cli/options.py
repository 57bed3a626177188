"""Options shared by the image commands, so each is spelled and explained once.

Layer: runtime (cli).
"""

from __future__ import annotations

import typer

BundleOpt = typer.Option(None, "--bundle", help="Model bundle (default: the repo's bundles/default).")
KeyOpt = typer.Option(None, "--key", help="Watermark key file (default: $MEDSEC_EDGE_KEY or ~/.config/medsec-edge/watermark.key).")
ThreadsOpt = typer.Option(None, "--threads", help="Inference threads (default: all cores).")
OperatingPointOpt = typer.Option(None, "--operating-point",
                                 help="Threshold set from the bundle: fpr0.1 (default) or fpr1.")
