"""The simulated teacher's use of few-shot examples, over real HTTP: it learns only from examples it can
check, and answers exactly as before without them. Image embedders: a plug-in by import path, and CLIP
from local files (a tiny one built from config; real weights only when they are on the machine)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from raydar.embeddings import EmbedderError, image_embedder
from raydar.sources import read_ground_truth
from tests.conftest import start_teacher


class GreyHistogram:
    """A deliberately different image embedder, loaded by import path (`tests.test_rag:GreyHistogram`)."""

    name, version, dim = "grey-histogram", "1", 16

    def embed(self, images):
        out = [np.histogram(np.asarray(i.convert("L")), bins=16, range=(0, 256))[0].astype(np.float32) for i in images]
        return np.stack([v / (np.linalg.norm(v) + 1e-9) for v in out])


def _image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def _few_shot(examples: list[tuple[bytes, dict]], query: bytes) -> list[dict]:
    messages = [{"role": "system", "content": "Find every cell."}]
    for data, label in examples:
        messages += [{"role": "user", "content": [{"type": "text", "text": "Example:"}, _image(data)]},
                     {"role": "assistant", "content": json.dumps(label)}]
    return messages + [{"role": "user", "content": [{"type": "text", "text": "Now this image."}, _image(query)]}]


@pytest.fixture(scope="module")
def hard_teacher(demo_folder):
    """A noiseless simulator that overlooks every implicit cell zero-shot; one good example halves that."""
    sim = start_teacher(demo_folder, latency_s=0, miss_rate=0, false_positives=0, jitter=0, label_flip_rate=0,
                        zero_shot_miss={"implicit": 1.0}, example_gain=0.5)
    yield sim
    sim.stop()


def _ask(sim, messages) -> dict:
    reply = httpx.post(f"{sim.base_url}/chat/completions", json={"model": "m", "messages": messages}, timeout=30)
    assert reply.status_code == 200, reply.text
    return json.loads(reply.json()["choices"][0]["message"]["content"])


def _pick(demo_folder):
    records = read_ground_truth(demo_folder)
    with_implicit = [r for r in records if sum(p["label"] == "implicit" for p in r["label"]["points"]) >= 1]
    query = max(records, key=lambda r: sum(p["label"] == "implicit" for p in r["label"]["points"]))
    examples = [r for r in with_implicit if r is not query][:3]
    read = lambda r: (demo_folder / r["file"]).read_bytes()
    return query, examples, read


def test_zero_shot_it_misses_the_hard_class_and_good_examples_bring_it_back(hard_teacher, demo_folder):
    query, examples, read = _pick(demo_folder)
    implicit = lambda answer: sum(p["label"] == "implicit" for p in answer["points"])
    truth = sum(p["label"] == "implicit" for p in query["label"]["points"])

    zero = _ask(hard_teacher, _few_shot([], read(query)))
    assert implicit(zero) == 0  # rate 1.0: every implicit cell overlooked
    three = _ask(hard_teacher, _few_shot([(read(r), r["label"]) for r in examples], read(query)))
    entry = hard_teacher.log[-1]
    assert entry.examples == [r["file"] for r in examples] and entry.image == query["file"]
    assert entry.credit["implicit"] == 3  # each example showed implicit cells where they are
    assert 0 < implicit(three) <= truth  # miss rate 1.0 * 0.5**3 = 0.125
    explicit = lambda a: sorted((p["x"], p["y"]) for p in a["points"] if p["label"] == "explicit")
    assert explicit(three) == explicit(zero)  # the rest of the answer is the same draw


def test_wrong_or_unreadable_example_labels_teach_nothing(hard_teacher, demo_folder):
    query, examples, read = _pick(demo_folder)
    moved = [(read(r), {"points": [{**p, "x": (p["x"] + 0.5) % 1} for p in r["label"]["points"]]}) for r in examples]
    renamed = [(read(r), {"points": [{**p, "label": "explicit"} for p in r["label"]["points"]]}) for r in examples]
    _ask(hard_teacher, _few_shot(moved, read(query)))
    assert hard_teacher.log[-1].credit.get("implicit", 0) == 0
    _ask(hard_teacher, _few_shot(renamed, read(query)))
    assert "implicit" not in hard_teacher.log[-1].credit
    prose = [{"role": "user", "content": [_image(read(examples[0]))]}, {"role": "assistant", "content": "no idea"},
             {"role": "user", "content": [_image(read(query))]}]
    answer = _ask(hard_teacher, prose)
    assert hard_teacher.log[-1].credit == {} and hard_teacher.log[-1].examples == [examples[0]["file"]]
    assert not any(p["label"] == "implicit" for p in answer["points"])


def test_without_extra_rates_examples_change_nothing(demo_folder):
    """The default simulator (what the label job and its tests use) answers the same, examples or not."""
    query, examples, read = _pick(demo_folder)
    sim = start_teacher(demo_folder, latency_s=0)
    try:
        alone = _ask(sim, _few_shot([], read(query)))
        shown = _ask(sim, _few_shot([(read(r), r["label"]) for r in examples], read(query)))
    finally:
        sim.stop()
    assert alone == shown


def test_the_darkness_blobs_from_the_shared_filters_are_those_of_the_darkness_image(demo_folder):
    """BlobColourTexture filters the brightness once and negates it for the darkness. Its codes must be the
    ones filtering the darkness image (1 - gray) itself gives, or vectors stored by an earlier version
    would no longer compare with new queries."""
    from scipy import ndimage as ndi

    from raydar.embeddings import BlobColourTexture, _unit

    embedder = BlobColourTexture()

    def darkness_on_its_own(gray: np.ndarray) -> np.ndarray:
        channel = 1.0 - gray
        centred = channel - np.median(channel)
        codes = []
        for s in embedder.sigmas:
            dog = (ndi.gaussian_filter(centred, s) - ndi.gaussian_filter(centred, 1.6 * s)) * s
            peaks = dog == ndi.maximum_filter(dog, size=int(2 * s) + 1)
            codes += [np.exp(-((np.log1p(np.count_nonzero(peaks & (dog > t))) - embedder.centres) ** 2) / (2 * 0.35**2))
                      for t in embedder.contrasts]
        return _unit(np.concatenate(codes))

    for record in read_ground_truth(demo_folder)[:40]:
        img = Image.open(demo_folder / record["file"]).convert("RGB").resize((embedder.side,) * 2,
                                                                             Image.Resampling.BILINEAR)
        gray = (np.asarray(img, np.float32) / 255.0).mean(axis=2)
        dark, bright = embedder._blobs(gray)
        assert np.array_equal(dark, darkness_on_its_own(gray)), record["file"]
        assert not np.array_equal(dark, bright)


def test_image_embedder_by_import_path_and_unknown_names():
    embedder = image_embedder("tests.test_rag:GreyHistogram")
    vectors = embedder.embed([Image.new("RGB", (10, 10), (200, 10, 10))])
    assert vectors.shape == (1, 16) and np.isclose(np.linalg.norm(vectors[0]), 1)
    with pytest.raises(EmbedderError, match="unknown embedder 'student-vision'"):
        image_embedder("student-vision")
    with pytest.raises(EmbedderError, match="cannot import 'tests.nowhere:Thing'"):
        image_embedder("tests.nowhere:Thing")


def test_clip_embedder_from_a_local_folder(tmp_path):
    """CLIP's code path on a tiny CLIP built from config (no weights exist for it to download)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=12)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    embedder = image_embedder(f"clip:{tmp_path / 'clip'}")
    vectors = embedder.embed([Image.new("RGB", (50, 40), (0, 90, 200)), Image.new("RGB", (20, 20))])
    assert embedder.name == f"clip:{tmp_path / 'clip'}" and embedder.dim == 12
    assert vectors.shape == (2, 12) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    with pytest.raises(EmbedderError, match="CLIP weights .* are not on this machine"):
        image_embedder(f"clip:{tmp_path / 'missing'}")


def test_real_clip_when_its_weights_are_here():
    try:
        embedder = image_embedder("clip")
    except EmbedderError as e:
        pytest.skip(f"no local CLIP weights: {e}")
    assert embedder.embed([Image.new("RGB", (64, 64))]).shape == (1, embedder.dim)
