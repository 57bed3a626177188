"""The crypto evaluation: its statistics against hand-computed values, AES-GCM against the
published NPCR/UACI critical values, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the crypto statistics need scipy: pip install 'medsec-edge[eval]'")

from medsec_edge.evaluation.crypto_eval import (  # noqa: E402
    NPCR_CRITICAL_256_ALPHA05_PCT,
    UACI_CRITICAL_256_ALPHA05_PCT,
    adjacent_correlation,
    chi_square_uniformity,
    constant_guess_psnr,
    entropy_bits_per_byte,
    npcr_critical_pct,
    npcr_pct,
    uaci_critical_pct,
    uaci_pct,
)


def test_npcr_uaci_by_hand():
    a = np.zeros((2, 2), np.uint8)
    b = a.copy()
    b[0, 1] = 255
    assert npcr_pct(a, a) == 0.0 and uaci_pct(a, a) == 0.0
    assert npcr_pct(a, b) == pytest.approx(25.0)
    assert uaci_pct(a, b) == pytest.approx(25.0)  # |0 - 255| / 255 on one of four pixels
    c = a.copy()
    c[1, 1] = 51
    assert uaci_pct(a, c) == pytest.approx(100 * 51 / 255 / 4)


def test_two_random_images_have_the_expected_npcr_and_uaci():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (256, 256), dtype=np.uint8) for _ in range(2))
    assert npcr_pct(a, b) == pytest.approx(100 * 255 / 256, abs=0.1)  # 99.609%
    assert uaci_pct(a, b) == pytest.approx(100 * 257 / 768, abs=0.3)  # 33.464%


def test_critical_value_formulas_give_the_published_256x256_values():
    assert npcr_critical_pct(256 * 256) == pytest.approx(NPCR_CRITICAL_256_ALPHA05_PCT, abs=5e-5)
    lo, hi = uaci_critical_pct(256 * 256)
    assert lo == pytest.approx(UACI_CRITICAL_256_ALPHA05_PCT[0], abs=1e-4)
    assert hi == pytest.approx(UACI_CRITICAL_256_ALPHA05_PCT[1], abs=1e-4)
    assert npcr_critical_pct(64 * 64) < npcr_critical_pct(256 * 256)  # smaller images, looser bound


def test_entropy_by_hand():
    assert entropy_bits_per_byte(bytes(range(256)) * 16) == pytest.approx(8.0)
    assert entropy_bits_per_byte(bytes(100)) == 0.0
    assert entropy_bits_per_byte(np.array([0, 255] * 50, np.uint8)) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    assert entropy_bits_per_byte(rng.bytes(1 << 16)) > 7.99


def test_chi_square_by_hand():
    stat, p = chi_square_uniformity(bytes(range(256)) * 2)
    assert stat == 0.0 and p == pytest.approx(1.0)
    stat, p = chi_square_uniformity(bytes(512))  # all zeros: expected 2 per bin
    assert stat == pytest.approx((512 - 2) ** 2 / 2 + 255 * 2)
    assert p < 1e-12


def test_adjacent_correlation_by_hand():
    ramp = np.tile(np.arange(32, dtype=np.uint8), (8, 1))
    r = adjacent_correlation(ramp)
    assert r["horizontal"] == pytest.approx(1.0)
    assert r["vertical"] == pytest.approx(1.0)  # identical rows
    assert all(np.isnan(v) for v in adjacent_correlation(np.full((8, 8), 7, np.uint8)).values())
    checker = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    r = adjacent_correlation(checker)
    assert r["horizontal"] == pytest.approx(-1.0) and r["vertical"] == pytest.approx(-1.0)
    assert r["diagonal"] == pytest.approx(1.0)
    noise = np.random.default_rng(2).integers(0, 256, (256, 256), dtype=np.uint8)
    assert all(abs(v) < 0.02 for v in adjacent_correlation(noise).values())


def test_constant_guess_psnr():
    img = np.array([[0, 255]], np.uint8)  # mean 127.5, MSE 127.5**2
    assert constant_guess_psnr(img) == pytest.approx(20 * np.log10(255 / 127.5))


def test_aes_gcm_ciphertext_passes_npcr_and_uaci_for_a_one_pixel_change():
    """Fixed nonces make this deterministic (random ones would fail alpha = 5% of the time)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    x = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    x2 = x.copy()
    x2[100, 100] += 1
    aes = AESGCM(bytes(range(32)))
    c1 = np.frombuffer(aes.encrypt(b"\x01" * 12, x.tobytes(), None)[:-16], np.uint8)
    c2 = np.frombuffer(aes.encrypt(b"\x02" * 12, x2.tobytes(), None)[:-16], np.uint8)
    assert npcr_pct(c1, c2) >= NPCR_CRITICAL_256_ALPHA05_PCT
    lo, hi = UACI_CRITICAL_256_ALPHA05_PCT
    assert lo <= uaci_pct(c1, c2) <= hi
    # Under ONE nonce (never done by the runtime) AES-GCM is a stream cipher: one byte changes.
    c3 = np.frombuffer(aes.encrypt(b"\x01" * 12, x2.tobytes(), None)[:-16], np.uint8)
    assert npcr_pct(c1, c3) == pytest.approx(100 / x.size)


def test_end_to_end_through_the_cli(tmp_path):
    """2 small images, trials=3, pairs=(1,10), a 5-step cipher: every output and its key facts
    (~10 s on one busy core: not marked slow)."""
    torch = pytest.importorskip("torch", reason="the CNN cipher needs torch: pip install 'medsec-edge[train]'")
    import typer
    from typer.testing import CliRunner

    from medsec_edge.evaluation.commands import register
    from medsec_edge.train.cnn_cipher import CipherConfig, CipherTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = CipherConfig(steps=5, batch=2, crop=48, width=4, depth=2, tile=16, pool_size=8, threads=1)
        CipherTrainer(cfg, tmp_path / "cipher").run(progress=False)
        images = tmp_path / "images"
        images.mkdir()
        yy, xx = np.mgrid[0:72, 0:80]
        np.save(images / "a.npy", (2000 + 1500 * np.sin(xx / 7) * np.cos(yy / 11)).astype(np.uint16))
        np.save(images / "b.npy", (np.hypot(yy - 30, xx - 40) * 20).astype(np.uint16))
        app = typer.Typer()
        register(app)
        out = tmp_path / "out"
        result = CliRunner().invoke(app, [
            "eval", "crypto", "--images", str(images), "--cipher", str(tmp_path / "cipher" / "cipher.pt"),
            "--out", str(out), "--trials", "3", "--pairs", "1,10", "--surrogate-steps", "5", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "AES-256-GCM" in result.output
    report = json.loads((out / "crypto_eval.json").read_text())
    assert (out / "crypto_eval.md").read_text().count("\n| ") >= 10
    assert (out / "crypto_eval.png").stat().st_size > 10_000
    s = report["summary"]
    assert report["meta"]["n_images"] == 2 and len(report["one_pixel_trials"]) == 3
    assert s["cnn_cipher"]["same_image_twice_npcr_pct"] == 0.0  # deterministic
    assert s["aes_gcm_display8"]["same_image_twice_npcr_pct"] > 99.0  # fresh nonces
    assert s["cnn_cipher"]["tamper_refused"] == {"yes": 0, "of": 2}
    assert s["aes_gcm_display8"]["tamper_refused"] == {"yes": 2, "of": 2}
    assert s["aes_gcm_native"]["tamper_refused"] == {"yes": 2, "of": 2}
    assert s["aes_gcm_native"]["right_key_bit_exact"] == {"yes": 2, "of": 2}
    assert s["aes_gcm_display8"]["wrong_key_refused"] == {"yes": 2, "of": 2}
    assert s["cnn_cipher"]["one_pixel_npcr_pct"] < 5.0  # no diffusion
    assert set(s["cnn_cipher"]["plaintext_attack_psnr_db"]) == {"1", "10"}
