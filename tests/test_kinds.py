"""Task kinds: teacher answers parse into canonical, normalised labels, and bad answers fail loudly.

The parser is where a teacher's convention (fractions, 0-1000, pixels) becomes raydar's normalised
coordinates, so the round trips below are the guard against the most reported grounding bug.
"""

from __future__ import annotations

import json

import pytest

from raydar.kinds import (
    BoxesTask,
    CaptionTask,
    MultilabelTask,
    PointsTask,
    RegressionTask,
    AnswerError,
    Boxes,
    Caption,
    Multilabel,
    Points,
    Regression,
    extract_json,
    kind_of,
)

WIDTH, HEIGHT = 640, 480  # not square, so a swapped x/y or width/height shows

CELLS = {
    "explicit": {"description": "dark purple granular cell with a sharp boundary", "aliases": ["Clear", "obvious"]},
    "implicit": {"description": "faint lilac cell fading into the tissue", "aliases": ["faint"]},
}


def points_spec(**kw) -> PointsTask:
    return PointsTask(kind="points", instruction="Find every mast cell.", ontology=CELLS, **kw)


def boxes_spec(**kw) -> BoxesTask:
    ontology = {
        "car": {"description": "a passenger car seen from any side", "aliases": ["automobile", "Sedan"]},
        "person": {"description": "a human standing, walking or sitting", "aliases": ["pedestrian"]},
    }
    return BoxesTask(kind="boxes", instruction="Find the cars and people.", ontology=ontology, **kw)


def caption_spec(**kw) -> CaptionTask:
    ontology = {
        "Hagia Sophia": {"description": "domed former basilica in Istanbul", "aliases": ["Ayasofya"]},
        "Taj Mahal": {"description": "white marble mausoleum in Agra", "aliases": ["Tadj Mahal"]},
    }
    return CaptionTask(kind="caption", instruction="Name the monument and describe it.", ontology=ontology, **kw)


def multilabel_spec(**kw) -> MultilabelTask:
    ontology = {
        "effusion": {"description": "fluid blunting the costophrenic angle", "aliases": ["pleural effusion"]},
        "cardiomegaly": {"description": "heart wider than half the chest", "aliases": ["enlarged heart"]},
        "nodule": {"description": "small round opacity in the lung", "aliases": []},
    }
    return MultilabelTask(kind="multilabel", instruction="Which findings are present?", ontology=ontology, **kw)


def regression_spec(**kw) -> RegressionTask:
    targets = {
        "calories": {"description": "energy of the whole plate", "unit": "kcal", "max": 2000},
        "proteins": {"description": "protein mass", "unit": "g", "max": 150},
        "delta": {"description": "a signed quantity", "unit": "", "min": -10, "max": 10},
    }
    return RegressionTask(kind="regression", instruction="Estimate the nutrition.", targets=targets, **kw)


# ---------------------------------------------------------------- clean answers, all five kinds

# (kind, a clean teacher answer, the canonical normalised label it must become)
CLEAN = {
    "points": (
        Points(points_spec()),
        {"points": [{"label": "explicit", "x": 0.25, "y": 0.75}, {"label": "faint", "x": 0.5, "y": 0.1, "score": 0.4}]},
        {
            "points": [
                {"label": "explicit", "x": 0.25, "y": 0.75, "score": 1.0},
                {"label": "implicit", "x": 0.5, "y": 0.1, "score": 0.4},
            ]
        },
    ),
    "boxes": (
        Boxes(boxes_spec()),
        {
            "objects": [{"label": "automobile", "box": [0.1, 0.2, 0.5, 0.6], "description": "red car"}],
            "qa": [{"question": "How many cars?", "answer": "one"}],
        },
        {
            "objects": [{"label": "car", "box": [0.1, 0.2, 0.5, 0.6], "description": "red car", "score": 1.0}],
            "qa": [{"question": "How many cars?", "answer": "one"}],
        },
    ),
    "caption": (
        Caption(caption_spec()),
        {"entity": "ayasofya", "caption": "  The Hagia Sophia at dusk.  "},
        {"entity": "Hagia Sophia", "caption": "The Hagia Sophia at dusk."},
    ),
    "multilabel": (
        Multilabel(multilabel_spec()),
        {"probabilities": {"Pleural Effusion": 0.9, "cardiomegaly": 0.2}},
        {"probabilities": {"effusion": 0.9, "cardiomegaly": 0.2, "nodule": 0.0}},
    ),
    "regression": (
        Regression(regression_spec()),
        {"values": {"Calories": 640, "proteins": "31.5", "DELTA": -2}},
        {"values": {"calories": 640.0, "proteins": 31.5, "delta": -2.0}},
    ),
}


@pytest.mark.parametrize("name", list(CLEAN))
def test_clean_json_parses_into_the_canonical_label(name):
    kind, answer, expected = CLEAN[name]
    assert kind.parse(json.dumps(answer), WIDTH, HEIGHT) == expected


@pytest.mark.parametrize("name", list(CLEAN))
@pytest.mark.parametrize(
    "wrap",
    [
        "Sure! Here is what I see in the image:\n{}\nLet me know if you need more.",
        "```json\n{}\n```",
        "I looked carefully.\n\n```json\n{}\n```\nThat is all.",
        "```\n{}\n```",
    ],
    ids=["prose", "json-fence", "prose-and-fence", "bare-fence"],
)
def test_json_wrapped_in_prose_or_fences_parses(name, wrap):
    kind, answer, expected = CLEAN[name]
    text = wrap.replace("{}", json.dumps(answer, indent=2))
    assert kind.parse(text, WIDTH, HEIGHT) == expected


@pytest.mark.parametrize("name", list(CLEAN))
def test_truncated_json_raises(name):
    """Every cut of the answer raises (a teacher hitting max_tokens), up to the last closing brackets."""
    kind, answer, _ = CLEAN[name]
    text = json.dumps(answer)
    for cut in range(1, len(text) - 1):
        with pytest.raises(AnswerError):
            kind.parse(text[:cut], WIDTH, HEIGHT)


def test_a_boxes_answer_cut_off_in_its_qa_pairs_raises():
    kind, answer, _ = CLEAN["boxes"]
    text = json.dumps(answer)
    with pytest.raises(AnswerError):
        kind.parse(text[: text.index('"answer"')], WIDTH, HEIGHT)


@pytest.mark.parametrize("name", list(CLEAN))
@pytest.mark.parametrize(
    "text",
    ["", "   ", "I cannot see any image.", "{points: [x=1]}", "{'entity': 'Taj Mahal'}", "null", "42", '"text"'],
)
def test_malformed_answers_raise(name, text):
    kind, _, _ = CLEAN[name]
    with pytest.raises(AnswerError):
        kind.parse(text, WIDTH, HEIGHT)


@pytest.mark.parametrize(
    "name, answer, unknown, expected",
    [
        ("points", {"points": [{"label": "macrophage", "x": 0.1, "y": 0.1}]}, "macrophage", ["explicit", "implicit"]),
        ("boxes", {"objects": [{"label": "bicycle", "box": [0.1, 0.1, 0.2, 0.2]}]}, "bicycle", ["car", "person"]),
        ("caption", {"entity": "Eiffel Tower", "caption": "A tower."}, "Eiffel Tower", ["Hagia Sophia", "Taj Mahal"]),
        ("multilabel", {"probabilities": {"pneumonia": 0.7}}, "pneumonia", ["effusion", "cardiomegaly", "nodule"]),
    ],
)
def test_unknown_class_raises_naming_it_and_the_expected_ones(name, answer, unknown, expected):
    kind = CLEAN[name][0]
    with pytest.raises(AnswerError) as err:
        kind.parse(json.dumps(answer), WIDTH, HEIGHT)
    message = str(err.value)
    assert unknown in message
    for cls in expected:
        assert cls in message


@pytest.mark.parametrize("said", ["explicit", "EXPLICIT", "clear", "CLEAR", " Obvious ", "oBvIoUs"])
def test_aliases_and_names_map_to_the_canonical_class_case_insensitively(said):
    kind = Points(points_spec())
    label = kind.parse(json.dumps({"points": [{"label": said, "x": 0.5, "y": 0.5}]}), WIDTH, HEIGHT)
    assert label["points"][0]["label"] == "explicit"


def test_aliases_map_for_every_class_kind():
    boxes = Boxes(boxes_spec()).parse(
        '{"objects": [{"label": "SEDAN", "box": [0, 0, 1, 1]}, {"label": "Pedestrian", "box": [0, 0, 0.5, 0.5]}]}',
        WIDTH,
        HEIGHT,
    )
    assert [o["label"] for o in boxes["objects"]] == ["car", "person"]
    caption = Caption(caption_spec()).parse('{"entity": "tadj mahal", "caption": "x"}', WIDTH, HEIGHT)
    assert caption["entity"] == "Taj Mahal"
    probs = Multilabel(multilabel_spec()).parse('{"probabilities": {"ENLARGED HEART": 0.6}}', WIDTH, HEIGHT)
    assert probs["probabilities"]["cardiomegaly"] == 0.6


@pytest.mark.parametrize(
    "name, answer",
    [
        ("points", {"points": [{"label": "explicit", "x": 0.5}]}),
        ("points", {"points": [{"label": "explicit", "y": 0.5}]}),
        ("points", {"points": [{"x": 0.5, "y": 0.5}]}),
        ("points", {"cells": []}),
        ("points", {"points": "none"}),
        ("points", {"points": [[0.5, 0.5]]}),
        ("boxes", {"objects": [{"label": "car"}]}),
        ("boxes", {"objects": [{"box": [0.1, 0.1, 0.2, 0.2]}]}),
        ("boxes", {"objects": [{"label": "car", "box": [0.1, 0.1, 0.2]}]}),
        ("boxes", {"boxes": []}),
        ("boxes", {"objects": [], "qa": [{"question": "Is it red?"}]}),
        ("caption", {"entity": "Taj Mahal"}),
        ("caption", {"caption": "A white mausoleum."}),
        ("caption", {"entity": "Taj Mahal", "caption": "   "}),
        ("multilabel", {"probs": {"effusion": 0.5}}),
        ("multilabel", {"probabilities": [0.5, 0.2, 0.1]}),
        ("regression", {"calories": 100, "proteins": 5, "delta": 0}),
        ("regression", {"values": [100, 5, 0]}),
    ],
)
def test_missing_or_misshapen_fields_raise(name, answer):
    kind = CLEAN[name][0]
    with pytest.raises(AnswerError):
        kind.parse(json.dumps(answer), WIDTH, HEIGHT)


def test_a_bare_list_of_points_is_accepted():
    label = Points(points_spec()).parse('[{"label": "faint", "x": 0.1, "y": 0.2}]', WIDTH, HEIGHT)
    assert label == {"points": [{"label": "implicit", "x": 0.1, "y": 0.2, "score": 1.0}]}


def test_empty_answers_are_valid_labels():
    assert Points(points_spec()).parse('{"points": []}', WIDTH, HEIGHT) == {"points": []}
    assert Boxes(boxes_spec()).parse('{"objects": []}', WIDTH, HEIGHT) == {"objects": [], "qa": []}
    kinds = (Points(points_spec()), Boxes(boxes_spec()), Multilabel(multilabel_spec()), Regression(regression_spec()))
    for kind in kinds:
        assert kind.validate(kind.empty()) == kind.empty()


def test_score_defaults_to_one_reads_confidence_and_is_clipped():
    kind = Points(points_spec())
    answer = {
        "points": [
            {"label": "explicit", "x": 0.1, "y": 0.1},
            {"label": "explicit", "x": 0.2, "y": 0.2, "confidence": 0.3},
            {"label": "explicit", "x": 0.3, "y": 0.3, "score": 1.7},
            {"label": "explicit", "x": 0.4, "y": 0.4, "score": -0.2},
        ]
    }
    scores = [p["score"] for p in kind.parse(json.dumps(answer), WIDTH, HEIGHT)["points"]]
    assert scores == [1.0, 0.3, 1.0, 0.0]
    with pytest.raises(AnswerError, match="score"):
        kind.parse('{"points": [{"label": "explicit", "x": 0.1, "y": 0.1, "score": "high"}]}', WIDTH, HEIGHT)


# ---------------------------------------------------------------- coordinates

# One point and one box, in normalised coordinates, with values that are not round in any convention.
POINT = (0.123456, 0.654321)
BOX = (0.0625, 0.2, 0.71875, 0.93)


def _in_convention(values, coordinates, extents):
    if coordinates == "normalized":
        return list(values)
    if coordinates == "per_mille":
        return [v * 1000 for v in values]
    return [v * e for v, e in zip(values, extents)]


@pytest.mark.parametrize("coordinates", ["normalized", "per_mille", "pixels"])
def test_a_point_parses_to_the_same_normalised_place_in_every_convention(coordinates):
    x, y = _in_convention(POINT, coordinates, (WIDTH, HEIGHT))
    answer = json.dumps({"points": [{"label": "explicit", "x": x, "y": y}]})
    point = Points(points_spec(), coordinates).parse(answer, WIDTH, HEIGHT)["points"][0]
    assert point["x"] == pytest.approx(POINT[0], abs=1e-6)
    assert point["y"] == pytest.approx(POINT[1], abs=1e-6)


@pytest.mark.parametrize("coordinates", ["normalized", "per_mille", "pixels"])
def test_a_box_parses_to_the_same_normalised_box_in_every_convention(coordinates):
    box = _in_convention(BOX, coordinates, (WIDTH, HEIGHT, WIDTH, HEIGHT))
    answer = json.dumps({"objects": [{"label": "car", "box": box}]})
    parsed = Boxes(boxes_spec(), coordinates).parse(answer, WIDTH, HEIGHT)["objects"][0]["box"]
    assert parsed == pytest.approx(list(BOX), abs=1e-6)


def test_pixels_use_width_for_x_and_height_for_y():
    kind = Points(points_spec(), "pixels")
    point = kind.parse('{"points": [{"label": "explicit", "x": 320, "y": 120}]}', WIDTH, HEIGHT)["points"][0]
    assert (point["x"], point["y"]) == pytest.approx((0.5, 0.25))
    answer = '{"objects": [{"label": "car", "box": [64, 48, 320, 240]}]}'
    box = Boxes(boxes_spec(), "pixels").parse(answer, WIDTH, HEIGHT)
    assert box["objects"][0]["box"] == pytest.approx([0.1, 0.1, 0.5, 0.5])


@pytest.mark.parametrize("coordinates", ["normalized", "per_mille", "pixels"])
def test_values_slightly_beyond_the_border_are_clipped(coordinates):
    x, y = _in_convention((1.01, -0.005), coordinates, (WIDTH, HEIGHT))
    answer = json.dumps({"points": [{"label": "explicit", "x": x, "y": y}]})
    point = Points(points_spec(), coordinates).parse(answer, WIDTH, HEIGHT)["points"][0]
    assert (point["x"], point["y"]) == (1.0, 0.0)

    box = _in_convention((-0.01, 0.0, 1.01, 1.015), coordinates, (WIDTH, HEIGHT, WIDTH, HEIGHT))
    answer = json.dumps({"objects": [{"label": "car", "box": box}]})
    assert Boxes(boxes_spec(), coordinates).parse(answer, WIDTH, HEIGHT)["objects"][0]["box"] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "coordinates, far",
    [("normalized", 1.5), ("normalized", -0.3), ("per_mille", 1500), ("pixels", WIDTH * 1.5)],
)
def test_values_far_off_the_image_raise(coordinates, far):
    with pytest.raises(AnswerError, match="off the image"):
        Points(points_spec(), coordinates).parse(
            json.dumps({"points": [{"label": "explicit", "x": far, "y": 0}]}), WIDTH, HEIGHT
        )
    with pytest.raises(AnswerError, match="off the image"):
        Boxes(boxes_spec(), coordinates).parse(
            json.dumps({"objects": [{"label": "car", "box": [0, 0, far, 1]}]}), WIDTH, HEIGHT
        )


def test_per_mille_answers_misread_as_normalised_raise_rather_than_pass():
    """A teacher answering 0-1000 under a `normalized` spec must not be silently accepted."""
    with pytest.raises(AnswerError):
        Points(points_spec(), "normalized").parse(
            '{"points": [{"label": "explicit", "x": 250, "y": 750}]}', WIDTH, HEIGHT
        )


@pytest.mark.parametrize("value", ["left", None, [0.1], "NaN", "Infinity"])
def test_non_numeric_or_non_finite_coordinates_raise(value):
    for coordinates in ("normalized", "pixels"):
        with pytest.raises(AnswerError):
            Points(points_spec(), coordinates).parse(
                json.dumps({"points": [{"label": "explicit", "x": value, "y": 0.5}]}), WIDTH, HEIGHT
            )
    with pytest.raises(AnswerError):
        Boxes(boxes_spec()).parse(json.dumps({"objects": [{"label": "car", "box": [value, 0, 1, 1]}]}), WIDTH, HEIGHT)


def test_json_nan_literal_raises():
    with pytest.raises(AnswerError, match="finite"):
        Points(points_spec()).parse('{"points": [{"label": "explicit", "x": NaN, "y": 0.5}]}', WIDTH, HEIGHT)


@pytest.mark.parametrize(
    "box",
    [[0.5, 0.1, 0.2, 0.4], [0.1, 0.5, 0.2, 0.4], [0.3, 0.3, 0.3, 0.6], [0.1, 0.2, 0.6, 0.2]],
    ids=["x-swapped", "y-swapped", "zero-width", "zero-height"],
)
def test_box_corners_out_of_order_raise(box):
    with pytest.raises(AnswerError, match="out of order"):
        Boxes(boxes_spec()).parse(json.dumps({"objects": [{"label": "car", "box": box}]}), WIDTH, HEIGHT)


def test_unknown_coordinate_convention_is_refused():
    with pytest.raises(ValueError, match="coordinates"):
        Points(points_spec(), "percent")


# ---------------------------------------------------------------- kind-specific rules


def test_multilabel_classes_left_out_are_zero():
    label = Multilabel(multilabel_spec()).parse('{"probabilities": {"nodule": 1}}', WIDTH, HEIGHT)
    assert label == {"probabilities": {"effusion": 0.0, "cardiomegaly": 0.0, "nodule": 1.0}}
    assert list(label["probabilities"]) == ["effusion", "cardiomegaly", "nodule"]


@pytest.mark.parametrize("p", [1.5, -0.5, 85, "likely", None])
def test_multilabel_probability_outside_zero_one_raises(p):
    with pytest.raises(AnswerError, match="probability of effusion"):
        Multilabel(multilabel_spec()).parse(json.dumps({"probabilities": {"effusion": p}}), WIDTH, HEIGHT)


def test_regression_missing_target_raises_naming_it():
    with pytest.raises(AnswerError, match="proteins"):
        Regression(regression_spec()).parse('{"values": {"calories": 500, "delta": 0}}', WIDTH, HEIGHT)


@pytest.mark.parametrize("value", ["a lot", None, "250 kcal", [250], {"kcal": 250}])
def test_regression_non_numeric_raises(value):
    with pytest.raises(AnswerError, match="calories"):
        Regression(regression_spec()).parse(
            json.dumps({"values": {"calories": value, "proteins": 5, "delta": 0}}), WIDTH, HEIGHT
        )


def test_regression_below_min_raises_and_min_is_per_target():
    kind = Regression(regression_spec())
    with pytest.raises(AnswerError, match="calories"):
        kind.parse('{"values": {"calories": -1, "proteins": 5, "delta": 0}}', WIDTH, HEIGHT)
    with pytest.raises(AnswerError, match="delta"):
        kind.parse('{"values": {"calories": 1, "proteins": 5, "delta": -10.5}}', WIDTH, HEIGHT)
    # A target's own minimum, not zero: -10 is allowed for delta, 0 for calories.
    assert kind.parse('{"values": {"calories": 0, "proteins": 5, "delta": -10}}', WIDTH, HEIGHT)["values"] == {
        "calories": 0.0,
        "proteins": 5.0,
        "delta": -10.0,
    }


@pytest.mark.parametrize("value", ["NaN", "inf"])
def test_regression_non_finite_raises(value):
    with pytest.raises(AnswerError, match="calories"):
        Regression(regression_spec()).parse(
            json.dumps({"values": {"calories": value, "proteins": 5, "delta": 0}}), WIDTH, HEIGHT
        )


def test_boxes_without_qa_get_an_empty_list_and_descriptions_default_to_empty():
    label = Boxes(boxes_spec()).parse('{"objects": [{"label": "person", "box": [0.1, 0.1, 0.3, 0.9]}]}', WIDTH, HEIGHT)
    assert label == {
        "objects": [{"label": "person", "box": [0.1, 0.1, 0.3, 0.9], "description": "", "score": 1.0}],
        "qa": [],
    }


# ---------------------------------------------------------------- prompts


def _descriptions(spec) -> list[str]:
    if isinstance(spec, RegressionTask):
        return [t.description for t in spec.targets.values()]
    return [c.description for c in spec.ontology.values()]


@pytest.mark.parametrize("name", list(CLEAN))
def test_prompt_mentions_the_instruction_every_class_description_and_json(name):
    kind = CLEAN[name][0]
    prompt = kind.prompt()
    assert kind.spec.instruction in prompt
    for description in _descriptions(kind.spec):
        assert description in prompt
    names = kind.spec.targets if isinstance(kind.spec, RegressionTask) else kind.spec.ontology
    for cls in names:
        assert cls in prompt
    assert "JSON" in prompt


@pytest.mark.parametrize(
    "coordinates, words",
    [("normalized", "from 0 to 1"), ("per_mille", "from 0 to 1000"), ("pixels", "pixels")],
)
def test_prompt_states_the_coordinate_convention(coordinates, words):
    others = {"normalized": "from 0 to 1,", "per_mille": "from 0 to 1000", "pixels": "pixels"}
    for kind in (Points(points_spec(), coordinates), Boxes(boxes_spec(), coordinates)):
        prompt = kind.prompt()
        assert words in prompt
        for other, other_words in others.items():
            if other != coordinates and other_words != words:
                assert other_words not in prompt, f"{coordinates} prompt also mentions {other}"
    assert "x from the left, y from the top" in Points(points_spec(), coordinates).prompt()
    assert "(x1, y1) top-left" in Boxes(boxes_spec(), coordinates).prompt()


def test_prompt_asks_for_qa_pairs_and_descriptions_only_when_the_spec_does():
    asked = Boxes(boxes_spec(questions_per_image=3, describe_objects=True)).prompt()
    assert "3 question-answer pairs" in asked and '"description"' in asked
    plain = Boxes(boxes_spec(questions_per_image=0, describe_objects=False)).prompt()
    assert "question" not in plain and '"description"' not in plain


def test_caption_prompt_states_the_word_limit_and_regression_prompt_the_units():
    assert "at most 25 words" in Caption(caption_spec(max_words=25)).prompt()
    prompt = Regression(regression_spec()).prompt()
    assert "(kcal)" in prompt and "(g)" in prompt


@pytest.mark.parametrize("name", list(CLEAN))
def test_a_spec_level_prompt_is_used_verbatim(name):
    kind = CLEAN[name][0]
    custom = "  Custom prompt for {name}: answer in JSON, nothing else.\n"
    overridden = type(kind)(kind.spec.model_copy(update={"prompt": custom}))
    assert overridden.prompt() == custom


def test_task_kind_builds_the_kind_named_by_the_spec():
    specs = [points_spec(), boxes_spec(), caption_spec(), multilabel_spec(), regression_spec()]
    kinds = [kind_of(s, "per_mille") for s in specs]
    assert [type(k) for k in kinds] == [Points, Boxes, Caption, Multilabel, Regression]
    assert all(k.coordinates == "per_mille" for k in kinds)
    assert [k.name for k in kinds] == ["points", "boxes", "caption", "multilabel", "regression"]


# ---------------------------------------------------------------- extract_json


def test_extract_json_picks_the_first_object_after_prose():
    text = 'Thinking... the answer is {"a": 1, "b": [1, 2]} and also {"a": 2}.'
    assert extract_json(text) == {"a": 1, "b": [1, 2]}


def test_extract_json_prefers_a_fenced_block_over_json_in_prose():
    text = 'The format is {"label": "<class>"}, so: ```json\n{"points": []}\n``` Done {"other": 1}'
    assert extract_json(text) == {"points": []}


def test_extract_json_skips_text_that_only_looks_like_json():
    assert extract_json('Set {x} and [y] to {"ok": true}') == {"ok": True}
    assert extract_json('[{"label": "a"}]') == [{"label": "a"}]


def test_extract_json_handles_braces_inside_strings():
    assert extract_json('{"caption": "a {weird} caption ] with brackets"}') == {
        "caption": "a {weird} caption ] with brackets"
    }


@pytest.mark.parametrize("text", ["", "  \n ", "no json here", '{"a": 1', "```json\n{oops}\n```", 'just "a string"'])
def test_extract_json_raises_without_a_json_object(text):
    with pytest.raises(AnswerError):
        extract_json(text)


def test_extract_json_rejects_non_text():
    with pytest.raises(AnswerError):
        extract_json(None)  # type: ignore[arg-type]


def test_a_bracketed_range_in_prose_is_not_taken_for_the_answer():
    text = 'Coordinates are fractions in [0, 1]: {"points": [{"label": "explicit", "x": 0.5, "y": 0.5}]}'
    assert Points(points_spec()).parse(text, WIDTH, HEIGHT)["points"][0]["x"] == 0.5
