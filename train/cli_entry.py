"""Argument parsing for the training recipes, shared by `medsec-edge train watermark|tamper`.

``python -m medsec_edge.train --out DIR`` trains the watermark; with ``--recipe tamper`` the blind
tamper detector, with ``--recipe fingerprint`` the learned content fingerprint's encoder. The
exact command is stored in the checkpoint and from there in the bundle.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import fields
from pathlib import Path



def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = "watermark"
    if "--recipe" in argv:
        i = argv.index("--recipe")
        recipe = argv[i + 1] if i + 1 < len(argv) else ""
    if recipe == "fingerprint":
        from medsec_edge.train.fingerprint_trainer import (FingerprintConfig as Config,
                                                           FingerprintTrainer as Trainer)
    elif recipe == "tamper":
        from medsec_edge.train.tamper_trainer import TamperConfig as Config, TamperTrainer as Trainer
    elif recipe == "watermark":
        from medsec_edge.train.watermark_trainer import TrainConfig as Config, WatermarkTrainer as Trainer
    else:
        raise SystemExit(f"unknown --recipe {recipe!r}: expected watermark, tamper or fingerprint")
    parser = argparse.ArgumentParser(prog="python -m medsec_edge.train")
    parser.add_argument("--recipe", choices=("watermark", "tamper", "fingerprint"), default="watermark")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--until", type=int, default=None, help="stop at this step (the schedule still spans --steps)")
    for f in fields(Config):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # one line per encoded tile otherwise
    config = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    command = shlex.join(["python", "-m", "medsec_edge.train", *argv])
    Trainer(config, args.out, command=command).run(until=args.until)
