"""Read limits: defaults, environment overrides, and the header check every reader makes."""

from __future__ import annotations

import pytest
from medsec_edge.runtime.errors import ConfigError
from medsec_edge.runtime.io.limits import ReadLimits, read_limits


def test_defaults_hold_a_large_tomosynthesis_stack_and_refuse_a_header_bomb():
    limits = read_limits({})
    assert limits == ReadLimits()
    # 70 frames of 2457x1890 16-bit: about 650 MB, an ordinary large medical object.
    assert limits.check_image("DICOM", 2457, 1890, 70, 1, 2) == 2457 * 1890 * 70 * 2
    with pytest.raises(ValueError, match=r"65535x65535 .*\(MEDSEC_EDGE_MAX_SIDE\)"):
        limits.check_image("DICOM", 65535, 65535, 1, 1, 2)
    with pytest.raises(ValueError, match="1000000 frames"):
        limits.check_image("DICOM", 64, 64, 1_000_000, 1, 2)
    with pytest.raises(ValueError, match="MAX_IMAGE_BYTES"):
        limits.check_image("PNG", 20000, 20000, 1, 3, 2)


@pytest.mark.parametrize("field, value", [("rows", 0), ("columns", -1), ("frames", 0), ("samples", 0)])
def test_non_positive_dimensions_are_refused(field, value):
    args = {"rows": 64, "columns": 64, "frames": 1, "samples": 1}
    args[field] = value
    with pytest.raises(ValueError, match="at least 1"):
        ReadLimits().check_image("DICOM", args["rows"], args["columns"], args["frames"], args["samples"], 2)


def test_environment_overrides_with_size_suffixes():
    limits = read_limits({"MEDSEC_EDGE_MAX_IMAGE_BYTES": "64M", "MEDSEC_EDGE_MAX_FILE_BYTES": "2G",
                          "MEDSEC_EDGE_MAX_SIDE": "4096", "MEDSEC_EDGE_MAX_FRAMES": "", "MEDSEC_EDGE_MAX_EXPANSION": "10"})
    assert limits.max_image_bytes == 64 * 2**20
    assert limits.max_file_bytes == 2 * 2**30
    assert limits.max_side == 4096 and limits.max_expansion == 10
    assert limits.max_frames == ReadLimits().max_frames  # empty means default
    with pytest.raises(ValueError, match="4096 per side"):
        limits.check_image("TIFF", 5000, 100)


@pytest.mark.parametrize("text", ["lots", "-5", "1.5G", "0", "12T"])
def test_malformed_environment_values_are_a_config_error(text):
    with pytest.raises(ConfigError) as info:
        read_limits({"MEDSEC_EDGE_MAX_SIDE": text})
    assert info.value.exit_code == 2


def test_limits_are_frozen():
    with pytest.raises(AttributeError):
        ReadLimits().max_side = 1  # type: ignore[misc]
