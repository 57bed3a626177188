"""Training the learned content fingerprint (issue 9): metric learning on real display crops.

Layer: train. Recipe: ``medsec-edge train fingerprint --out runs/fingerprint`` (or
``python -m medsec_edge.train --recipe fingerprint --out DIR``); seeded, checkpointed, resumable;
the exact command(s) are stored in the checkpoint.

Data (``FingerprintCache``): real frames of the TRAIN split (``train.real_data.real_frames`` through
``train.tamper_data.load_real``; pydicom-data is never read) at most 512 px a side, cut into
160 x 160 crops; for each crop, a pure function of (seed, index):

- ``orig``: the crop's display (its frame's own window);
- ``benign``: the same after one benign step of :mod:`evaluation.fingerprint_edits` on the original
  grid (JPEG q70-95 of the display, J2K 5-20:1, lossless, resize 0.5-2x and back, noise 0.2-0.8%,
  blur 0.5-1, crop put back; cells next to a crop border are not scored);
- ``edited``: a local edit, half from :func:`evaluation.manipulations.manipulate` (all eight kinds,
  random sizes) and half mean-controlled edits (:func:`evaluation.fingerprint_edits.local_edit`,
  10-56 px, 2-12% of the window), then with probability one half laundered by a benign step.
  Cell labels: positive where the edit covers the cell (``covered_cells``) and the display mean
  over the covered part changed by at least 6 levels (2.4%); negative where the cell's box grown
  by 16 px holds no edited pixel; otherwise not scored.

The cache (uint8 displays, int8 labels) is built once into the run folder and reused on resume.
Training samples batches of cached triples with a random dihedral transform and a 128 x 128
cell-aligned sub-crop.

Loss, on per-cell L2 distances between the recorded code (plus uniform noise of one quantisation
step, as the runtime rounds it to int8) and the code of the image under test: squared hinge
``relu(d - margin_neg)`` on negatives, plus a linear hinge over their top 1% (the benign tail
decides the false-alarm rate at 1e-3..1e-4), plus squared hinge ``relu(margin_pos - d)`` on
positives, plus a ranking term (softplus of the negatives' top-0.5% value + margin - d on every
positive), plus a penalty on codes leaving +-110 (int8 room). Validation (VAL split crops, fixed) reports cell AUC
and TPR at cell FPR 1e-3 (threshold from the negatives); the best checkpoint by that TPR is kept as
``best.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from medsec_edge.evaluation.fingerprint_edits import (
    EDIT_KINDS,
    benign_display,
    covered_cells,
    local_edit,
    untouched_cells,
    valid_cells,
)
from medsec_edge.evaluation.manipulations import MANIPULATIONS, manipulate
from medsec_edge.runtime.io.image import (
    DisplayWindow,
    ImageMeta,
    display_window,
    stored_range,
)
from medsec_edge.train.fingerprint_model import CELL, FingerprintNet, n_parameters
from medsec_edge.train.seeding import seed_everything

log = logging.getLogger(__name__)

TRAIN_BENIGN = ("jpeg", "jpeg", "j2k", "lossless", "resize", "resize", "noise", "noise", "blur", "crop")
LAUNDER = ("jpeg", "j2k", "resize", "noise", "blur")
POS_LEVELS = 6.0  # display levels of mean change over a cell's covered part to count as positive
IDENTITY = DisplayWindow(0.0, 255.0, 1.0, 0.0, False)


@dataclass(frozen=True)
class FingerprintConfig:
    steps: int = 16000
    batch: int = 32
    crop: int = 128
    source_crop: int = 160
    cache_size: int = 16000
    val_size: int = 800
    max_side: int = 512
    lr: float = 3e-3
    seed: int = 9091
    dims: int = 4
    width: int = 32
    margin_neg: float = 1.0
    margin_pos: float = 8.0
    tail_weight: float = 1.0
    checkpoint_every: int = 250
    val_every: int = 1000
    threads: int = 1


# --------------------------------------------------------------------------------------------
# data


def _grey(frame: np.ndarray, meta: ImageMeta) -> tuple[np.ndarray, ImageMeta]:
    if meta.is_colour:
        frame = np.rint(frame[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])).astype(np.uint8)
        meta = ImageMeta(bits_stored=8, signed=False, source_format="jpeg")
    return frame, meta


class FingerprintCache:
    """Builds (orig, benign, edited, benign_valid_cells, edit_labels) triples from real frames."""

    def __init__(self, split: str, seed: int, n: int, *, side: int = 160, max_side: int = 512):
        from medsec_edge.train.tamper_data import load_real

        self.split, self.seed, self.n, self.side = split, int(seed), int(n), int(side)
        sources, self.origin = load_real(split, max_side)
        self.sources = []
        for src in sources:
            frame, meta = _grey(src.frame, src.meta)
            if min(frame.shape[:2]) >= side:
                self.sources.append((frame, meta, src.group))
        if not self.sources:
            raise RuntimeError(f"no {split} frame of at least {side} px a side")
        by_group: dict[str, list[int]] = {}
        for i, (_, _, g) in enumerate(self.sources):
            by_group.setdefault(g, []).append(i)
        self.groups = [by_group[g] for g in sorted(by_group)]
        self._windows = {}

    def _pick(self, rng: np.random.Generator):
        members = self.groups[int(rng.integers(len(self.groups)))]
        i = members[int(rng.integers(len(members)))]
        frame, meta, _group = self.sources[i]
        if i not in self._windows:
            self._windows[i] = (display_window(meta, frame), stored_range(meta, frame.dtype),
                                float(frame.max()) - float(frame.min()))
        window, vrange, span = self._windows[i]
        h, w = frame.shape
        y, x = int(rng.integers(0, h - self.side + 1)), int(rng.integers(0, w - self.side + 1))
        crop = np.ascontiguousarray(frame[y:y + self.side, x:x + self.side])
        vr = None if math.isinf(vrange[0]) else vrange
        return crop, window, vr, span, meta

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
        rng = np.random.default_rng([self.seed, int(index)])
        for _ in range(20):
            crop, window, vr, span, _meta = self._pick(rng)
            orig = window.to_display(crop)
            if float(orig.std()) >= 2.0:  # not a flat background crop
                break
        grid = (self.side // CELL, self.side // CELL)
        step = TRAIN_BENIGN[int(rng.integers(len(TRAIN_BENIGN)))]
        benign, valid, _ = benign_display(crop, window, rng, step, value_range=vr, frame_span=span)
        bvalid = valid_cells(valid, CELL, grid, CELL // 2)
        # the edit
        kind = ""
        for _ in range(5):
            try:
                if rng.random() < 0.5:
                    kind = list(MANIPULATIONS)[int(rng.integers(len(MANIPULATIONS)))]
                    donor = None
                    if kind == "splice":
                        d_crop, d_window, _, _, _ = self._pick(rng)  # splice matches mean and std
                        donor = d_window.to_display(d_crop).astype(np.float64)
                    m = manipulate(crop, kind, rng, value_range=vr or (float(crop.min()) - 1, float(crop.max()) + 1),
                                   donor=donor)
                    edited, mask = window.to_display(m.pixels), m.mask
                else:
                    kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
                    size = int(rng.integers(10, 57))
                    delta = float(rng.uniform(0.02, 0.12)) * 255.0 * (1 if rng.random() < 0.5 else -1)
                    donor_crop, d_window, _, _, _ = self._pick(rng)
                    e = local_edit(orig, rng, size=size, delta=delta, kind=kind,
                                   donor=d_window.to_display(donor_crop))
                    edited, mask = e.display, e.mask
                    kind = f"ctl_{kind}"
                if mask.any():
                    break
            except Exception as exc:  # noqa: BLE001 - a crop without a site for this kind: draw another
                log.debug("sample %d: %s failed (%s), drawing another edit", index, kind, exc)
        else:
            edited, mask = orig.copy(), np.zeros(orig.shape, bool)
        change = edited.astype(np.float64) - orig
        pos = covered_cells(mask, CELL, grid)
        if pos.any():
            cm = (change * mask).reshape(grid[0], CELL, grid[1], CELL).sum(axis=(1, 3))
            cn = mask.reshape(grid[0], CELL, grid[1], CELL).sum(axis=(1, 3))
            pos &= np.abs(cm) >= POS_LEVELS * np.maximum(cn, 1)
        neg = untouched_cells(mask, CELL, grid, CELL)
        labels = np.full(grid, -1, np.int8)
        labels[neg] = 0
        labels[pos] = 1
        if rng.random() < 0.5:
            lstep = LAUNDER[int(rng.integers(len(LAUNDER)))]
            edited, _, _ = benign_display(edited.astype(np.float32), IDENTITY, rng, lstep, value_range=(0.0, 255.0),
                                          frame_span=span * abs(window.gain))
            kind += f"+{lstep}"
        u8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return u8(orig), u8(benign), u8(edited), bvalid, labels, kind

    def build(self, path: Path | None = None, progress_every: int = 500) -> dict[str, np.ndarray]:
        if path is not None and path.exists():
            with np.load(path) as z:
                data = {k: z[k] for k in z.files}
            if len(data["orig"]) == self.n:
                return data
        s, g = self.side, self.side // CELL
        data = {"orig": np.empty((self.n, s, s), np.uint8), "benign": np.empty((self.n, s, s), np.uint8),
                "edited": np.empty((self.n, s, s), np.uint8), "bvalid": np.empty((self.n, g, g), bool),
                "labels": np.empty((self.n, g, g), np.int8)}
        t0 = time.time()
        for i in range(self.n):
            o, b, e, v, lab, _ = self.sample(i)
            data["orig"][i], data["benign"][i], data["edited"][i], data["bvalid"][i], data["labels"][i] = o, b, e, v, lab
            if progress_every and (i + 1) % progress_every == 0:
                log.info("%s cache: %d/%d samples (%.0f s)", self.split, i + 1, self.n, time.time() - t0)
        if path is not None:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **data)
            tmp.replace(path)
        return data


# --------------------------------------------------------------------------------------------
# metrics and loss


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Rank AUC (ties half), O(n log n)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, threshold): threshold = the smallest value with at most ``fpr`` of negatives above."""
    neg = np.sort(np.asarray(neg, np.float64))
    k = math.floor(fpr * len(neg))
    thr = neg[-1] if k == 0 else neg[len(neg) - k - 1]
    return float(np.mean(np.asarray(pos) > thr)), float(thr)


def distances(net: FingerprintNet, orig: torch.Tensor, other: torch.Tensor, noise: bool) -> torch.Tensor:
    both = net(torch.cat([orig, other]))
    rec, now = both[: len(orig)], both[len(orig):]
    if noise:
        rec = rec + (torch.rand_like(rec) - 0.5)
    else:
        rec = torch.round(rec.clamp(-127, 127))
    return torch.sqrt(((now - rec) ** 2).sum(dim=1) + 1e-6), both


def fingerprint_loss(d_neg: torch.Tensor, d_pos: torch.Tensor, codes: torch.Tensor, cfg: FingerprintConfig):
    """Squared hinge on negatives, linear hinge on their top 1%, squared hinge on positives, and a
    ranking term: every positive should exceed the negatives' top-0.5% value by ``margin_neg``
    (softplus; the gradient reaches both sides, so the benign tail is pushed down as well)."""
    over = torch.relu(d_neg - cfg.margin_neg)
    l_neg = (over ** 2).mean()
    k = max(1, int(0.01 * over.numel()))
    l_tail = torch.topk(over, k).values.mean()
    if d_pos.numel():
        l_pos = (torch.relu(cfg.margin_pos - d_pos) ** 2).mean()
        t = torch.topk(d_neg, max(1, int(0.005 * d_neg.numel()))).values[-1]
        l_rank = torch.nn.functional.softplus(t + cfg.margin_neg - d_pos).mean()
    else:
        l_pos = l_rank = d_neg.sum() * 0
    l_range = (torch.relu(codes.abs() - 110.0) ** 2).mean()
    loss = l_neg + cfg.tail_weight * l_tail + l_pos + l_rank + 0.01 * l_range
    return loss, {"neg": l_neg.item(), "tail": l_tail.item(), "pos": l_pos.item(), "rank": l_rank.item(),
                  "range": l_range.item()}


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """Apply one of 8 dihedral transforms to the last two axes."""
    if k & 4:
        a = a[..., ::-1]
    return np.rot90(a, k & 3, axes=(-2, -1))


# --------------------------------------------------------------------------------------------
# the trainer


class FingerprintTrainer:
    def __init__(self, config: FingerprintConfig, out_dir: Path, command: str = ""):
        self.cfg = config
        self.command = command
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.net = FingerprintNet(config.dims, config.width)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=config.lr, weight_decay=1e-4)
        self.step = 0
        self.history: list[dict] = []
        self.commands = [command]
        self.best = -1.0
        self.data: dict | None = None
        self.val: dict | None = None
        self.origin = ""

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _state(self) -> dict:
        return {"config": asdict(self.cfg), "command": self.command, "commands": self.commands,
                "step": self.step, "net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "history": self.history, "best": self.best, "data_origin": self.origin,
                "n_parameters": n_parameters(self.net), "torch_rng": torch.get_rng_state()}

    def save(self, path: Path | None = None) -> None:
        if not all(torch.isfinite(p).all() for p in self.net.parameters()):
            raise RuntimeError(f"non-finite weights at step {self.step}: not overwriting the checkpoint")
        path = path or self.checkpoint_path
        tmp = path.with_suffix(".tmp")
        torch.save(self._state(), tmp)
        tmp.replace(path)

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.history, self.best = state["step"], state["history"], state.get("best", -1.0)
        self.commands = [*state.get("commands", [state.get("command", "")]),
                         f"{self.command} (resumed at {self.step})"]
        torch.set_rng_state(state["torch_rng"])
        return True

    def _load_data(self) -> None:
        cfg = self.cfg
        t0 = time.time()
        train = FingerprintCache("train", cfg.seed, cfg.cache_size, side=cfg.source_crop, max_side=cfg.max_side)
        self.origin = train.origin
        log.info("train frames: %d from %s (%d groups)", len(train.sources), train.origin, len(train.groups))
        self.data = train.build(self.out / f"cache_train_{cfg.seed}_{cfg.cache_size}_{cfg.source_crop}.npz")
        val = FingerprintCache("val", cfg.seed + 1, cfg.val_size, side=cfg.source_crop, max_side=cfg.max_side)
        log.info("val frames: %d from %s (%d groups)", len(val.sources), val.origin, len(val.groups))
        self.val = val.build(self.out / f"cache_val_{cfg.seed + 1}_{cfg.val_size}_{cfg.source_crop}.npz")
        log.info("caches ready in %.0f s", time.time() - t0)

    def _batch(self, step: int):
        cfg, data = self.cfg, self.data
        rng = np.random.default_rng([cfg.seed, 7, step])
        idx = rng.integers(0, len(data["orig"]), cfg.batch)
        g_full, g = cfg.source_crop // CELL, cfg.crop // CELL
        xs = {k: [] for k in ("orig", "benign", "edited", "bvalid", "labels")}
        for i in idx:
            t = int(rng.integers(8))
            oy, ox = (int(rng.integers(0, g_full - g + 1)) for _ in range(2))
            for k, parts in xs.items():
                a = _dihedral(data[k][i], t)
                s = CELL if k in ("orig", "benign", "edited") else 1
                parts.append(a[oy * s:(oy + g) * s, ox * s:(ox + g) * s])
        img = {k: torch.from_numpy(np.stack(xs[k]).astype(np.float32) / 255.0)[:, None]
               for k in ("orig", "benign", "edited")}
        return img, torch.from_numpy(np.stack(xs["bvalid"])), torch.from_numpy(np.stack(xs["labels"]).astype(np.int64))

    def _lr(self) -> float:
        cfg = self.cfg
        warm = 200
        if self.step < warm:
            return cfg.lr * (self.step + 1) / warm
        t = min(1.0, (self.step - warm) / max(1, cfg.steps - warm))
        return 0.03 * cfg.lr + 0.97 * cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    @torch.no_grad()
    def validate(self) -> dict:
        self.net.eval()
        v = self.val
        negs, poss = [], []
        for s in range(0, len(v["orig"]), 50):
            sl = slice(s, s + 50)
            o, b, e = (torch.from_numpy(v[k][sl].astype(np.float32) / 255.0)[:, None] for k in ("orig", "benign", "edited"))
            d_b, _ = distances(self.net, o, b, noise=False)
            d_e, _ = distances(self.net, o, e, noise=False)
            lab = torch.from_numpy(v["labels"][sl].astype(np.int64))
            negs += [d_b[torch.from_numpy(v["bvalid"][sl])].numpy(), d_e[lab == 0].numpy()]
            poss.append(d_e[lab == 1].numpy())
        self.net.train()
        neg, pos = np.concatenate(negs), np.concatenate(poss)
        t3, thr3 = tpr_at_fpr(pos, neg, 1e-3)
        t2, _ = tpr_at_fpr(pos, neg, 1e-2)
        return {"val_auc": roc_auc(pos, neg), "val_tpr_fpr1e-3": t3, "val_tpr_fpr1e-2": t2,
                "val_thr_fpr1e-3": thr3, "val_neg": len(neg), "val_pos": len(pos),
                "val_neg_p99": float(np.percentile(neg, 99)), "val_pos_median": float(np.median(pos))}

    def run(self, until: int | None = None) -> None:
        cfg = self.cfg
        for name in ("openjpeg", "medsec_edge.evaluation.attacks", "medsec_edge.train.real_data"):
            logging.getLogger(name).setLevel(logging.WARNING)  # a line per J2K tile / skipped file
        resumed = self.resume()
        log.info("%s at step %d; %d parameters", "resumed" if resumed else "new run", self.step, n_parameters(self.net))
        self._load_data()
        if self.step == 0:
            rec = {"step": 0, **self.validate()}
            self.history.append(rec)
            log.info("init (the Gaussian prior alone): %s", json.dumps(rec))
        stop = min(cfg.steps, until if until is not None else cfg.steps)
        t0, acc = time.time(), {}
        while self.step < stop:
            img, bvalid, labels = self._batch(self.step)
            for group in self.opt.param_groups:
                group["lr"] = self._lr()
            d_b, codes_b = distances(self.net, img["orig"], img["benign"], noise=True)
            d_e, codes_e = distances(self.net, img["orig"], img["edited"], noise=True)
            d_neg = torch.cat([d_b[bvalid], d_e[labels == 0]])
            d_pos = d_e[labels == 1]
            loss, parts = fingerprint_loss(d_neg, d_pos, torch.cat([codes_b, codes_e]), cfg)
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
            self.opt.step()
            self.step += 1
            for k, val in {"loss": loss.item(), **parts}.items():
                acc[k] = acc.get(k, 0.0) + val
            if self.step % 50 == 0:
                n = 50
                log.info("step %d lr %.2e %s (%.2f s/step)", self.step, self._lr(),
                         " ".join(f"{k} {v / n:.3f}" for k, v in acc.items()), (time.time() - t0) / n)
                t0, acc = time.time(), {}
            if self.step % cfg.val_every == 0 or self.step == stop:
                rec = {"step": self.step, **self.validate()}
                self.history.append(rec)
                log.info("val: %s", json.dumps(rec))
                if rec["val_tpr_fpr1e-3"] > self.best:
                    self.best = rec["val_tpr_fpr1e-3"]
                    self.save(self.out / "best.pt")
                (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
            if self.step % cfg.checkpoint_every == 0 or self.step == stop:
                self.save()
        self.save()
