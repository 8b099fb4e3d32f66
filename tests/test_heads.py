"""Task heads on a tiny real VLM's pooled hidden states: on small synthetic sets the multi-label head's
held-out F1, the regression head's held-out MAE and the point head's held-out point F1 beat the
untrained heads; heads save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score
from transformers import AutoModelForImageTextToText, AutoProcessor

from raydar.heads import (
    MultilabelHead,
    PointsHead,
    RegressionHead,
    image_token_maps,
    load_head,
    pool_hidden,
    save_head,
)
from raydar.models.tiny import build_tiny_model
from raydar.sft import user_turn
from raydar.kinds import MultilabelTask, PointsTask, RegressionTask, kind_of
from tests.conftest import COLOURS, squares


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


@pytest.mark.slow
def test_multilabel_head_learns_held_out_f1_rises(features):
    hidden, x, multilabels, _ = features
    torch.manual_seed(0)
    head = kind_of(MultilabelTask(kind="multilabel", instruction="?", ontology={c: {"description": c}
                                                                               for c in COLOURS})).head(hidden)
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


@pytest.mark.slow
def test_regression_head_learns_held_out_mae_falls(features):
    hidden, x, _, regressions = features
    torch.manual_seed(0)
    task = RegressionTask(kind="regression", instruction="?", targets={
        "squares": {"description": "how many", "max": 3}, "cover": {"description": "% covered", "max": 100}})
    head = kind_of(task).head(hidden)
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
    assert kind_of(PointsTask(kind="points", instruction="?", ontology={"a": {"description": "a"}})).head(16) is None


# ---------------------------------------------------------------- the point head


@pytest.fixture(scope="module")
def cell_maps(tmp_path_factory):
    """Image-token maps of a frozen tiny Qwen2-VL for 120 demo cell images (224 px: 8x8 tokens), computed once."""
    from raydar.demo import make_demo_cells
    from raydar.sources import read_ground_truth

    folder = make_demo_cells(tmp_path_factory.mktemp("cells"), n=120, size=224, seed=3)
    truth = read_ground_truth(folder)
    from raydar.models import load_processor

    path = build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("model") / "qwen2_vl")
    processor = load_processor(path, max_pixels=224 * 224)  # the whole image, as the demo spec has it
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    prompt = processor.apply_chat_template(user_turn("Find the cells."), add_generation_prompt=True, tokenize=False)
    maps = []
    with torch.no_grad():
        for start in range(0, len(truth), 24):
            rows = truth[start:start + 24]
            images = [Image.open(folder / r["file"]).convert("RGB") for r in rows]
            batch = processor(text=[prompt] * len(images), images=images, return_tensors="pt")
            out = model(**batch, output_hidden_states=True)
            maps += image_token_maps(out.hidden_states[-1], batch, model.config)
    return model.config.text_config.hidden_size, maps, [r["label"] for r in truth]


@pytest.mark.slow
def test_point_head_learns_held_out_point_f1_rises(cell_maps):
    from raydar.metrics import score

    hidden, maps, labels = cell_maps
    assert {tuple(m.shape) for m in maps} == {(hidden, 8, 8)}  # 224 px = 16x16 patches merged 2x2
    task = PointsTask(kind="points", instruction="?", ontology={"explicit": {"description": "clear"},
                                                               "implicit": {"description": "faint"}})
    torch.manual_seed(0)
    head = kind_of(task).head(hidden, point_head=True)
    assert isinstance(head, PointsHead) and head.hidden_size == hidden
    train_maps, test_maps = maps[:90], maps[90:]

    def f1() -> float:
        with torch.no_grad():
            predicted = head.predict(head.outputs(test_maps))
        assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 and 0 <= p["score"] <= 1
                   for label in predicted for p in label["points"])
        return score(task, predicted, labels[90:])["overall"]["f1"]

    before = f1()
    optimiser = torch.optim.AdamW(head.parameters(), lr=3e-3)
    head.train()
    for step in range(300):
        pick = [(step * 8 + k) % 90 for k in range(8)]
        outputs = head.outputs([train_maps[i] for i in pick])
        loss = head.loss(outputs, head.targets([labels[i] for i in pick], outputs))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    head.eval()
    after = f1()
    print(f"point head held-out F1 (frozen tiny Qwen2-VL features, head only): {before:.3f} before, {after:.3f} after")
    assert after > before + 0.25 and after > 0.35, (before, after)


def test_point_targets_read_back_as_the_same_points():
    """A label turned into the head's targets, and targets written as the head's outputs, give the label back:
    cell, class and offset on a non-square grid, two classes, a point on the far edge."""
    head = PointsHead(4, ["explicit", "implicit"])
    label = {"points": [{"label": "implicit", "x": 0.1, "y": 0.9}, {"label": "explicit", "x": 0.55, "y": 0.3},
                        {"label": "explicit", "x": 1.0, "y": 0.0}]}
    grid = torch.zeros(4, 5, 8)  # 5 rows, 8 columns of tokens
    [(present, kind, offset)] = head.targets([label], [grid])
    assert present.sum() == 3 and kind[present.bool()].tolist() == [0, 0, 1]  # raster order: (0,7), (1,4), (4,0)
    big = 20.0  # logits standing in for certainty
    output = torch.cat([(present * 2 - 1)[None] * big,
                        torch.stack([(kind == k).float() * big for k in range(2)]),
                        torch.logit(offset.clamp(1e-4, 1 - 1e-4))])
    [back] = head.predict([output])
    expected = sorted(label["points"], key=lambda p: (p["y"], p["x"]))
    got = sorted(back["points"], key=lambda p: (p["y"], p["x"]))
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for p, q in zip(got, expected):
        assert p["x"] == pytest.approx(q["x"], abs=1e-3) and p["y"] == pytest.approx(q["y"], abs=1e-3)
        assert p["score"] == 1.0


def test_image_token_maps_follow_each_familys_grid():
    from transformers import AutoConfig

    for family, image, grid in (("qwen2_vl", Image.new("RGB", (112, 56)), (2, 4)),
                                ("llava", Image.new("RGB", (56, 56)), (4, 4))):
        path = build_tiny_model(family)
        processor = AutoProcessor.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        prompt = processor.apply_chat_template(user_turn("?"), add_generation_prompt=True, tokenize=False)
        batch = processor(text=[prompt] * 2, images=[image, image], return_tensors="pt")
        hidden = torch.arange(batch["input_ids"].numel(), dtype=torch.float32).reshape(*batch["input_ids"].shape, 1)
        maps = image_token_maps(hidden.expand(-1, -1, 3), batch, config)
        assert [tuple(m.shape) for m in maps] == [(3, *grid)] * 2, family
        positions = (batch["input_ids"][1] == config.image_token_id).nonzero()[:, 0].float()
        assert maps[1][0].flatten().tolist() == (positions + batch["input_ids"].shape[1]).tolist()  # raster order
        batch["input_ids"][0, (batch["input_ids"][0] == config.image_token_id).nonzero()[0, 0]] = 0
        with pytest.raises(ValueError, match="image tokens in the batch"):
            image_token_maps(hidden, batch, config)


def test_point_head_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    head = PointsHead(16, ["a", "b"], inner=8, threshold=0.4).eval()
    maps = [torch.randn(16, 3, 5)]
    save_head(head, tmp_path)
    loaded = load_head(tmp_path)
    assert type(loaded) is PointsHead and loaded.threshold == 0.4 and loaded.classes == ["a", "b"]
    assert torch.equal(loaded.outputs(maps)[0], head.outputs(maps)[0])


def test_a_point_head_needs_a_points_task():
    task = RegressionTask(kind="regression", instruction="?", targets={"kcal": {"description": "energy", "max": 9}})
    with pytest.raises(ValueError, match="point_head is for points tasks"):
        kind_of(task).head(16, point_head=True)


def test_point_head_answers_each_image_as_alone_in_a_mixed_batch():
    """Maps of different grids go through the network in one call, zero-padded: each image's output is what it
    gets alone."""
    torch.manual_seed(0)
    head = PointsHead(6, ["a", "b"], inner=8).eval()
    maps = [torch.randn(6, 3, 5), torch.randn(6, 4, 2), torch.randn(6, 4, 5)]
    padded = head(maps)  # what the module returns: one tensor, every image padded to the largest grid
    assert padded.shape == (3, 5, 4, 5)
    together = head.outputs(maps)
    for m, out in zip(maps, together):
        assert out.shape == (5, *m.shape[1:])
        assert torch.allclose(out, head.outputs([m])[0], atol=1e-6)
