"""What Ray Train + DeepSpeed cost over a plain PyTorch + PEFT loop, on the same model and batches.

    .venv/bin/python bench/train_overhead.py --steps 40

Prints, from one run: the steady-state seconds per optimiser step of `jobs.finetune` (one Ray Train
worker, DeepSpeed ZeRO stage --stage, the spec's LoRA) and of a single-process loop over the same
student (`raydar.student.build_student`), the same examples and batch size, with torch's AdamW; their
ratio (target <= 1.10); seconds from submit (calling `finetune`) to the first optimiser step; and the
share of the Ray path's step time spent waiting for the next batch (target < 5%).

Both paths get the same cores and priority: the Ray worker reserves `--cpus` and runs torch on that
many threads, and so does the loop; Ray's workers run at nice 0 here, as the loop does (Ray's default
is 15). The first `--warmup` steps of each are not timed; half of the loop's steps run before the Ray
path and half after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cluster import StorageRoot, connect  # noqa: E402
from jobs.finetune import finetune  # noqa: E402
from jobs.label import label_images  # noqa: E402
from raydar.labels import LabelStore  # noqa: E402
from raydar.models import resolve_base_model  # noqa: E402
from raydar.sft import collate  # noqa: E402
from raydar.spec import load_spec  # noqa: E402
from raydar.student import build_student  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "datasets" / "demo_cells.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stage", type=int, default=2, choices=[0, 2, 3])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="Both paths on the GPU: the Ray worker with one GPU "
                        "(NCCL, DeepSpeed bf16), the loop under bf16 autocast.")
    args = parser.parse_args()

    report_every = 5
    steps = max(args.steps, args.warmup + 2 * report_every)
    spec = load_spec(SPEC, overrides={
        "images.generate.n": args.images, "teacher.simulated.latency_s": 0.0,
        "student.base_model": "raydar-tiny-qwen2-vl", "student.family": "qwen2_vl",
        "student.batch_size": args.batch_size, "student.deepspeed_stage": args.stage, "student.epochs": 100,
        "student.cpus_per_worker": args.cpus, "student.workers": 1, "split.val": 0.05, "student.use_gpu": args.gpu,
        # The student this benchmark has always timed (bench/RESULTS.md): answers in text, LoRA on the
        # language model's attention, the teacher's prompt; not the demo's point-head student.
        "student.point_head": False, "student.augment": False, "student.prompt": None, "student.lora.vision": False,
        "student.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    })
    storage = StorageRoot(tempfile.mkdtemp(prefix="raydar-bench-train-"))
    # Ray starts its workers at nice 15; the loop runs at nice 0. On a machine with anything else running,
    # that alone would slow the Ray path, so both run at the same priority here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    connect(num_cpus=args.cpus)
    labelled = label_images(spec, storage, progress=False)
    print(f"{labelled.ok_total} labelled demo images; {steps} steps of batch {args.batch_size}, ZeRO-{args.stage}, "
          f"{args.cpus} cores", flush=True)

    # The plain loop: one process, the same student, examples and batch size. Half of its steps run
    # before the Ray path and half after, so that a change in the machine's load hits both alike.
    torch.set_num_threads(args.cpus)
    torch.manual_seed(0)
    student, builder, processor = build_student(spec, str(resolve_base_model(spec.student.base_model,
                                                                             spec.student.family)))
    device = "cuda" if args.gpu else "cpu"
    student.to(device)
    rows = LabelStore(storage.child(spec.name, "labels")).read_labels()
    rows = rows.filter(pc.equal(rows["split"], "train"))
    pairs = []
    for uri, label in zip(rows["source_uri"].to_pylist(), rows["label"].to_pylist()):
        with open(uri, "rb") as f:
            pairs.append((f.read(), json.loads(label)))
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=spec.student.learning_rate)
    student.train()
    times: list[float] = []

    def plain_steps(first: int, count: int) -> None:
        for i in range(first, first + count):
            chunk = [pairs[(i * args.batch_size + j) % len(pairs)] for j in range(args.batch_size)]
            tick = time.perf_counter()
            examples = [builder.example(Image.open(io.BytesIO(data)).convert("RGB"), label) for data, label in chunk]
            batch = {k: v.to(device) for k, v in collate(examples, processor.tokenizer.pad_token_id).items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.gpu):
                loss = student(batch, [label for _, label in chunk])
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            loss.item()  # the step is done when its loss is on the host, as in the Ray loop
            times.append(time.perf_counter() - tick)

    plain_steps(0, steps // 2)

    # Ray Train + DeepSpeed: steady state from the reported step times after the first report.
    submitted = time.time()
    result = finetune(spec, storage, run_name="bench", max_steps=steps, report_every=report_every)
    reports = [m for m in result.history if m.get("step_s") is not None]
    steady_reports = [m for m in reports if m["step"] > max(args.warmup, report_every)]
    ray_step = statistics.median(m["step_s"] for m in steady_reports)
    first_step = reports[0]["first_step_at"] - submitted
    wait_median = statistics.median(m["data_wait_share"] for m in steady_reports)
    wait_overall = sum(m["data_wait_share"] * m["step_s"] for m in steady_reports) / sum(
        m["step_s"] for m in steady_reports)

    plain_steps(steps // 2, steps - steps // 2)
    timed = times[args.warmup:steps // 2] + times[steps // 2 + args.warmup:]
    plain_step = statistics.median(timed)
    steady = steady_reports
    print("\n  Ray path per report (step: ms/step, data wait %): " + ", ".join(
        f"{m['step']}: {1000 * m['step_s']:.0f}, {100 * m['data_wait_share']:.0f}%" for m in reports))
    print()
    where = "GPU" if args.gpu else f"{args.cpus} cores"
    print(f"  Ray Train + DeepSpeed ZeRO-{args.stage}, 1 worker ({where})  {ray_step * 1000:8.1f} ms/step (median of "
          f"{len(steady)} reports of {report_every} steps)")
    print(f"  plain PyTorch + PEFT loop, same batches   {plain_step * 1000:8.1f} ms/step (median of "
          f"{len(timed)} steps, half before and half after)")
    print(f"  ratio                                     {ray_step / plain_step:8.2f}x (target <= 1.10)")
    print(f"  submit to first step                      {first_step:8.1f} s")
    print(f"  waiting for data, share of step time      {100 * wait_median:8.1f} % median of the reports, "
          f"{100 * wait_overall:.1f} % overall with epoch starts (target < 5%)")


if __name__ == "__main__":
    main()
