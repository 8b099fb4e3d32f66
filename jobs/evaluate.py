"""Evaluate every detector on the held-out split against ground truth, and write the report.

    raydar evaluate --spec datasets/demo_cells.yaml
    ray job submit --working-dir . -- python -m jobs.evaluate --spec datasets/demo_cells.yaml

Members: the untuned base student, the fine-tuned student (the run's best checkpoint), the RAG
detector (knowledge base + the teacher's VLM endpoint), their ensemble (fused as in serving, with
the spec's weights) and the teacher's own labels. Ground truth is `ground_truth.jsonl` beside the
images (the demo writes one; any dataset may: one JSON object per line with `image_id` or `file`,
and `label` in the task's schema). Without it the teacher's labels are the reference, the teacher
is not scored, and the report says so.

The two students run as Ray tasks side by side; the RAG detector's requests go out concurrently.
Outputs under `<storage>/<dataset>/report/`: report.html, metrics.json, PNGs (raydar.report).
The scoring itself is `raydar.evaluation.evaluate`, which the finetune job also calls.
"""

from __future__ import annotations

import sys

from cluster import StorageRoot, connect
from jobs.arguments import job_parser, spec_from_args
from raydar.evaluation import MEMBERS, evaluate
from raydar.spec import SpecError



def main(argv: list[str] | None = None) -> int:
    parser = job_parser("raydar evaluate", __doc__)
    parser.add_argument("--checkpoint", default=None,
                        help="Fine-tuned checkpoint or run folder (default: the spec's finetune run under storage).")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    parser.add_argument("--members", default=",".join(MEMBERS), help=f"Comma-separated subset of {','.join(MEMBERS)}.")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    storage = StorageRoot(args.storage)
    connect(args.address)
    try:
        result = evaluate(spec, storage, checkpoint=args.checkpoint, split=args.split,
                          members=[m.strip() for m in args.members.split(",") if m.strip()],
                          progress=not args.quiet)
    except (SpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
