"""The `raydar` command as users type it: exit codes and the messages they read."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def raydar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_spec_check_passes_every_shipped_spec_and_names_what_is_wrong_with_a_bad_one(tmp_path):
    good = raydar("spec", "check", *sorted(str(p) for p in (REPO / "datasets").glob("*.yaml")))
    assert good.returncode == 0 and good.stdout.count("ok ") == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "datasets" / "demo_cells.yaml").read_text().replace("kind: points", "kind: pointz"))
    result = raydar("spec", "check", str(bad))
    assert result.returncode == 1
    assert f"{bad}: invalid dataset spec" in result.stderr and "task.kind: unknown task kind" in result.stderr


def test_label_with_an_invalid_override_exits_2_before_starting_ray():
    result = raydar("label", "--spec", "datasets/demo_cells.yaml", "--set", "teacher.concurrency=many")
    assert result.returncode == 2
    assert "teacher.concurrency:" in result.stderr and "'many'" in result.stderr
    assert "Started a local Ray" not in result.stderr


def test_unknown_command_and_help():
    assert raydar("frobnicate").returncode == 2
    shown = raydar("--help")
    assert shown.returncode == 0 and "raydar label --spec" in shown.stdout and "raydar teacher serve" in shown.stdout


def test_every_command_group_and_subcommand_answers_help_with_its_own_usage():
    from jobs.cli import COMMANDS

    commands = [[name] for name in COMMANDS]
    commands += [[name, sub] for name, target in COMMANDS.items() if isinstance(target, dict) for sub in target]
    for words in commands:
        shown = raydar(*words, "--help")
        assert shown.returncode == 0, (words, shown.stderr)
        assert f"usage: raydar {' '.join(words)}" in shown.stdout, (words, shown.stdout)
    assert raydar("teacher", "frobnicate").returncode == 2


def test_a_missing_images_folder_is_one_line_naming_the_spec_the_field_and_the_path(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text((REPO / "datasets" / "demo_cells.yaml").read_text().replace(
        "  generate: {kind: demo_cells, n: 200, size: 224, seed: 0}", "  uri: ./no-such-images"))
    missing = tmp_path / "no-such-images"
    for command in (["label"], ["run"]):
        result = raydar(*command, "--spec", str(spec))
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (f"error: {spec}: images.uri: {missing}: no such folder; put the images "
                                         "there or point images.uri at them")
    checked = raydar("spec", "check", str(spec))
    assert checked.returncode == 0 and f"note  {spec}: images.uri: {missing}: no such folder" in checked.stderr
