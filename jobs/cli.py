"""The `raydar` command: a thin layer over the job modules, which a user can also import.

    raydar run --spec datasets/demo_cells.yaml        # the whole pipeline (the main job)
    raydar label --spec datasets/demo_cells.yaml      # one stage
    raydar label --spec datasets/demo_cells.yaml --from-feedback   # what the endpoint collected, to the teacher
    raydar finetune --spec datasets/demo_cells.yaml   # LoRA fine-tune on Ray Train + DeepSpeed
    raydar evaluate --spec datasets/demo_cells.yaml   # every detector on held-out data; report.html
    raydar kb build --spec datasets/demo_cells.yaml   # the knowledge base; also kb search|list|stats
    raydar submit label --spec datasets/demo_cells.yaml   # a stage as a job on a Ray cluster
    raydar status                                     # this project's jobs on the cluster
    raydar teacher serve --ground-truth DIR           # the simulated teacher, for offline work
    raydar demo make --out DIR --n 200                # the synthetic demo images
    raydar spec check datasets/*.yaml                 # validate specs
"""

from __future__ import annotations

import argparse
import importlib
import sys

USAGE = __doc__.split("\n\n", 1)[1]

# command -> "module:function", or a group: {subcommand: "module:function"}. Each function takes the rest
# of the command line and parses it with a parser named after the whole command (`raydar demo make`).
COMMANDS: dict[str, str | dict[str, str]] = {
    "run": "jobs.pipeline:main",
    "label": "jobs.label:main",
    "finetune": "jobs.finetune:main",
    "evaluate": "jobs.evaluate:main",
    "kb": "jobs.index:kb_main",
    "submit": "jobs.submit:main_submit",
    "status": "jobs.submit:main_status",
    "teacher": {"serve": "raydar.teacher.simulated:main"},
    "demo": {"make": "raydar.demo:main"},
    "spec": {"check": "jobs.cli:check_specs"},
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: raydar <command> [options]\n\n" + USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    target = COMMANDS.get(command)
    if isinstance(target, dict):
        group = f"raydar {command} {{{','.join(target)}}} [options]"
        if not rest or rest[0] in ("-h", "--help"):
            lines = [line for line in USAGE.splitlines() if line.strip().startswith(f"raydar {command} ")]
            print(f"usage: {group}\n\n" + "\n".join(lines))
            return 0 if rest else 2
        if rest[0] not in target:
            print(f"raydar {command}: unknown subcommand {rest[0]!r}; usage: {group}", file=sys.stderr)
            return 2
        command, target, rest = f"{command} {rest[0]}", target[rest[0]], rest[1:]
    if target is None:
        print(f"raydar: unknown command {command!r}\n\nusage: raydar <command> [options]\n\n{USAGE}",
              file=sys.stderr)
        return 2
    module, function = target.split(":")
    run = getattr(importlib.import_module(module), function)
    saved, sys.argv[0] = sys.argv[0], f"raydar {command}"  # what argparse shows as the program's name
    try:
        return run(rest) or 0
    finally:
        sys.argv[0] = saved


def check_specs(argv: list[str]) -> int:
    """Validate each spec file; print what is wrong with each bad one."""
    from raydar.sources import image_folder
    from raydar.spec import SpecError, load_spec

    parser = argparse.ArgumentParser(prog="raydar spec check", description="Validate dataset specs (YAML): "
                                     "each is read, checked against the spec's models, and its images found.")
    parser.add_argument("specs", nargs="+", metavar="SPEC.yaml")
    bad = 0
    for path in parser.parse_args(argv).specs:
        try:
            spec = load_spec(path)
            print(f"ok    {path}: {spec.name} ({spec.task.kind}, teacher {spec.teacher.kind}:{spec.teacher.model})")
            if spec.images.uri:
                try:
                    image_folder(spec)
                except SpecError as e:  # a valid spec whose images are not (yet) where it says
                    print(f"note  {e}", file=sys.stderr)
        except SpecError as e:
            bad += 1
            print(f"error {e}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
