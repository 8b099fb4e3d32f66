"""A deterministic synthetic microscopy set for demos and tests: mast-cell-like points with ground truth.

Two kinds of cell, as in seed 000: *explicit* cells are dark, granular, with a clear boundary;
*implicit* cells are faint and blurred into the tissue. Images vary in cell count and size, put some
cells touching, and sit on a textured, noisy background. The same (n, size, seed) gives the same
bytes on every machine with the same Pillow.

    python -m raydar.demo --out /tmp/cells --n 200
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from raydar.images import image_id
from raydar.sources import GROUND_TRUTH_FILE

PARALLEL_FROM = 500  # images from which the set is drawn by several processes (drawing one takes tens of ms)


def make_demo_cells(out_dir: str | os.PathLike, n: int = 200, size: int = 224, seed: int = 0) -> Path:
    """Write `n` PNGs and `ground_truth.jsonl` into `out_dir`; returns the folder. Idempotent. Each image
    has its own random stream, so a large set is drawn by one process per core, with the same bytes."""
    out = Path(out_dir)
    gt_path = out / GROUND_TRUTH_FILE
    if gt_path.exists() and sum(1 for _ in gt_path.open()) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    processes = min(os.cpu_count() or 1, -(-n // 100)) if n >= PARALLEL_FROM else 1
    chunks = [range(i, min(n, i + 100)) for i in range(0, n, 100)]
    tmp = gt_path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as gt:
        if processes > 1:  # spawned, not forked: the caller may be a Ray driver with threads
            with concurrent.futures.ProcessPoolExecutor(processes, multiprocessing.get_context("spawn")) as pool:
                parts = pool.map(_draw_and_write, [(out, chunk, size, seed) for chunk in chunks])
                for records in parts:
                    gt.writelines(json.dumps(r) + "\n" for r in records)
        else:
            for chunk in chunks:
                gt.writelines(json.dumps(r) + "\n" for r in _draw_and_write((out, chunk, size, seed)))
    tmp.replace(gt_path)  # the ground truth appears only once every image is written
    return out


def _draw_and_write(job: tuple[Path, range, int, int]) -> list[dict]:
    """Draw and write the images of `indices`; their ground-truth records, in order."""
    out, indices, size, seed = job
    records = []
    for i in indices:
        img, points = draw_cells_image(np.random.default_rng([seed, i]), size)
        data = _png_bytes(img)
        name = f"cells_{i:05d}.png"
        (out / name).write_bytes(data)
        records.append({"file": name, "image_id": image_id(data), "width": size, "height": size,
                        "label": {"points": points}})
    return records


def draw_cells_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict]]:
    """One image and its points (normalised centres with labels)."""
    canvas = _tissue_background(rng, size)
    n_cells = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12], p=[.04, .08, .12, .14, .14, .13, .11, .09, .07, .05, .03]))
    scale = size / 224.0
    placed: list[tuple[float, float, float]] = []
    points = []
    for _ in range(n_cells):
        kind = "explicit" if rng.random() < 0.6 else "implicit"
        radius = float(rng.uniform(6.0, 12.0) * scale)
        center = _place(rng, size, radius, placed)
        if center is None:
            continue
        placed.append((center[0], center[1], radius))
        layer = _cell_layer(rng, size, center, radius, kind)
        canvas = canvas * (1.0 - layer[..., 3:4]) + layer[..., :3] * layer[..., 3:4]
        points.append({"label": kind, "x": round(center[0] / size, 5), "y": round(center[1] / size, 5)})
    canvas += rng.normal(0.0, 0.025, canvas.shape)  # sensor noise
    img = Image.fromarray(np.clip(canvas * 255.0, 0, 255).astype(np.uint8), "RGB")
    return img, points


def _tissue_background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([0.93, 0.80, 0.86]) + rng.normal(0, 0.02, 3)  # pale eosin pink
    low = _smooth_noise(rng, size, blur=size / 6)
    fibres = _smooth_noise(rng, size, blur=3.0, stretch=True)
    tex = 0.06 * low[..., None] + 0.035 * fibres[..., None]
    tint = np.array([0.5, 1.0, 0.7])  # texture darkens green most, as stained tissue does
    return np.clip(base - tex * tint, 0, 1)


def _smooth_noise(rng: np.random.Generator, size: int, blur: float, stretch: bool = False) -> np.ndarray:
    """Zero-mean, unit-std noise with features about `blur` pixels wide (streaks when `stretch`)."""
    cells = max(2, int(size / max(blur, 1.0)))
    grid = rng.normal(0, 1, (cells, max(2, cells // 4) if stretch else cells)).astype(np.float32)
    big = int(size * 1.5)  # rotate a larger field and crop, so no corner is left empty
    img = Image.fromarray(grid, "F").resize((big, big), Image.Resampling.BICUBIC)
    if stretch:
        img = img.rotate(float(rng.uniform(0, 180)), resample=Image.Resampling.BILINEAR)
    off = (big - size) // 2
    img = img.crop((off, off, off + size, off + size))
    arr = np.asarray(img, dtype=np.float32)
    return (arr - arr.mean()) / (arr.std() + 1e-6)


def _place(rng, size, radius, placed) -> tuple[float, float] | None:
    margin = radius + 2
    for _ in range(40):
        if placed and rng.random() < 0.2:  # a touching neighbour
            px, py, pr = placed[int(rng.integers(len(placed)))]
            angle = rng.uniform(0, 2 * np.pi)
            d = (pr + radius) * rng.uniform(0.9, 1.05)
            x, y = px + d * np.cos(angle), py + d * np.sin(angle)
        else:
            x, y = rng.uniform(margin, size - margin, 2)
        if not (margin <= x <= size - margin and margin <= y <= size - margin):
            continue
        if all(np.hypot(x - px, y - py) >= 0.85 * (pr + radius) for px, py, pr in placed):
            return float(x), float(y)
    return None


def _cell_layer(rng, size, center, radius, kind) -> np.ndarray:
    """RGBA float layer with one cell: granular purple body, darker nucleus."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = center
    aspect = rng.uniform(0.8, 1.2)
    theta = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / (radius * aspect)
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (radius / aspect)
    r = np.sqrt(u**2 + v**2)
    granules = rng.random((size, size)) < 0.35
    if kind == "explicit":
        body = np.clip((1.0 - r) * 6.0, 0, 1)  # sharp edge
        alpha = body * (0.85 + 0.15 * granules)
        colour = np.array([0.42, 0.18, 0.45]) + rng.normal(0, 0.03, 3)
        nucleus = np.clip((0.45 - r) * 8.0, 0, 1)
        rgb = colour - 0.15 * nucleus[..., None]
    else:
        body = np.clip((1.0 - r) * 2.0, 0, 1)  # soft edge
        alpha = body * (0.45 + 0.12 * granules)
        colour = np.array([0.58, 0.36, 0.60]) + rng.normal(0, 0.03, 3)
        rgb = np.broadcast_to(colour, (size, size, 3)).copy()
    layer = np.dstack([np.broadcast_to(rgb, (size, size, 3)), alpha]).astype(np.float32)
    if kind == "implicit":
        img = Image.fromarray((np.clip(layer, 0, 1) * 255).astype(np.uint8), "RGBA")
        layer = np.asarray(img.filter(ImageFilter.GaussianBlur(radius * 0.2)), dtype=np.float32) / 255.0
    return layer


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_demo_cells(args.out, args.n, args.size, args.seed)
    print(f"{args.n} demo images and {GROUND_TRUTH_FILE} in {out}")


if __name__ == "__main__":
    main()
