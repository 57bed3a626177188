"""Argument parsing for the training recipe, shared by `medsec-edge train watermark`."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from medsec_edge.train.watermark_trainer import TrainConfig, WatermarkTrainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medsec_edge.train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--until", type=int, default=None, help="stop at this step (the schedule still spans --steps)")
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    command = shlex.join(["python", "-m", "medsec_edge.train", *(sys.argv[1:] if argv is None else argv)])
    WatermarkTrainer(config, args.out, command=command).run(until=args.until)
