"""Task heads on a tiny real VLM's pooled hidden states: on small synthetic sets the multi-label head's
held-out F1 and the regression head's held-out MAE beat the untrained heads; heads save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import f1_score
from transformers import AutoModelForImageTextToText, AutoProcessor

from raydar.heads import MultilabelHead, RegressionHead, head_for, load_head, pool_hidden, save_head
from raydar.models.tiny import build_tiny_model
from raydar.spec import MultilabelTask, PointsTask, RegressionTask
from raydar.sft import user_turn

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230)}


def squares(rng: np.random.Generator) -> tuple[Image.Image, dict, dict]:
    """A 64x64 image with a random subset of coloured squares; its multilabel and regression labels."""
    img = Image.new("RGB", (64, 64), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    present = {c: bool(rng.random() < 0.5) for c in COLOURS}
    area = 0
    for colour, shown in present.items():
        if shown:
            side = int(rng.integers(14, 30))
            x, y = (int(v) for v in rng.integers(0, 64 - side, 2))
            draw.rectangle([x, y, x + side, y + side], fill=COLOURS[colour])
            area += side * side
    multilabel = {"probabilities": {c: float(v) for c, v in present.items()}}
    regression = {"values": {"squares": float(sum(present.values())), "cover": min(100.0, 100 * area / 64**2)}}
    return img, multilabel, regression


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Pooled last hidden states of a frozen tiny Qwen2-VL for 160 synthetic images (computed once)."""
    path = build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("model") / "qwen2_vl")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    prompt = processor.apply_chat_template(user_turn("Which colours?"), add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    rows = [squares(rng) for _ in range(160)]
    pooled = []
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            chunk = rows[start:start + 32]
            batch = processor(text=[prompt] * len(chunk), images=[r[0] for r in chunk], return_tensors="pt")
            out = model(**batch, output_hidden_states=True)
            pooled.append(pool_hidden(out.hidden_states[-1], batch["attention_mask"]))
    x = torch.cat(pooled)
    return model.config.text_config.hidden_size, x, [r[1] for r in rows], [r[2] for r in rows]


def train(head, x, y, steps: int = 400, lr: float = 3e-3) -> None:
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr)
    head.train()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = head.loss(head(x), y)
        loss.backward()
        optimiser.step()
    head.eval()


def test_multilabel_head_learns_held_out_f1_rises(features):
    hidden, x, multilabels, _ = features
    torch.manual_seed(0)
    head = head_for(MultilabelTask(kind="multilabel", instruction="?", ontology={c: {"description": c}
                                                                                for c in COLOURS}), hidden)
    assert isinstance(head, MultilabelHead) and head.net[0].out_features == 1024
    y = head.targets(multilabels)
    train_x, test_x, train_y, test_y = x[:120], x[120:], y[:120], y[120:]
    head.fit_positive_weights(train_y)
    assert (head.pos_weight >= 1).all()

    def f1() -> float:
        with torch.no_grad():
            predicted = (torch.sigmoid(head(test_x)) > 0.5).int().numpy()
        return f1_score(test_y.int().numpy(), predicted, average="macro", zero_division=0)

    before = f1()
    train(head, train_x, train_y)
    after = f1()
    print(f"multilabel held-out macro F1: {before:.3f} before, {after:.3f} after training")
    assert after > before + 0.15 and after > 0.6, (before, after)


def test_regression_head_learns_held_out_mae_falls(features):
    hidden, x, _, regressions = features
    torch.manual_seed(0)
    task = RegressionTask(kind="regression", instruction="?", targets={
        "squares": {"description": "how many", "max": 3}, "cover": {"description": "% covered", "max": 100}})
    head = head_for(task, hidden)
    assert isinstance(head, RegressionHead)
    y = head.targets(regressions)
    assert 0 <= y.min() and y.max() <= 1  # normalised by the spec's ranges

    def mae() -> np.ndarray:
        with torch.no_grad():
            predicted = head.predict(head(x[120:]))
        truth = regressions[120:]
        return np.array([[abs(p["values"][n] - t["values"][n]) for n in ("squares", "cover")]
                         for p, t in zip(predicted, truth)]).mean(axis=0)

    before = mae()
    train(head, x[:120], y[:120])
    after = mae()
    print(f"regression held-out MAE (squares, cover %): {before.round(2)} before, {after.round(2)} after")
    assert (after < 0.7 * before).all(), (before, after)


def test_heads_save_beside_the_adapter_and_load_back(tmp_path):
    torch.manual_seed(0)
    multilabel = MultilabelHead(16, ["a", "b"], inner=8)
    multilabel.fit_positive_weights(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    regression = RegressionHead(16, {"kcal": (0.0, 2500.0)}, inner=8)
    x = torch.randn(4, 16)
    for head, folder in ((multilabel.eval(), tmp_path / "m"), (regression.eval(), tmp_path / "r")):
        save_head(head, folder)
        loaded = load_head(folder)
        assert type(loaded) is type(head) and torch.equal(loaded(x), head(x))
    assert torch.equal(load_head(tmp_path / "m").pos_weight, torch.tensor([2.0, 3.0]))  # negatives / max(positives, 1)
    assert load_head(tmp_path / "r").predict(torch.tensor([[0.5]]))[0] == {"values": {"kcal": 1250.0}}


def test_text_only_kinds_have_no_head():
    assert head_for(PointsTask(kind="points", instruction="?", ontology={"a": {"description": "a"}}), 16) is None
