"""Mask files of `check --mask-dir`: one per input, never over another file, no patient data."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.tamper.checker import MODEL_NAME, OperatingPoint, TamperChecker
from medsec_edge.runtime.tamper.report import mask_name, path_tag, write_mask_png
from tests.tamper_fixtures import *  # noqa: F401,F403 - fixtures

ALL = OperatingPoint("all", 0.5, blind_logit=-1e9, wm_deficit=1e9, pixel_logit=-1e9)


@pytest.fixture
def twins(tmp_path, ct_path) -> list[Path]:
    """Two files with one SOP Instance UID (a copy, as an export or a re-send makes), one of them
    under a name that looks like a patient's."""
    paths = [tmp_path / "a" / "CT_small.dcm", tmp_path / "b" / "DOE_JOHN.dcm"]
    for path in paths:
        path.parent.mkdir()
        shutil.copy(ct_path, path)
    return paths


@pytest.fixture
def flagged(tamper_env):
    from medsec_edge.runtime.bundle import open_bundle

    bundle = open_bundle(tamper_env.calibrated)
    return TamperChecker(bundle.session(MODEL_NAME, threads=1), {"all": ALL})


def test_two_inputs_with_one_sop_uid_get_two_masks(flagged, twins, tmp_path):
    images = [read_image(p) for p in twins]
    assert images[0].meta.image_id == images[1].meta.image_id != ""
    masks = tmp_path / "masks"
    written = []
    for path, image in zip(twins, images):
        verdict = flagged.check(image, "all")
        assert verdict.tampered and verdict.mask.all()
        written.append(write_mask_png(verdict, masks, path, image.meta.image_id))
    assert written[0] != written[1] and all(p.parent == masks for p in written)
    assert sorted(p.name for p in masks.iterdir()) == sorted(p.name for p in written)  # no temporary left
    for path, mask in zip(twins, written):
        assert mask.name == f"{images[0].meta.image_id}.{path_tag(path)}.frame0.mask.png"
        assert "DOE" not in mask.name and "CT_small" not in mask.name
        with Image.open(mask) as png:
            assert png.mode == "L" and png.size == (128, 128) and (np.asarray(png) == 255).all()


def test_a_taken_name_gets_a_suffix_and_is_never_overwritten(flagged, twins, tmp_path):
    image = read_image(twins[0])
    masks = tmp_path / "masks"
    masks.mkdir()
    squatter = masks / mask_name(image.meta.image_id, twins[0], 0)
    squatter.write_bytes(b"not ours")
    quiet = replace(flagged.check(image, "all"), mask=np.zeros((128, 128), bool))
    first = write_mask_png(quiet, masks, twins[0], image.meta.image_id)
    again = write_mask_png(flagged.check(image, "all"), masks, twins[0], image.meta.image_id)
    assert squatter.read_bytes() == b"not ours"
    assert first.name == mask_name(image.meta.image_id, twins[0], 0, attempt=2)
    assert again.name == mask_name(image.meta.image_id, twins[0], 0, attempt=3)
    with Image.open(first) as a, Image.open(again) as b:  # each file keeps what was written to it
        assert not np.asarray(a).any() and np.asarray(b).all()
    assert len(list(masks.iterdir())) == 3


def test_masks_follow_the_umask(flagged, twins, tmp_path):
    image = read_image(twins[0])
    old = os.umask(0o027)
    try:
        mask = write_mask_png(flagged.check(image, "all"), tmp_path / "m", twins[0], image.meta.image_id)
    finally:
        os.umask(old)
    assert stat.S_IMODE(mask.stat().st_mode) == 0o640


def test_check_mask_dir_keeps_both_masks_of_same_uid_inputs(tamper_env, twins, tmp_path, restore_logging):
    from medsec_edge.runtime.cli import app

    masks = tmp_path / "masks"
    res = CliRunner().invoke(app, ["check", *map(str, twins), "--json", "--bundle", str(tamper_env.strict),
                                   "--mask-dir", str(masks), "--threads", "1"])
    assert res.exit_code == 1, res.output
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [r["tampered"] for r in rows] == [True, True]
    assert rows[0]["image_id"] == rows[1]["image_id"]
    assert rows[0]["mask"] != rows[1]["mask"]
    assert sorted(p.name for p in masks.iterdir()) == sorted(Path(r["mask"]).name for r in rows)
