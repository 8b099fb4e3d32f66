"""Tiny models: each family builds small, loads offline through the Auto classes, and runs end to end."""

from __future__ import annotations

import math

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import raydar.models.tiny as tiny_module
from raydar.models.tiny import MARKER, TINY_FAMILIES, build_tiny_model

PROMPT = "Find every mast cell."
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
ANSWER = '{"points": [{"label": "explicit", "x": 0.41, "y": 0.22}]}'
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "llava": "LlavaProcessor"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing may come from the hub. The library reads HF_HUB_OFFLINE once, at import, hence both."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request, tmp_path_factory, offline):
    """(family, folder, processor, model) for each family, built once and loaded from disk."""
    family = request.param
    folder = build_tiny_model(family, tmp_path_factory.mktemp("models") / family)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return family, folder, processor, model


def image_inputs(processor, answer: str | None = None):
    """Processor inputs for MESSAGES and one 224x224 image, optionally with the assistant's answer."""
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    if answer is not None:
        text += answer
    image = Image.new("RGB", (224, 224), (200, 120, 180))
    return processor(text=text, images=[image], return_tensors="pt")


def test_build_is_small_complete_and_of_the_right_classes(tiny):
    family, folder, processor, model = tiny
    files = list(folder.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    assert [p.name for p in folder.parent.iterdir()] == [family], "a temporary build folder was left behind"
    assert type(processor).__name__ == PROCESSORS[family]
    assert model.config.model_type == family


def test_config_ids_match_the_tokenizer(tiny):
    _, _, processor, model = tiny
    tokenizer = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(processor.image_token)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    if hasattr(model.config, "vision_start_token_id"):
        assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert model.config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
        assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")


def test_processor_expands_the_image_into_image_tokens(tiny):
    family, _, processor, model = tiny
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text.count(processor.image_token) == 1 and PROMPT in text
    inputs = image_inputs(processor)
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if family == "llava":
        expected = (56 // 14) ** 2
    else:
        expected = int(inputs["image_grid_thw"].prod()) // 4
    assert n_image_tokens == expected == 16


def test_forward_gives_logits_and_a_finite_loss(tiny):
    _, _, processor, model = tiny
    inputs = image_inputs(processor, ANSWER)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert math.isfinite(out.loss.item())


def test_generate_returns_new_tokens_that_decode(tiny):
    _, _, processor, model = tiny
    inputs = image_inputs(processor)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 5
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)


def test_tokenizer_round_trips_a_json_answer(tiny):
    tokenizer = tiny[2].tokenizer
    for text in [ANSWER, '{"entity": "肺炎", "caption": "A café at 9:05\\n"}']:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.tokenize("0123456789")) == 10, "digits should be single tokens"


def test_a_gradient_step_changes_the_weights_and_reaches_the_vision_tower(tiny):
    family, folder, processor, _ = tiny
    model = AutoModelForImageTextToText.from_pretrained(folder).train()  # a fresh copy to modify
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = image_inputs(processor, ANSWER)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert math.isfinite(loss.item())
    loss.backward()
    vision = [p for name, p in model.named_parameters() if "visual" in name or "vision_tower" in name]
    assert vision and any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed


def test_default_cache_is_reused_without_rebuilding(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYDAR_MODEL_CACHE", str(tmp_path))
    built = {family: build_tiny_model(family) for family in TINY_FAMILIES}
    stamps = {family: (path / "model.safetensors").stat().st_mtime_ns for family, path in built.items()}

    def no_rebuild(*args):
        raise AssertionError("rebuilt a model that was already in the cache")

    with monkeypatch.context() as spy:
        spy.setattr(tiny_module, "_write_model", no_rebuild)
        for family, path in built.items():
            assert path.parent == tmp_path and path.name.startswith(f"{family}-tiny-")
            assert build_tiny_model(family) == path
            assert (path / "model.safetensors").stat().st_mtime_ns == stamps[family]
    assert build_tiny_model("llava", seed=1) != build_tiny_model("llava")
    assert len(list(tmp_path.iterdir())) == len(TINY_FAMILIES) + 1, "temporary folders were left behind"


def test_build_refuses_bad_arguments_and_a_folder_holding_something_else(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_tiny_model("gpt2", tmp_path / "x")
    with pytest.raises(TypeError):
        build_tiny_model("llava", tmp_path / "x", hidden_sise=32)
    build_tiny_model("llava", tmp_path / "m")
    with pytest.raises(FileExistsError):
        build_tiny_model("llava", tmp_path / "m", hidden_size=32)


def test_the_same_recipe_builds_the_same_bytes(tmp_path):
    """Ray workers that each build their own copy must agree with the driver's, token for token."""
    first, second = (build_tiny_model("qwen2_vl", tmp_path / name) for name in ("a", "b"))
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other_seed = build_tiny_model("qwen2_vl", tmp_path / "c", seed=1)
    assert (other_seed / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
