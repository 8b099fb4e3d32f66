"""Dataset specs: every shipped YAML validates, and a bad one fails naming the file, the field and what
was expected. No Ray needed.
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path

import pytest
import yaml

from raydar.spec import TASK_KINDS, SplitRule, SpecError, TeacherSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*(REPO / "datasets").glob("*.yaml"), *(REPO / "datasets").glob("*.yml")])
SEED_SPECS = {
    "mast_cells.yaml": "points",
    "object_annotation.yaml": "boxes",
    "cultural_entities.yaml": "caption",
    "chest_xray.yaml": "multilabel",
    "nutrition.yaml": "regression",
}

# A small valid spec; each invalid case below breaks one thing in a copy of it.
VALID = {
    "name": "cells",
    "task": {
        "kind": "points",
        "instruction": "Find every cell.",
        "ontology": {"cell": {"description": "a round purple cell", "aliases": ["mast cell"]}},
    },
    "images": {"uri": "images"},
    "teacher": {"kind": "openai", "model": "gpt-4.1", "api_key_env": "OPENAI_API_KEY"},
}


def write_spec(folder: Path, data, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True))
    return path


def spec_error(path: Path, **kwargs) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(path, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_loads_with_a_known_task_kind(path):
    spec = load_spec(path)
    assert spec.task.kind in TASK_KINDS
    assert spec.source_file == str(path.resolve())
    if spec.teacher.kind == "openai":
        # A key pasted where the variable's name belongs would pass validation; a name is UPPER_SNAKE.
        assert spec.teacher.api_key_env or spec.teacher.api_key_file
        if spec.teacher.api_key_env:
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", spec.teacher.api_key_env)


def test_every_task_kind_and_every_seed_has_a_shipped_spec():
    kinds = {p.name: load_spec(p).task.kind for p in SHIPPED}
    assert {name: kinds.get(name) for name in SEED_SPECS} == SEED_SPECS
    assert set(kinds.values()) == set(TASK_KINDS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_ontology_names_and_aliases_do_not_collide(path):
    """The answer parser maps each name and alias to one class; a shared alias would silently pick one."""
    task = load_spec(path).task
    seen: dict[str, str] = {}
    for name, cls in getattr(task, "ontology", {}).items():
        assert cls.description.strip(), f"{name} has no description"
        for word in {name.strip().lower(), *(a.strip().lower() for a in cls.aliases)}:
            assert seen.setdefault(word, name) == name, f"{word!r} names both {seen[word]} and {name}"


def test_seed_specs_carry_the_seed_settings():
    chest = load_spec(REPO / "datasets" / "chest_xray.yaml")
    assert set(chest.task.ontology) == {
        "atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "emphysema", "fibrosis",
        "hernia", "infiltration", "mass", "no finding", "nodule", "pleural thickening", "pneumonia",
        "pneumothorax",
    }
    lora = chest.student.lora
    assert (lora.rank, lora.alpha, lora.dropout, chest.student.quantisation) == (12, 16, 0.05, "8bit")
    assert chest.student.base_model == "Qwen/Qwen2-VL-7B-Instruct"

    cells = load_spec(REPO / "datasets" / "mast_cells.yaml")
    assert set(cells.task.ontology) == {"explicit", "implicit"}
    assert cells.teacher.coordinates == "per_mille"
    assert "generativelanguage.googleapis.com" in cells.teacher.base_url

    boxes = load_spec(REPO / "datasets" / "object_annotation.yaml")
    assert boxes.task.describe_objects and boxes.task.questions_per_image > 0
    assert (boxes.student.family, boxes.student.quantisation) == ("llava", "8bit")

    food = load_spec(REPO / "datasets" / "nutrition.yaml")
    assert {n: t.unit for n, t in food.task.targets.items()} == {
        "calories": "kcal", "proteins": "g", "fats": "g", "carbs": "g",
    }

    culture = load_spec(REPO / "datasets" / "cultural_entities.yaml")
    assert culture.student.family == "qwen2_5_vl"
    aliases = {a for cls in culture.task.ontology.values() for a in cls.aliases}
    assert {"Чебурашка", "Крокодил Гена", "Колобок"} <= aliases


# ---------------------------------------------------------------- invalid specs


def _set(dotted: str, value):
    def mutate(data: dict) -> None:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _drop(dotted: str):
    def mutate(data: dict) -> None:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[leaf]

    return mutate


INVALID = [
    # (id, how to break VALID, dotted field named in the message, words of what was expected)
    ("unknown-top-level-field", _set("studnet", {"epochs": 1}), "studnet", "unknown field"),
    ("unknown-nested-field", _set("student.lora.rnak", 8), "student.lora.rnak", "unknown field"),
    ("missing-teacher-model", _drop("teacher.model"), "teacher.model", "required"),
    ("unknown-task-kind", _set("task.kind", "point"), "task.kind", "expected one of points, boxes, caption"),
    ("wrong-type", _set("teacher.concurrency", "many"), "teacher.concurrency", "valid integer"),
    ("split-fractions-sum-to-one", _set("split", {"val": 0.5, "test": 0.5}), "split", "below 1"),
    ("negative-latency", _set("teacher.simulated.latency_s", -1), "teacher.simulated.latency_s",
     "greater than or equal to 0"),
    ("empty-ontology", _set("task.ontology", {}), "task.ontology", "at least one class"),
    ("openai-teacher-without-key", _drop("teacher.api_key_env"), "teacher", "api_key_env"),
    ("images-without-uri-or-generate", _set("images", {"max_pixels": 1000}), "images", "uri"),
    ("name-not-an-id", _set("name", "Mast Cells"), "name", "pattern"),
    ("unknown-coordinates", _set("teacher.coordinates", "percent"), "teacher.coordinates", "per_mille"),
    ("regression-max-not-above-min",
     _set("task", {"kind": "regression", "instruction": "Estimate.",
                   "targets": {"calories": {"description": "energy", "min": 10, "max": 10}}}),
     "task.targets.calories", "greater than min"),
]


@pytest.mark.parametrize("mutate, field, expected", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_names_the_file_the_field_and_what_was_expected(tmp_path, mutate, field, expected):
    data = copy.deepcopy(VALID)
    mutate(data)
    path = write_spec(tmp_path, data)
    message = spec_error(path)
    assert str(path) in message.splitlines()[0]
    lines = [line.strip() for line in message.splitlines()[1:]]
    mine = [line for line in lines if line.startswith(f"{field}: ")]
    assert mine, f"no line for {field!r} in:\n{message}"
    assert any(expected in line for line in mine), message


def test_the_valid_base_spec_is_valid(tmp_path):
    """Guards the cases above: each must fail for its own reason, not because the base is broken."""
    spec = load_spec(write_spec(tmp_path, VALID))
    assert (spec.name, spec.task.kind, spec.teacher.model) == ("cells", "points", "gpt-4.1")


def test_every_problem_is_reported_at_once(tmp_path):
    data = copy.deepcopy(VALID)
    _drop("teacher.model")(data)
    _set("teacher.concurrency", 0)(data)
    message = spec_error(write_spec(tmp_path, data))
    assert "(2 problems)" in message
    assert "teacher.model:" in message and "teacher.concurrency:" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: [unclosed\ntask: {kind: points\n", "not valid YAML"),
        ("- name: cells\n- task: points\n", "expected a mapping of fields at the top level, got list"),
        ("just a string\n", "expected a mapping of fields at the top level, got str"),
        ("", "the file is empty; expected a dataset spec"),
    ],
    ids=["bad-syntax", "a-list", "a-scalar", "empty-file"],
)
def test_a_file_that_is_not_a_mapping_fails_naming_the_file(tmp_path, text, expected):
    path = write_spec(tmp_path, text)
    message = spec_error(path)
    assert message.startswith(str(path))
    assert expected in message


def test_a_missing_file_fails_naming_the_file(tmp_path):
    path = tmp_path / "nowhere" / "spec.yaml"
    message = spec_error(path)
    assert message.startswith(str(path))
    assert "cannot read" in message


# ---------------------------------------------------------------- overrides


def test_overrides_replace_nested_fields_and_leave_the_file_alone(tmp_path):
    path = write_spec(tmp_path, VALID)
    before = path.read_text()
    spec = load_spec(path, overrides={"teacher.model": "x", "student.lora.rank": 4, "split.salt": "b"})
    assert spec.teacher.model == "x"
    assert spec.student.lora.rank == 4
    assert spec.student.lora.alpha == 32  # untouched siblings keep their defaults
    assert spec.split.salt == "b"
    assert path.read_text() == before
    assert load_spec(path).teacher.model == "gpt-4.1"


def test_an_override_can_remove_a_value(tmp_path):
    data = copy.deepcopy(VALID)
    data["images"]["generate"] = {"n": 10}
    spec = load_spec(write_spec(tmp_path, data), overrides={"images.generate": None})
    assert spec.images.generate is None


def test_an_invalid_override_fails_like_an_invalid_file(tmp_path):
    path = write_spec(tmp_path, VALID)
    message = spec_error(path, overrides={"teacher.concurrency": 0})
    assert str(path) in message and "teacher.concurrency:" in message and "greater than 0" in message
    message = spec_error(path, overrides={"name.first": "x"})
    assert "name.first" in message and "not a section" in message


# ---------------------------------------------------------------- image paths


def test_relative_image_uri_is_relative_to_the_spec_file_not_the_working_dir(tmp_path, monkeypatch):
    path = write_spec(tmp_path / "specs", VALID)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec(path)
    assert spec.resolve_uri(spec.images.uri) == str((tmp_path / "specs" / "images").resolve())
    assert spec.resolve_uri("../shared/imgs") == str((tmp_path / "shared" / "imgs").resolve())


def test_absolute_home_and_remote_uris_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = load_spec(write_spec(tmp_path, VALID))
    assert spec.resolve_uri("/data/images") == "/data/images"
    assert spec.resolve_uri("~/data/images") == str(tmp_path / "home" / "data" / "images")
    assert spec.resolve_uri("s3://bucket/images") == "s3://bucket/images"


# ---------------------------------------------------------------- split


def _hex_ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(n)]


def test_split_is_deterministic_by_image_id_and_salt():
    ids = _hex_ids(500)
    first = [SplitRule(val=0.1, test=0.2).split_of(i) for i in ids]
    again = [SplitRule(val=0.1, test=0.2).split_of(i) for i in reversed(ids)][::-1]
    assert first == again
    salted = [SplitRule(val=0.1, test=0.2, salt="other").split_of(i) for i in ids]
    assert salted != first
    assert set(first) == {"train", "val", "test"}


@pytest.mark.parametrize("val, test", [(0.1, 0.2), (0.25, 0.05), (0.0, 0.5)])
def test_split_roughly_honours_the_fractions(val, test):
    ids = _hex_ids(5000, seed=1)
    rule = SplitRule(val=val, test=test)
    splits = [rule.split_of(i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert share["val"] == pytest.approx(val, abs=0.02)
    assert share["test"] == pytest.approx(test, abs=0.02)
    assert share["train"] == pytest.approx(1 - val - test, abs=0.02)


def test_a_larger_test_fraction_only_moves_images_into_test():
    """Raising `test` must not reshuffle train and val: an image leaves them only for test."""
    ids = _hex_ids(2000, seed=2)
    small, large = SplitRule(val=0.1, test=0.1), SplitRule(val=0.1, test=0.2)
    for i in ids:
        if small.split_of(i) == "test":
            assert large.split_of(i) == "test"


# ---------------------------------------------------------------- API keys


def test_api_key_comes_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("RAYDAR_TEST_KEY", "sk-from-env")
    teacher = TeacherSpec(kind="openai", model="m", api_key_env="RAYDAR_TEST_KEY")
    assert teacher.api_key() == "sk-from-env"


def test_api_key_comes_from_the_secret_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYDAR_TEST_KEY", raising=False)
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    assert TeacherSpec(kind="openai", model="m", api_key_file=str(secret)).api_key() == "sk-from-file"
    both = TeacherSpec(kind="openai", model="m", api_key_env="RAYDAR_TEST_KEY", api_key_file=str(secret))
    assert both.api_key() == "sk-from-file"  # the variable is unset: the file is next
    monkeypatch.setenv("RAYDAR_TEST_KEY", "sk-from-env")
    assert both.api_key() == "sk-from-env"  # the variable wins when set


def test_a_missing_api_key_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYDAR_TEST_KEY", raising=False)
    with pytest.raises(SpecError, match=r"\$RAYDAR_TEST_KEY"):
        TeacherSpec(kind="openai", model="m", api_key_env="RAYDAR_TEST_KEY").api_key()
    monkeypatch.setenv("RAYDAR_TEST_KEY", "")  # set but empty counts as missing
    missing_file = tmp_path / "no-such-key"
    with pytest.raises(SpecError) as caught:
        TeacherSpec(kind="openai", model="m", api_key_env="RAYDAR_TEST_KEY",
                    api_key_file=str(missing_file)).api_key()
    assert "$RAYDAR_TEST_KEY" in str(caught.value) and str(missing_file) in str(caught.value)


def test_the_simulated_teacher_needs_no_key(monkeypatch):
    monkeypatch.delenv("RAYDAR_TEST_KEY", raising=False)
    assert TeacherSpec(kind="simulated", model="sim").api_key()


# ---------------------------------------------------------------- cross-field checks


@pytest.mark.parametrize(
    ("mutate", "field", "expected"),
    [
        (_set("task.ontology", {"cell": {"description": "a", "aliases": ["blob"]},
                                "other": {"description": "b", "aliases": ["Blob"]}}),
         "task.ontology", "'blob' names both 'cell' and 'other'"),
        (_set("images.generate", {"kind": "demo_cells", "n": 10}), "images", "exactly one of `uri`"),
        (_set("serving.weights", {"finetuned": 1.0, "rga": 1.0}), "serving", "weights for ['rga']"),
        (_set("serving.members", []), "serving.members", "at least 1"),
        (_drop("task.kind"), "task.kind", "required field is missing"),
    ],
    ids=["alias-in-two-classes", "uri-and-generate", "weight-of-no-member", "no-members", "no-kind"],
)
def test_cross_field_mistakes_are_caught(tmp_path, mutate, field, expected):
    data = copy.deepcopy(VALID)
    mutate(data)
    message = spec_error(write_spec(tmp_path, data))
    line = next(line for line in message.splitlines() if line.strip().startswith(field + ":"))
    assert expected in line and "Value error" not in line


def test_unknown_task_kind_shows_what_was_written(tmp_path):
    data = copy.deepcopy(VALID)
    data["task"]["kind"] = "point"
    assert "(got 'point')" in spec_error(write_spec(tmp_path, data))
