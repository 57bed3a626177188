"""The seed's "CNN encryption", rebuilt so it can be measured: a key-conditioned encoder-decoder.

RESEARCH TRANSFORM, NOT ENCRYPTION. No medsec-edge command applies it to real data; the product
encrypts with AES-256-GCM (``runtime/crypto/encryption.py``). This module exists so that
``medsec-edge eval crypto`` can measure the seed's claim ("a CNN encoder-decoder encrypts images,
PSNR 30.2 dB after decryption, better than AES") beside AES-GCM on held-out images.

Layer: train (torch). Trained on the synthetic phantoms and pydicom's own small files of
:mod:`.data` (``ImagePool``); pydicom-data images are held out for the evaluation.

The transform, for a display image x in 0..1 and a 256-bit key k:

- **Key expansion** (``KeyExpansion``, fixed and public, not trained): two fixed integer matrices
  drawn from ``PROJECTION_SEED`` map the key bits to phases ``(bits @ M mod 2**24) / 2**24``,
  computed exactly (float64 sums of integers below 2**53, so no summation order changes a value).
  They give FiLM scales and biases for every conv layer of both networks (``sin`` of a phase) and
  three key patterns of ``tile x tile`` pixels, repeated over the image from its top-left corner.
  Flipping one key bit moves every phase by an independent uniform amount.
- **Encoder** E(x, k): a FiLM-conditioned CNN that sees x and two key patterns gives
  ``y = m + (1 - 2m) sigmoid(4 (x - 0.5) + s(k) + net(x, k))`` (``m`` = 0.01; ``s(k)`` a learned
  1x1 mix of the two key patterns, shared with the decoder), then a **keyed modular mask**:
  ``c = frac(y + P0(k))``. ``c`` is the cipher image, 0..1 (stored as 8 bits: ``floor(256 c)``).
- **Decoder** D(c, k): ``u = frac(c - P0(k))`` (= y up to the 8-bit rounding), an inverse
  sigmoid minus ``s(k)`` gives a first estimate of x, and a second FiLM-conditioned CNN corrects it.

The mask is a deliberate gift to the CNN cipher: with a uniform keyed pattern the cipher image has
a flat histogram within a tile and no adjacent-pixel correlation by construction, so the
statistics a learned cipher is usually judged on come out nearly ideal, and what the evaluation
finds wrong (the same image always gives the same cipher image, a one-pixel change stays local,
nothing detects tampering, a few plaintext/cipher pairs teach an attacker to decode) is the
structure of any deterministic feed-forward transform, not a weak design. (One weakness is the
pattern's: a finite key expansion repeats, so where the image is flat the same tile of cipher
values recurs and the chi-square test over a whole large image notices.) The training objective:
reconstruction (MSE + SSIM) held at a target PSNR/SSIM by an adaptive multiplier, noise-likeness
of ``y`` (so the networks themselves scramble, not only the mask) and of ``c`` (uniform
histogram, zero adjacent correlation), and a wrong-key decode kept far from x.

``python -m medsec_edge.train.cnn_cipher --out runs/cipher --steps N`` trains (seeded,
checkpointed, resumable, progress bar) and writes ``cipher.pt``: the weights and the
configuration only (``torch.load(weights_only=True)``), what ``load_cipher`` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medsec_edge.train.data import ImagePool, phantom
from medsec_edge.train.seeding import seed_everything

log = logging.getLogger(__name__)

KIND = "medsec-edge research transform: CNN cipher (not encryption; never applied to real data)"
FORMAT_VERSION = 1
KEY_BITS = 256
PROJECTION_SEED = 0x5EEDC1F3  # public: part of the algorithm (Kerckhoffs), not of the key
_PHASE_MOD = 1 << 24
MARGIN = 0.01  # y stays inside (m, 1 - m): the 8-bit rounding of c never wraps it around
SLOPE = 4.0  # the encoder's identity path: sigmoid(SLOPE (x - 0.5))
CIPHER_LEVELS = 256
N_PATTERNS = 3  # P0: the modular mask; P1, P2: inputs of both networks (as cos, sin)
CIPHER_FILE = "cipher.pt"
CHECKPOINT_FILE = "checkpoint.pt"


# --- the transform ------------------------------------------------------------------------------


class KeyExpansion(nn.Module):
    """256 key bits -> FiLM phases and ``N_PATTERNS`` tile patterns, all uniform in [0, 1)."""

    def __init__(self, n_film: int, tile: int):
        super().__init__()
        g = torch.Generator().manual_seed(PROJECTION_SEED)
        film = torch.randint(0, _PHASE_MOD, (KEY_BITS, n_film), generator=g, dtype=torch.int64)
        pattern = torch.randint(0, _PHASE_MOD, (KEY_BITS, N_PATTERNS * tile * tile), generator=g,
                                dtype=torch.int64)
        # Not saved: regenerated from the public seed, so cipher.pt stays small.
        self.register_buffer("film_proj", film.double(), persistent=False)
        self.register_buffer("pattern_proj", pattern.double(), persistent=False)
        self.tile = tile

    def _phase(self, bits: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        total = bits.double() @ proj  # integers < 256 * 2**24: exact in float64
        return (torch.remainder(total, _PHASE_MOD) / _PHASE_MOD).float()

    def forward(self, key_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_bits`` (B, 256) of 0/1 -> (FiLM values in [-1, 1] (B, n_film), patterns (B, 3, T, T))."""
        if key_bits.ndim != 2 or key_bits.shape[1] != KEY_BITS:
            raise ValueError(f"key bits must have shape (B, {KEY_BITS}), got {tuple(key_bits.shape)}")
        film = torch.sin(2 * math.pi * self._phase(key_bits, self.film_proj))
        pattern = self._phase(key_bits, self.pattern_proj).view(-1, N_PATTERNS, self.tile, self.tile)
        return film, pattern


def tile_pattern(pattern: torch.Tensor, h: int, w: int, oy: int = 0, ox: int = 0) -> torch.Tensor:
    """Repeat (B, C, T, T) over an (h, w) image whose top-left pixel is pattern pixel (oy, ox)."""
    t = pattern.shape[-1]
    oy, ox = oy % t, ox % t
    reps_y, reps_x = (h + oy + t - 1) // t, (w + ox + t - 1) // t
    return pattern.repeat(1, 1, reps_y, reps_x)[..., oy : oy + h, ox : ox + w]


def frac(z: torch.Tensor) -> torch.Tensor:
    """z mod 1; the gradient is 1 (the wrap points have measure zero)."""
    return z - torch.floor(z).detach()


class FilmNet(nn.Module):
    """3x3 convs, each followed by a key-dependent FiLM (scale 1 +- 0.5, bias +- 0.5) and a leaky ReLU."""

    def __init__(self, c_in: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.convs = nn.ModuleList(nn.Conv2d(c_in if i == 0 else width, width, 3, padding=1) for i in range(depth))
        self.head = nn.Conv2d(width, 1, 3, padding=1)
        with torch.no_grad():  # start close to the identity path around it
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()

    @property
    def n_film(self) -> int:
        return 2 * self.width * len(self.convs)

    def forward(self, z: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        w = self.width
        for i, conv in enumerate(self.convs):
            scale = 1 + 0.5 * film[:, 2 * i * w : (2 * i + 1) * w, None, None]
            bias = 0.5 * film[:, (2 * i + 1) * w : (2 * i + 2) * w, None, None]
            z = F.leaky_relu(conv(z) * scale + bias, 0.1)
        return self.head(z)


def _pattern_inputs(patterns: torch.Tensor) -> torch.Tensor:
    angle = 2 * math.pi * patterns[:, 1:]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


class CnnCipher(nn.Module):
    """E(x, k) -> c and D(c, k) -> x_hat on (B, 1, H, W) images in 0..1 (see the module docstring)."""

    def __init__(self, width: int = 16, depth: int = 4, tile: int = 64):
        super().__init__()
        self.config = {"width": width, "depth": depth, "tile": tile}
        c_in = 1 + 2 * (N_PATTERNS - 1)
        self.encoder_net = FilmNet(c_in, width, depth)
        self.decoder_net = FilmNet(c_in, width, depth)
        # A learned key-pattern term in the sigmoid's input, shared by both sides: the decoder
        # takes off exactly what the encoder put on, so its amplitude trades scrambling (noise-like
        # y) against the 8-bit rounding of c, which a saturated sigmoid amplifies.
        self.key_mix = nn.Conv2d(c_in - 1, 1, 1, bias=False)
        with torch.no_grad():
            self.key_mix.weight.fill_(0.1)
        self.keys = KeyExpansion(self.encoder_net.n_film + self.decoder_net.n_film, tile)

    def _expand(self, key_bits: torch.Tensor, h: int, w: int, batch: int):
        film, patterns = self.keys(key_bits.to(self.film_device()))
        if film.shape[0] == 1 and batch > 1:
            film, patterns = film.expand(batch, -1), patterns.expand(batch, -1, -1, -1)
        n_e = self.encoder_net.n_film
        return film[:, :n_e], film[:, n_e:], tile_pattern(patterns, h, w)

    def film_device(self) -> torch.device:
        return self.keys.film_proj.device

    def encrypt(self, x: torch.Tensor, key_bits: torch.Tensor, *, return_inner: bool = False):
        """Cipher image c in [0, 1) (continuous; ``quantize`` stores it as 8 bits)."""
        b, _, h, w = x.shape
        film_e, _, pat = self._expand(key_bits, h, w, b)
        pin = _pattern_inputs(pat)
        net_in = torch.cat([2 * x - 1, pin], dim=1)
        logits = SLOPE * (x - 0.5) + self.key_mix(pin) + self.encoder_net(net_in, film_e)
        y = MARGIN + (1 - 2 * MARGIN) * torch.sigmoid(logits)
        c = frac(y + pat[:, :1])
        return (c, y) if return_inner else c

    def decrypt(self, c: torch.Tensor, key_bits: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """x_hat from cipher image ``c`` (in [0, 1)); ``clamp=False`` keeps gradients outside 0..1."""
        b, _, h, w = c.shape
        _, film_d, pat = self._expand(key_bits, h, w, b)
        u = frac(c - pat[:, :1])
        v = ((u - MARGIN) / (1 - 2 * MARGIN)).clamp(1e-4, 1 - 1e-4)
        pin = _pattern_inputs(pat)
        first = (torch.log(v) - torch.log1p(-v) - self.key_mix(pin)) / SLOPE + 0.5
        net_in = torch.cat([2 * first.clamp(-0.25, 1.25) - 1, pin], dim=1)
        x_hat = first + self.decoder_net(net_in, film_d)
        return x_hat.clamp(0, 1) if clamp else x_hat


def quantize(c: torch.Tensor) -> torch.Tensor:
    """Cipher values [0, 1) -> 8-bit levels (uint8): ``floor(256 c)``."""
    return torch.clamp(torch.floor(c * CIPHER_LEVELS), 0, CIPHER_LEVELS - 1).to(torch.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    """8-bit levels -> the centre of their cipher-value bin."""
    return (q.float() + 0.5) / CIPHER_LEVELS


# --- numpy-facing helpers (the evaluation's interface) ------------------------------------------


def key_bits_from_bytes(key: bytes) -> np.ndarray:
    """32 key bytes -> 256 bits (uint8 0/1), most significant bit first."""
    if len(key) != KEY_BITS // 8:
        raise ValueError(f"a CNN cipher key is {KEY_BITS // 8} bytes, got {len(key)}")
    return np.unpackbits(np.frombuffer(key, np.uint8))


def random_key_bits(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2, KEY_BITS).astype(np.uint8)


def _key_tensor(key_bits: np.ndarray) -> torch.Tensor:
    bits = torch.from_numpy(np.asarray(key_bits, np.uint8).reshape(-1, KEY_BITS).astype(np.float32))
    return bits


def _batch(image: np.ndarray) -> torch.Tensor:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected (H, W) or (N, H, W), got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))[:, None]


@torch.no_grad()
def encrypt_u8(model: CnnCipher, display_u8: np.ndarray, key_bits: np.ndarray) -> np.ndarray:
    """8-bit display image(s) (H, W) or (N, H, W) -> 8-bit cipher image(s) of the same shape."""
    x = _batch(display_u8).float() / 255.0
    q = quantize(model.encrypt(x, _key_tensor(key_bits)))
    return q[:, 0].numpy().reshape(np.shape(display_u8))


@torch.no_grad()
def decrypt_u8(model: CnnCipher, cipher_u8: np.ndarray, key_bits: np.ndarray) -> np.ndarray:
    """8-bit cipher image(s) -> decoded 8-bit display image(s) (rounded, as they would be shown)."""
    c = dequantize(_batch(cipher_u8))
    x_hat = model.decrypt(c, _key_tensor(key_bits))
    out = torch.round(x_hat * 255).to(torch.uint8)
    return out[:, 0].numpy().reshape(np.shape(cipher_u8))


def save_cipher(model: CnnCipher, path: Path, **info) -> Path:
    """Write the weights + configuration (a plain state dict, loadable with weights_only=True)."""
    state = {"kind": KIND, "version": FORMAT_VERSION, "config": dict(model.config),
             "state_dict": model.state_dict(), **info}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_cipher(path: Path) -> CnnCipher:
    """The trained research transform from ``cipher.pt`` (or a training ``checkpoint.pt``), eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / CIPHER_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in state:  # a training checkpoint
        if "net" not in state:
            raise ValueError(f"{path.name} is neither a cipher.pt nor a CNN cipher training checkpoint")
        cfg = state["config"]
        model = CnnCipher(width=cfg["width"], depth=cfg["depth"], tile=cfg["tile"])
        model.load_state_dict(state["net"])
    else:
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path.name}: CNN cipher format {state.get('version')}, expected {FORMAT_VERSION}")
        model = CnnCipher(**state["config"])
        model.load_state_dict(state["state_dict"])
    return model.eval()


# --- the known-plaintext attacker -------------------------------------------------------------


class SurrogateDecoder(nn.Module):
    """A known-plaintext attacker's decoder: cipher image in, plaintext estimate out, same shape.

    Kerckhoffs's principle: the attacker knows the construction (cipher values live on a circle,
    the key enters through patterns that repeat every ``tile`` pixels from the top-left corner)
    but neither the key nor the trained weights. So the surrogate has, instead of the key's
    patterns, its own learned ``tile``-periodic parameters: complex patterns that multiply
    ``exp(2 pi i c)`` (one of them can learn the mask, turning the cipher value back into y) and
    plain channels (which can learn additive key terms), followed by a small CNN. It is trained
    only on (plaintext, cipher image) pairs of one key.
    """

    def __init__(self, tile: int, width: int = 16, depth: int = 4, n_phase: int = 2, n_embed: int = 4):
        super().__init__()
        self.tile = tile
        self.phase = nn.Parameter(torch.randn(2, n_phase, tile, tile) * 0.5)  # real, imaginary parts
        self.embed = nn.Parameter(torch.zeros(1, n_embed, tile, tile))
        c_in = 2 + 3 * n_phase + n_embed
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(c_in if i == 0 else width, width, 3, padding=1), nn.LeakyReLU(0.1)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, c: torch.Tensor, oy: int = 0, ox: int = 0) -> torch.Tensor:
        b, _, h, w = c.shape
        a = tile_pattern(self.phase[0][None], h, w, oy, ox)
        s = tile_pattern(self.phase[1][None], h, w, oy, ox)
        cc, ss = torch.cos(2 * math.pi * c), torch.sin(2 * math.pi * c)
        re, im = cc * a + ss * s, ss * a - cc * s
        angle = torch.atan2(im, re + 1e-9) / math.pi
        emb = tile_pattern(self.embed, h, w, oy, ox).expand(b, -1, -1, -1)
        return torch.sigmoid(self.net(torch.cat([cc, ss, re, im, angle, emb], dim=1)))


def train_surrogate(plain_u8: np.ndarray, cipher_u8: np.ndarray, *, tile: int, steps: int = 500,
                    batch: int = 8, crop: int = 64, seed: int = 0, lr: float = 3e-3) -> SurrogateDecoder:
    """Fit a ``SurrogateDecoder`` to (N, H, W) plaintext/cipher pairs (8-bit) by MSE on random crops.

    Each step takes ``batch`` crops at one random position (so the periodic parameters line up
    with the cipher's tile) from images drawn with replacement: one pair is enough to run.
    """
    plain = torch.from_numpy(np.asarray(plain_u8, np.float32) / 255.0)[:, None]
    cipher = dequantize(torch.from_numpy(np.asarray(cipher_u8)))[:, None]
    n, _, h, w = plain.shape
    crop = min(crop, h, w)
    gen = np.random.default_rng([seed, 0x5A77])
    torch.manual_seed(int(gen.integers(2**31)))
    model = SurrogateDecoder(tile)
    opt = torch.optim.Adam([{"params": model.net.parameters(), "lr": lr},
                            {"params": [model.phase, model.embed], "lr": lr * 10}])
    for step in range(steps):
        if step == int(steps * 0.75):
            for g in opt.param_groups:
                g["lr"] *= 0.3
        y0, x0 = int(gen.integers(0, h - crop + 1)), int(gen.integers(0, w - crop + 1))
        idx = torch.from_numpy(gen.integers(0, n, batch))
        target = plain[idx, :, y0 : y0 + crop, x0 : x0 + crop]
        pred = model(cipher[idx, :, y0 : y0 + crop, x0 : x0 + crop], y0, x0)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)):
            opt.step()
    return model.eval()


@torch.no_grad()
def surrogate_decode_u8(model: SurrogateDecoder, cipher_u8: np.ndarray) -> np.ndarray:
    """The attacker's 8-bit estimate of the plaintext of one (H, W) cipher image."""
    c = dequantize(torch.from_numpy(np.asarray(cipher_u8)))[None, None]
    return torch.round(model(c) * 255).to(torch.uint8)[0, 0].numpy()


# --- losses ---------------------------------------------------------------------------------------


def adjacent_correlation_sq(t: torch.Tensor) -> torch.Tensor:
    """Mean squared Pearson correlation of horizontally, vertically and diagonally adjacent pixels
    (per image, then averaged): 0 for noise, ~1 for natural images."""
    pairs = ((t[..., :, :-1], t[..., :, 1:]), (t[..., :-1, :], t[..., 1:, :]), (t[..., :-1, :-1], t[..., 1:, 1:]))
    out = []
    for a, b in pairs:
        a = a - a.mean(dim=(1, 2, 3), keepdim=True)
        b = b - b.mean(dim=(1, 2, 3), keepdim=True)
        r = (a * b).mean(dim=(1, 2, 3)) / torch.sqrt((a * a).mean(dim=(1, 2, 3)) * (b * b).mean(dim=(1, 2, 3)) + 1e-8)
        out.append(r * r)
    return torch.stack(out).mean()


def uniformity_loss(t: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Squared 1-D Wasserstein-2 distance of each image's values to U(lo, hi), in units of that
    uniform's variance (0: a flat histogram; 1: a constant image at the middle)."""
    flat = t.flatten(1)
    n = flat.shape[1]
    sorted_vals, _ = torch.sort(flat, dim=1)
    quantiles = lo + (hi - lo) * (torch.arange(n, dtype=t.dtype) + 0.5) / n
    return ((sorted_vals - quantiles) ** 2).mean() / ((hi - lo) ** 2 / 12)


def ssim_box(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM on 0..1 images with a 7x7 box window (a cheap training stand-in for the
    Gaussian-window SSIM the evaluation reports)."""
    c1, c2 = 0.01**2, 0.03**2
    mx, my = F.avg_pool2d(x, 7, 1), F.avg_pool2d(y, 7, 1)
    vx = F.avg_pool2d(x * x, 7, 1) - mx**2
    vy = F.avg_pool2d(y * y, 7, 1) - my**2
    cxy = F.avg_pool2d(x * y, 7, 1) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


# --- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CipherConfig:
    steps: int = 2500
    batch: int = 8
    crop: int = 96  # training crops 64-128 px: drawn from (crop - 32, crop, crop + 32)
    width: int = 16
    depth: int = 4
    tile: int = 64
    lr: float = 2e-3
    seed: int = 2718
    target_psnr_db: float = 37.0  # held on training batches; the claim is >= 30 dB held-out
    target_ssim: float = 0.98
    ssim_weight: float = 4.0
    scramble_weight: float = 1.0  # noise-likeness of y (the CNN's own output, before the mask):
    scramble_uniform_weight: float = 0.1  # adjacent correlation + this x histogram flatness
    cipher_stat_weight: float = 0.1  # noise-likeness of c (mostly given by the mask)
    wrong_key_weight: float = 0.2
    wrong_key_min_mse: float = 0.05  # a wrong-key decode should be at most ~13 dB from x
    multiplier_rate: float = 0.02
    checkpoint_every: int = 250
    pool_size: int = 600
    threads: int = 2


def validation_images(seed: int, n: int = 8, size: int = 128) -> np.ndarray:
    """Fixed synthetic phantoms (8-bit) no training batch draws: the training run's own check."""
    rng = np.random.default_rng([seed, 0x7A11])
    return np.stack([np.rint(phantom(rng, size) * 255).astype(np.uint8) for _ in range(n)])


def cipher_objective(model: CnnCipher, x: torch.Tensor, keys: torch.Tensor, wrong: torch.Tensor,
                     noise: torch.Tensor, cfg: CipherConfig, multiplier: float) -> tuple[torch.Tensor, dict]:
    """The training loss for images ``x``, their keys, other (wrong) keys and the 8-bit rounding
    ``noise`` (uniform in -0.5..0.5 levels); returns (loss, its parts per image or as scalars)."""
    c, y = model.encrypt(x, keys, return_inner=True)
    # The 8-bit storage of c, as additive uniform noise of one level (kept differentiable).
    c_stored = frac(c + noise / CIPHER_LEVELS)
    x_hat = model.decrypt(c_stored, keys, clamp=False)
    mse = (x_hat - x).pow(2).mean(dim=(1, 2, 3))
    ssim = ssim_box(x, x_hat.clamp(0, 1))
    mse_target = 10 ** (-cfg.target_psnr_db / 10)
    rec = (mse / mse_target).mean() + cfg.ssim_weight * (1 - ssim).mean()
    y_corr = adjacent_correlation_sq(y)
    scramble = y_corr + cfg.scramble_uniform_weight * uniformity_loss(y, MARGIN, 1 - MARGIN)
    cipher_stats = adjacent_correlation_sq(c) + uniformity_loss(c)
    x_wrong = model.decrypt(c_stored, wrong, clamp=False)
    wrong_mse = (x_wrong.clamp(0, 1) - x).pow(2).mean(dim=(1, 2, 3))
    wrong_term = F.relu(cfg.wrong_key_min_mse - wrong_mse).mean() / cfg.wrong_key_min_mse
    loss = (multiplier * rec + cfg.scramble_weight * scramble + cfg.cipher_stat_weight * cipher_stats
            + cfg.wrong_key_weight * wrong_term)
    return loss, {"mse": mse, "ssim": ssim, "y_corr": y_corr, "scramble": scramble,
                  "cipher_stats": cipher_stats, "wrong_mse": wrong_mse}


class CipherTrainer:
    def __init__(self, config: CipherConfig, out_dir: Path, command: str = ""):
        self.cfg = config
        self.command = command
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.model = CnnCipher(width=config.width, depth=config.depth, tile=config.tile)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step = 0
        self.log_multiplier = 0.0
        self.history: list[dict] = []
        self.rng = np.random.default_rng(config.seed)
        self.pool = ImagePool(seed=config.seed, n_synthetic=config.pool_size)
        self._val = validation_images(config.seed)
        self._val_keys = np.stack([random_key_bits(np.random.default_rng([config.seed, 0x7A12, i]))
                                   for i in range(len(self._val))])

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    def save(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise RuntimeError(f"non-finite weights at step {self.step}: not overwriting the checkpoint")
        state = {
            "config": asdict(self.cfg), "command": self.command, "step": self.step,
            "net": self.model.state_dict(), "opt": self.opt.state_dict(), "history": self.history,
            "log_multiplier": self.log_multiplier, "rng": self.rng.bit_generator.state,
            "pool_rng": self.pool.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)
        save_cipher(self.model, self.out / CIPHER_FILE, step=self.step, command=self.command,
                    validation=self.validate())

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.model.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.history = state["history"]
        self.log_multiplier = state["log_multiplier"]
        self.rng.bit_generator.state = state["rng"]
        self.pool.rng.bit_generator.state = state["pool_rng"]
        torch.set_rng_state(state["torch_rng"])
        return True

    # -- one step ----------------------------------------------------------------------------
    def set_lr(self) -> None:
        progress = self.step / self.cfg.steps
        lr = self.cfg.lr * (0.1 if progress > 0.85 else 0.3 if progress > 0.65 else 1.0)
        for g in self.opt.param_groups:
            g["lr"] = lr

    def train_step(self) -> dict:
        cfg = self.cfg
        crop = int(self.rng.choice([max(32, cfg.crop - 32), cfg.crop, cfg.crop + 32]))
        batch = max(1, round(cfg.batch * (cfg.crop / crop) ** 2))  # about the same pixels per step
        # The evaluation encrypts 8-bit display images: train on those values.
        x = torch.from_numpy(np.rint(self.pool.batch(batch, crop) * 255) / 255).float()
        keys = torch.from_numpy(self.rng.integers(0, 2, (batch, KEY_BITS)).astype(np.float32))
        wrong = torch.from_numpy(self.rng.integers(0, 2, (batch, KEY_BITS)).astype(np.float32))
        noise = torch.rand_like(x) - 0.5
        loss, parts = cipher_objective(self.model, x, keys, wrong, noise, cfg, math.exp(self.log_multiplier))
        mse, ssim, y_corr, scramble, cipher_stats, wrong_mse = (parts[k] for k in (
            "mse", "ssim", "y_corr", "scramble", "cipher_stats", "wrong_mse"))
        multiplier = math.exp(self.log_multiplier)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
        if not skipped:  # one non-finite step would turn every weight into NaN
            self.opt.step()
        with torch.no_grad():
            psnr = float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())
            ssim_mean = float(ssim.mean())
            # Dual ascent on the reconstruction constraint: raise its weight while the batch is
            # below the targets, lower it (more scrambling) while above.
            deficit = max(cfg.target_psnr_db - psnr, (cfg.target_ssim - ssim_mean) * 100)
            self.log_multiplier = float(np.clip(self.log_multiplier + cfg.multiplier_rate * np.clip(deficit, -1, 1),
                                                math.log(0.01), math.log(1e4)))
            wrong_psnr = float((10 * torch.log10(1 / wrong_mse.clamp_min(1e-12))).mean())
        return {"loss": loss.item(), "psnr": psnr, "ssim": ssim_mean, "scramble": scramble.item(), "y_corr": y_corr.item(),
                "cipher_stats": cipher_stats.item(), "wrong_psnr": wrong_psnr, "multiplier": multiplier,
                "skipped": float(skipped)}

    @torch.no_grad()
    def validate(self) -> dict:
        """Right-key PSNR/SSIM (the evaluation's definitions) of fixed phantoms through 8-bit storage."""
        from medsec_edge.evaluation.measures import psnr_window, ssim_window

        self.model.eval()
        psnrs, ssims = [], []
        for img, key in zip(self._val, self._val_keys):
            dec = decrypt_u8(self.model, encrypt_u8(self.model, img, key), key)
            psnrs.append(psnr_window(img.astype(np.float64), dec.astype(np.float64)))
            ssims.append(ssim_window(img.astype(np.float64), dec.astype(np.float64)))
        self.model.train()
        return {"psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "images": len(psnrs)}

    def run(self, progress: bool = True, until: int | None = None) -> None:
        """Train to ``cfg.steps`` (or stop at step ``until``, as an interruption would)."""
        from tqdm import tqdm

        if self.resume():
            log.info("resumed at step %d", self.step)
        self.model.train()
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress, mininterval=5)
        recent: list[dict] = []
        started = time.time()
        last = self.cfg.steps if until is None else min(until, self.cfg.steps)
        while self.step < last:
            self.set_lr()
            recent.append(self.train_step())
            self.step += 1
            if self.step % 50 == 0 or self.step == last:
                summary = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
                summary.update(step=self.step, elapsed_s=time.time() - started)
                self.history.append(summary)
                bar.set_postfix(psnr=f"{summary['psnr']:.1f}", ssim=f"{summary['ssim']:.3f}",
                                scr=f"{summary['scramble']:.3f}", wrong=f"{summary['wrong_psnr']:.1f}")
                recent = []
            if self.step % 200 == 0:
                self.pool.refresh(0.05)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == last:
                self.save()
                (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
            bar.update(1)
        bar.close()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m medsec_edge.train.cnn_cipher",
                                     description="Train the CNN cipher research transform (not encryption).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--until", type=int, default=None, help="stop at this step (the schedule still spans --steps)")
    for f in fields(CipherConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = CipherConfig(**{f.name: getattr(args, f.name) for f in fields(CipherConfig)})
    command = shlex.join(["python", "-m", "medsec_edge.train.cnn_cipher", *argv])
    trainer = CipherTrainer(config, args.out, command=command)
    trainer.run(until=args.until)
    if trainer.step == config.steps:
        log.info("validation (synthetic, 8-bit storage): %s", trainer.validate())


if __name__ == "__main__":
    main()
