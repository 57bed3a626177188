"""Every extraction states what the image's size can carry (issue 11: small images say so)."""

from medsec_edge.runtime.watermark.spec import CODE_BITS, SMALL_SIDE, TILE, capacity


def test_capacity_counts_tiles_at_working_resolution():
    assert capacity(512, 512) == {"tiles": 64.0, "pixels_per_bit": 512 * 512 / CODE_BITS, "robust": True}
    assert capacity(64, 64)["tiles"] == 4.0 and capacity(64, 64)["robust"] is False
    # a 2048 radiograph is read at 1/8: 64 tiles of 256 native pixels, as many as a 512 CT
    assert capacity(2048, 2048)["tiles"] == (2048 // 8 / TILE) ** 2
    assert capacity(SMALL_SIDE, 300)["robust"] and not capacity(SMALL_SIDE - 1, 300)["robust"]
