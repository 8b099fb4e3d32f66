"""Task heads on a vision-language model's pooled hidden state, trained beside its LoRA adapter.

- multilabel (seed 004, chest X-ray): pooled hidden -> 1024 -> one logit per class, binary
  cross-entropy with a positive weight per class (rare findings count more);
- regression (seed 003, nutrition): pooled hidden -> 256 -> one value per target, trained on targets
  normalised by the spec's ranges (calories in the hundreds and fats in tens weigh alike).

    head = head_for(spec.task, model.config.text_config.hidden_size)
    pooled = pool_hidden(outputs.hidden_states[-1], batch["attention_mask"])
    loss = head.loss(head(pooled), head.targets(labels))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from raydar.spec import MultilabelTask, RegressionTask

HEAD_FILE = "head.pt"


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last layer's hidden states over the real (unpadded) tokens: (batch, hidden)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MultilabelHead(nn.Module):
    def __init__(self, hidden_size: int, classes: list[str], inner: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.classes = list(classes)
        self.net = nn.Sequential(
            nn.Linear(hidden_size, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, len(self.classes))
        )
        self.register_buffer("pos_weight", torch.ones(len(self.classes)))

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


class RegressionHead(nn.Module):
    def __init__(self, hidden_size: int, ranges: dict[str, tuple[float, float]], inner: int = 256) -> None:
        super().__init__()
        self.names = list(ranges)
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, len(self.names)))
        self.register_buffer("low", torch.tensor([ranges[n][0] for n in self.names], dtype=torch.float32))
        self.register_buffer("span", torch.tensor([ranges[n][1] - ranges[n][0] for n in self.names],
                                                  dtype=torch.float32))

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


def head_for(task, hidden_size: int) -> MultilabelHead | RegressionHead | None:
    """The head a task kind trains beside its adapter, or None for kinds that answer in text only."""
    if isinstance(task, MultilabelTask):
        return MultilabelHead(hidden_size, list(task.ontology))
    if isinstance(task, RegressionTask):
        return RegressionHead(hidden_size, {n: (t.min, t.max) for n, t in task.targets.items()})
    return None


def save_head(head: MultilabelHead | RegressionHead, folder: str | Path) -> Path:
    """The head's weights and what rebuilds it, beside the adapter in a checkpoint folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hidden_size = head.net[0].in_features
    torch.save({"config": {**head.config(), "hidden_size": hidden_size}, "state": head.state_dict()},
               folder / HEAD_FILE)
    (folder / "head.json").write_text(json.dumps({**head.config(), "hidden_size": hidden_size}, indent=2))
    return folder / HEAD_FILE


def load_head(folder: str | Path) -> MultilabelHead | RegressionHead:
    saved = torch.load(Path(folder) / HEAD_FILE, map_location="cpu", weights_only=True)
    config = saved["config"]
    if config["kind"] == "multilabel":
        head = MultilabelHead(config["hidden_size"], config["classes"], inner=config["inner"])
    elif config["kind"] == "regression":
        ranges = {n: tuple(r) for n, r in config["ranges"].items()}
        head = RegressionHead(config["hidden_size"], ranges, inner=config["inner"])
    else:
        raise ValueError(f"{folder}/{HEAD_FILE}: unknown head kind {config['kind']!r}")
    head.load_state_dict(saved["state"])
    return head.eval()  # for prediction; call .train() to go on training it
