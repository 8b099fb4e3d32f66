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

import sys

USAGE = __doc__.split("\n\n", 1)[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: raydar <command> [options]\n\n" + USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        from jobs.pipeline import main as run
    elif command == "label":
        from jobs.label import main as run
    elif command == "finetune":
        from jobs.finetune import main as run
    elif command == "evaluate":
        from jobs.evaluate import main as run
    elif command == "submit":
        from jobs.submit import main_submit as run
    elif command == "status":
        from jobs.submit import main_status as run
    elif command == "kb":
        from jobs.index import kb_main as run
    elif command == "teacher" and rest[:1] == ["serve"]:
        from raydar.teacher.simulated import main as run

        rest = rest[1:]
    elif command == "demo" and rest[:1] == ["make"]:
        from raydar.demo import main as run

        rest = rest[1:]
    elif command == "spec" and rest[:1] == ["check"]:
        run, rest = check_specs, rest[1:]
    else:
        print(f"raydar: unknown command {' '.join(argv[:2])!r}\n\nusage: raydar <command> [options]\n\n{USAGE}",
              file=sys.stderr)
        return 2
    return run(rest) or 0


def check_specs(paths: list[str]) -> int:
    """Validate each spec file; print what is wrong with each bad one."""
    from raydar.spec import SpecError, load_spec

    if not paths:
        print("usage: raydar spec check SPEC.yaml [...]", file=sys.stderr)
        return 2
    bad = 0
    for path in paths:
        try:
            spec = load_spec(path)
            print(f"ok    {path}: {spec.name} ({spec.task.kind}, teacher {spec.teacher.kind}:{spec.teacher.model})")
        except SpecError as e:
            bad += 1
            print(f"error {e}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
