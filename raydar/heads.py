"""Task heads on a vision-language model's hidden states, trained beside its LoRA adapter.

- multilabel (seed 004, chest X-ray): pooled hidden -> 1024 -> one logit per class, binary
  cross-entropy with a positive weight per class (rare findings count more);
- regression (seed 003, nutrition): pooled hidden -> 256 -> one value per target, trained on targets
  normalised by the spec's ranges (calories in the hundreds and fats in tens weigh alike);
- points (seed 000, mast cells; `student.point_head: true`): the hidden states of the image tokens,
  laid out on the image's token grid -> 3x3 conv -> per token: is a point's centre in this token's
  cell, which class, and where in the cell. One forward pass finds every point, with a score, without
  generating text; a small student learns it from a few hundred images where it cannot learn to write
  coordinates (DESIGN.md).

    head = kind_of(spec.task).head(model.config.text_config.hidden_size)
    pooled = pool_hidden(outputs.hidden_states[-1], batch["attention_mask"])
    loss = head.loss(head(pooled), head.targets(labels))

    head = kind_of(spec.task).head(hidden_size, point_head=True)
    maps = head.outputs(image_token_maps(outputs.hidden_states[-1], batch, model.config))
    loss = head.loss(maps, head.targets(labels, maps))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

HEAD_FILE = "head.pt"


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last layer's hidden states over the real (unpadded) tokens: (batch, hidden)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def token_grids(batch: dict, config) -> list[tuple[int, int]]:
    """(rows, columns) of image tokens for each image of a batch, in the order the images come.

    Qwen VL models merge `spatial_merge_size`^2 patches into one token over a grid that follows the
    resized image (`image_grid_thw`); LLaVA has one token per patch of its fixed square input."""
    grid_thw = batch.get("image_grid_thw")
    if grid_thw is not None:
        merge = config.vision_config.spatial_merge_size
        return [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
    side = config.vision_config.image_size // config.vision_config.patch_size
    return [(side, side)] * int(batch["pixel_values"].shape[0])


def image_token_maps(hidden: torch.Tensor, batch: dict, config) -> list[torch.Tensor]:
    """The hidden states of each image's tokens as a (hidden, rows, columns) map, in raster order."""
    grids = token_grids(batch, config)
    states = hidden[batch["input_ids"] == config.image_token_id]  # every image's tokens, image after image
    if states.shape[0] != sum(r * c for r, c in grids):
        raise ValueError(f"{states.shape[0]} image tokens in the batch, but its images' grids {grids} need "
                         f"{sum(r * c for r, c in grids)}")
    maps, start = [], 0
    for rows, cols in grids:
        maps.append(states[start:start + rows * cols].reshape(rows, cols, -1).permute(2, 0, 1))
        start += rows * cols
    return maps


class PointsHead(nn.Module):
    """Per image token: one logit for "a point's centre lies in this token's cell", one per class, and
    the centre's offset within the cell (two sigmoids). A 3x3 convolution lets a token see its
    neighbours, so a cell cut by a cell boundary is still placed well. One point per cell at most:
    choose the resolution (`student.max_pixels`) so that centres rarely share a cell."""

    def __init__(self, hidden_size: int, classes: list[str], inner: int = 128, positive_weight: float = 4.0,
                 threshold: float = 0.5) -> None:
        super().__init__()
        self.classes = list(classes)
        self.threshold = threshold
        self.net = nn.Sequential(
            nn.Conv2d(hidden_size, inner, 3, padding=1), nn.GELU(), nn.Conv2d(inner, 3 + len(self.classes), 1)
        )
        self.register_buffer("positive_weight", torch.tensor(positive_weight))

    @property
    def hidden_size(self) -> int:
        return self.net[0].in_channels

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """(images, 3 + classes, rows, columns) for the whole batch, each image's output zero-padded to the
        largest grid at its right and bottom (what the 3x3 convolution's own padding gives each one alone);
        `outputs` cuts them to their own grids.

        One call of the network and one tensor out, whatever the batch holds: under ZeRO-3 every worker
        must fetch the same modules in the same order at every step, and DeepSpeed fetches a module again
        in the backward pass for each tensor it returned (a list of one output per image made that count
        follow the batch size, and workers with batches of different sizes waited on each other forever)."""
        rows = max(m.shape[1] for m in maps)
        cols = max(m.shape[2] for m in maps)
        padded = torch.stack([nn.functional.pad(m, (0, cols - m.shape[2], 0, rows - m.shape[1])) for m in maps])
        return self.net(padded.to(self.net[0].weight.dtype))

    def outputs(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """(3 + classes, rows, columns) per image: objectness logit, class logits, offset logits (x, y)."""
        return [o[:, :m.shape[1], :m.shape[2]] for o, m in zip(self(maps), maps)]

    def targets(self, labels: list[dict], maps: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Per image, on its output's grid: (is a centre here 0/1, class index or -100, offset in the cell)."""
        out = []
        for label, m in zip(labels, maps):
            rows, cols = m.shape[-2:]
            present = torch.zeros(rows, cols)
            kind = torch.full((rows, cols), -100, dtype=torch.long)
            offset = torch.zeros(2, rows, cols)
            for point in label["points"]:
                if point["label"] not in self.classes:
                    continue
                x, y = float(point["x"]) * cols, float(point["y"]) * rows
                c, r = min(max(int(x), 0), cols - 1), min(max(int(y), 0), rows - 1)
                present[r, c] = 1.0
                kind[r, c] = self.classes.index(point["label"])
                offset[:, r, c] = torch.tensor([min(max(x - c, 0.0), 1.0), min(max(y - r, 0.0), 1.0)])
            out.append((present.to(m.device), kind.to(m.device), offset.to(m.device)))
        return out

    def loss(self, outputs: list[torch.Tensor], targets: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Objectness (BCE, centres weighted up: they are few), class and offset (L1) where centres are."""
        n = len(self.classes)
        logits = torch.cat([o[0].float().flatten() for o in outputs])
        present = torch.cat([t[0].flatten() for t in targets])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, present, pos_weight=self.positive_weight)
        where = present.bool()
        if where.any():
            kinds = torch.cat([o[1:1 + n].float().flatten(1) for o in outputs], dim=1).T[where]
            loss = loss + nn.functional.cross_entropy(kinds, torch.cat([t[1].flatten() for t in targets])[where])
            offsets = torch.cat([torch.sigmoid(o[1 + n:].float()).flatten(1) for o in outputs], dim=1).T[where]
            true = torch.cat([t[2].flatten(1) for t in targets], dim=1).T[where]
            loss = loss + (offsets - true).abs().mean()
        return loss

    def predict(self, outputs: list[torch.Tensor], threshold: float | None = None) -> list[dict]:
        """`{"points": [{label, x, y, score}]}` per image, x and y normalised, score the objectness."""
        threshold = self.threshold if threshold is None else threshold
        n = len(self.classes)
        labels = []
        for o in outputs:
            o = o.float()
            rows, cols = o.shape[-2:]
            score = torch.sigmoid(o[0])
            kind = o[1:1 + n].argmax(dim=0)
            offset = torch.sigmoid(o[1 + n:])
            points = [
                {"label": self.classes[int(kind[r, c])], "x": round((c + float(offset[0, r, c])) / cols, 4),
                 "y": round((r + float(offset[1, r, c])) / rows, 4), "score": round(float(score[r, c]), 4)}
                for r, c in (score >= threshold).nonzero().tolist()
            ]
            labels.append({"points": sorted(points, key=lambda p: -p["score"])})
        return labels

    def config(self) -> dict:
        return {"kind": "points", "classes": self.classes, "inner": self.net[0].out_channels,
                "positive_weight": float(self.positive_weight), "threshold": self.threshold}

    @classmethod
    def from_config(cls, config: dict) -> PointsHead:
        return cls(config["hidden_size"], config["classes"], inner=config["inner"],
                   positive_weight=config["positive_weight"], threshold=config["threshold"])


class MultilabelHead(nn.Module):
    def __init__(self, hidden_size: int, classes: list[str], inner: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.classes = list(classes)
        self.net = nn.Sequential(
            nn.Linear(hidden_size, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, len(self.classes))
        )
        self.register_buffer("pos_weight", torch.ones(len(self.classes)))

    @property
    def hidden_size(self) -> int:
        return self.net[0].in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled.to(self.net[0].weight.dtype))

    def fit_positive_weights(self, targets: torch.Tensor, cap: float = 50.0) -> None:
        """pos_weight = negatives / positives per class, from the training labels (capped for classes
        seen once or never)."""
        positives = targets.sum(dim=0)
        negatives = targets.shape[0] - positives
        self.pos_weight.copy_((negatives / positives.clamp(min=1.0)).clamp(min=1.0, max=cap))

    def targets(self, labels: list[dict], threshold: float = 0.5) -> torch.Tensor:
        """0/1 per class from labels `{"probabilities": {...}}` (a teacher's probability above threshold)."""
        return torch.tensor(
            [[float(label["probabilities"].get(c, 0.0) > threshold) for c in self.classes] for label in labels]
        )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            logits.float(), targets.float(), pos_weight=self.pos_weight
        )

    def predict(self, logits: torch.Tensor) -> list[dict]:
        probs = torch.sigmoid(logits.float())
        return [{"probabilities": dict(zip(self.classes, row.tolist()))} for row in probs]

    def config(self) -> dict:
        return {"kind": "multilabel", "classes": self.classes, "inner": self.net[0].out_features}

    @classmethod
    def from_config(cls, config: dict) -> MultilabelHead:
        return cls(config["hidden_size"], config["classes"], inner=config["inner"])


class RegressionHead(nn.Module):
    def __init__(self, hidden_size: int, ranges: dict[str, tuple[float, float]], inner: int = 256) -> None:
        super().__init__()
        self.names = list(ranges)
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, len(self.names)))
        self.register_buffer("low", torch.tensor([ranges[n][0] for n in self.names], dtype=torch.float32))
        self.register_buffer("span", torch.tensor([ranges[n][1] - ranges[n][0] for n in self.names],
                                                  dtype=torch.float32))

    @property
    def hidden_size(self) -> int:
        return self.net[0].in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Predictions in normalised units (0 = the target's min, 1 = its max)."""
        return self.net(pooled.to(self.net[0].weight.dtype))

    def targets(self, labels: list[dict]) -> torch.Tensor:
        values = torch.tensor([[float(label["values"][n]) for n in self.names] for label in labels])
        return (values - self.low) / self.span

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.smooth_l1_loss(predictions.float(), targets.float(), beta=0.1)

    def predict(self, predictions: torch.Tensor) -> list[dict]:
        values = predictions.float() * self.span + self.low
        return [{"values": dict(zip(self.names, row.tolist()))} for row in values]

    def config(self) -> dict:
        ranges = {n: (float(lo), float(lo + sp)) for n, lo, sp in zip(self.names, self.low, self.span)}
        return {"kind": "regression", "ranges": ranges, "inner": self.net[0].out_features}

    @classmethod
    def from_config(cls, config: dict) -> RegressionHead:
        return cls(config["hidden_size"], {n: tuple(r) for n, r in config["ranges"].items()}, inner=config["inner"])


Head = MultilabelHead | RegressionHead | PointsHead
HEADS = {"points": PointsHead, "multilabel": MultilabelHead, "regression": RegressionHead}  # by config()'s `kind`


def save_head(head: Head, folder: str | Path) -> Path:
    """The head's weights and what rebuilds it, beside the adapter in a checkpoint folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hidden_size = head.hidden_size
    torch.save({"config": {**head.config(), "hidden_size": hidden_size}, "state": head.state_dict()},
               folder / HEAD_FILE)
    (folder / "head.json").write_text(json.dumps({**head.config(), "hidden_size": hidden_size}, indent=2))
    return folder / HEAD_FILE


def load_head(folder: str | Path) -> Head:
    saved = torch.load(Path(folder) / HEAD_FILE, map_location="cpu", weights_only=True)
    config = saved["config"]
    if config["kind"] not in HEADS:
        raise ValueError(f"{folder}/{HEAD_FILE}: unknown head {config['kind']!r}; expected one of {', '.join(HEADS)}")
    head = HEADS[config["kind"]].from_config(config)
    head.load_state_dict(saved["state"])
    return head.eval()  # for prediction; call .train() to go on training it
