"""The CNN cipher research transform: shapes, determinism per key, training moves, resume is exact."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install 'medsec-edge[train]'")

from medsec_edge.train.cnn_cipher import (  # noqa: E402
    KEY_BITS,
    CipherConfig,
    CipherTrainer,
    CnnCipher,
    cipher_objective,
    decrypt_u8,
    encrypt_u8,
    key_bits_from_bytes,
    load_cipher,
    random_key_bits,
    surrogate_decode_u8,
    tile_pattern,
    train_surrogate,
)

SMALL = dict(steps=6, batch=2, crop=48, width=4, depth=2, tile=16, checkpoint_every=100, pool_size=8, threads=1)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CnnCipher(width=4, depth=2, tile=16).eval()


def _image(seed: int, h: int = 40, w: int = 52) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    return np.clip(128 + 80 * np.sin(xx / 6.0) * np.cos(yy / 9.0) + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)


def test_shapes_and_ranges(model):
    x = torch.rand(3, 1, 37, 50)
    keys = torch.randint(0, 2, (3, KEY_BITS)).float()
    with torch.no_grad():
        c = model.encrypt(x, keys)
        x_hat = model.decrypt(c, keys)
    assert c.shape == x.shape and x_hat.shape == x.shape
    assert float(c.min()) >= 0 and float(c.max()) < 1
    assert float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1
    img = _image(0)
    key = random_key_bits(np.random.default_rng(1))
    cipher = encrypt_u8(model, img, key)
    assert cipher.shape == img.shape and cipher.dtype == np.uint8
    assert decrypt_u8(model, cipher, key).shape == img.shape


def test_the_untrained_transform_already_inverts_through_8_bits(model):
    """The identity path of encoder and decoder: a decode far better than the wrong key's."""
    img = _image(2)
    key = random_key_bits(np.random.default_rng(3))
    dec = decrypt_u8(model, encrypt_u8(model, img, key), key).astype(float)
    wrong = decrypt_u8(model, encrypt_u8(model, img, key), random_key_bits(np.random.default_rng(4))).astype(float)
    assert np.abs(dec - img).mean() < 6
    assert np.abs(wrong - img).mean() > 40


def test_deterministic_per_key_and_key_dependent(model):
    img = _image(5)
    key = random_key_bits(np.random.default_rng(6))
    a = encrypt_u8(model, img, key)
    assert np.array_equal(a, encrypt_u8(model, img, key))  # same key, same image: same cipher
    # Batched or alone, the same (the key projection is exact; convolutions may round differently
    # per batch size, which can move a value across an 8-bit bin edge, hence not array_equal).
    both = encrypt_u8(model, np.stack([img, _image(7)]), np.stack([key, key]))
    assert np.mean(both[0] == a) > 0.999
    flipped = key.copy()
    flipped[17] ^= 1
    b = encrypt_u8(model, img, flipped)
    assert np.mean(a != b) > 0.95  # one key bit moves every mask value


def test_key_bytes_and_pattern_tiling():
    bits = key_bits_from_bytes(bytes([0x80] + [0] * 31))
    assert bits.shape == (KEY_BITS,) and bits[0] == 1 and bits.sum() == 1
    with pytest.raises(ValueError):
        key_bits_from_bytes(b"short")
    pattern = torch.arange(16.0).view(1, 1, 4, 4)
    tiled = tile_pattern(pattern, 6, 9, oy=1, ox=2)
    assert tiled.shape == (1, 1, 6, 9)
    assert float(tiled[0, 0, 0, 0]) == float(pattern[0, 0, 1, 2])
    assert float(tiled[0, 0, 4, 5]) == float(pattern[0, 0, (4 + 1) % 4, (5 + 2) % 4])


def test_five_steps_decrease_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = CipherConfig(**SMALL)
    net = CnnCipher(width=cfg.width, depth=cfg.depth, tile=cfg.tile)
    x = torch.from_numpy(np.stack([_image(i, 32, 32) for i in range(2)])[:, None] / 255.0).float()
    keys = torch.randint(0, 2, (2, KEY_BITS)).float()
    wrong = torch.randint(0, 2, (2, KEY_BITS)).float()
    noise = torch.rand_like(x) - 0.5
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(6):
        loss, _ = cipher_objective(net, x, keys, wrong, noise, cfg, multiplier=1.0)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_resume_continues_exactly_and_writes_a_loadable_cipher(tmp_path):
    straight = CipherTrainer(CipherConfig(**SMALL), tmp_path / "a")
    straight.run(progress=False)
    first = CipherTrainer(CipherConfig(**SMALL), tmp_path / "b")
    first.run(progress=False, until=3)
    assert first.step == 3
    resumed = CipherTrainer(CipherConfig(**SMALL), tmp_path / "b")
    resumed.run(progress=False)
    assert resumed.step == 6
    for (name, p1), (_, p2) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(p1, p2), name
    assert straight.log_multiplier == resumed.log_multiplier
    loaded = load_cipher(tmp_path / "a" / "cipher.pt")  # weights_only=True
    img, key = _image(8), random_key_bits(np.random.default_rng(9))
    assert np.array_equal(encrypt_u8(loaded, img, key), encrypt_u8(straight.model.eval(), img, key))
    assert (tmp_path / "a" / "cipher.pt").stat().st_size < 200_000  # small: the projections are regenerated


def test_surrogate_trains_and_decodes_with_the_cipher_shape(model):
    key = random_key_bits(np.random.default_rng(10))
    plain = np.stack([_image(i, 32, 32) for i in range(3)])
    cipher = encrypt_u8(model, plain, key)
    surrogate = train_surrogate(plain, cipher, tile=16, steps=3, batch=2, crop=16)
    guess = surrogate_decode_u8(surrogate, encrypt_u8(model, _image(11), key))
    assert guess.shape == _image(11).shape and guess.dtype == np.uint8
