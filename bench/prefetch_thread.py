"""What the fine-tuning worker's prefetch thread costs the training thread, by how it unpacks batches.

    .venv/bin/python bench/prefetch_thread.py

The Ray Train worker trains on one thread and unpacks and pads the next batches on another
(`jobs.finetune.prefetch_in_thread`). This bench times the same training steps (the bench student of
`train_overhead.py`, batch 8, torch on --cpus threads) on a thread of their own while a second, live
thread has unpacked and padded batches:

  alone   no second thread;
  torch   the way the worker did it before: torch.load of each example, torch's cat and pad;
  numpy   the way it does now: `raydar.sft.unpack_example` and `collate`, which run no torch op.

The three run in turn, --rounds times, so a change in the machine's load hits each alike; the medians
and their ratios to `alone` are printed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from raydar.demo import make_demo_cells  # noqa: E402
from raydar.models import resolve_base_model  # noqa: E402
from raydar.sft import collate, pack_example, unpack_example  # noqa: E402
from raydar.sources import read_ground_truth  # noqa: E402
from raydar.spec import load_spec  # noqa: E402
from raydar.student import build_student  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "datasets" / "demo_cells.yaml"


def torch_unpack(packed: list[bytes], pad_token_id: int) -> None:
    """The worker's unpacking before: examples saved by torch.save, padded with torch."""
    examples = []
    for data in packed:
        arrays = unpack_example(data)
        buffer = io.BytesIO()
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, buffer)
        examples.append(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    longest = max(e["input_ids"].shape[1] for e in examples)
    torch.cat([torch.nn.functional.pad(e["input_ids"], (0, longest - e["input_ids"].shape[1])) for e in examples])
    torch.cat([e["pixel_values"] for e in examples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="Timed steps per round and way (after 3 untimed).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="torch threads of the training thread.")
    args = parser.parse_args()

    spec = load_spec(SPEC, overrides={
        "student.base_model": "raydar-tiny-qwen2-vl", "student.family": "qwen2_vl", "student.batch_size": 8,
        "student.point_head": False, "student.augment": False, "student.prompt": None, "student.lora.vision": False,
        "student.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    })
    folder = make_demo_cells(Path(tempfile.mkdtemp(prefix="raydar-bench-prefetch-")) / "cells", n=32, size=224)
    records = read_ground_truth(folder)
    def setup() -> tuple:
        """On a thread that then ends: its OpenMP team ends with it, and no other thread has one."""
        torch.set_num_threads(args.cpus)
        torch.manual_seed(0)
        student, builder, processor = build_student(spec, str(resolve_base_model(spec.student.base_model,
                                                                                 spec.student.family)))
        pad = processor.tokenizer.pad_token_id
        packed = [pack_example(builder.example(Image.open(folder / r["file"]).convert("RGB"), r["label"]))
                  for r in records]
        batches = [(collate([unpack_example(p) for p in packed[i:i + 8]], pad), [r["label"] for r in records[i:i + 8]])
                   for i in range(0, len(packed), 8)]
        optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
        return student, pad, packed, batches, optimiser

    made: dict = {}
    maker = threading.Thread(target=lambda: made.update(parts=setup()))
    maker.start()
    maker.join()
    student, pad, packed, batches, optimiser = made["parts"]
    student.train()

    def steps() -> list[float]:
        torch.set_num_threads(args.cpus)
        times = []
        for i in range(args.steps + 3):
            batch, labels = batches[i % len(batches)]
            tick = time.perf_counter()
            loss = student(batch, labels)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            loss.item()
            times.append(time.perf_counter() - tick)
        return times[3:]

    def on_a_thread(way: str) -> list[float]:
        """The steps on a fresh thread, beside a live second thread that unpacked batches `way`."""
        done, ready = threading.Event(), threading.Event()

        def prefetch() -> None:
            for i in range(0, len(packed), 8):
                if way == "torch":
                    torch_unpack(packed[i:i + 8], pad)
                else:
                    collate([unpack_example(p) for p in packed[i:i + 8]], pad)
            ready.set()
            done.wait()  # alive, as the worker's prefetch thread is for a whole pass

        if way != "alone":
            threading.Thread(target=prefetch, daemon=True).start()
            ready.wait()
        out: dict = {}
        trainer = threading.Thread(target=lambda: out.update(times=steps()))
        trainer.start()
        trainer.join()
        done.set()
        return out["times"]

    ways = ("alone", "torch", "numpy")
    times: dict[str, list[float]] = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in ways:
            times[way] += on_a_thread(way)
        print(f"round {round_ + 1}: " + ", ".join(
            f"{way} {1000 * statistics.median(times[way]):.1f} ms" for way in ways), flush=True)
    alone = statistics.median(times["alone"])
    print(f"\n  training step on its own thread, {args.cpus} torch threads, batch 8 (median of "
          f"{args.rounds * args.steps} steps each)")
    for way, what in (("alone", "no second thread"), ("torch", "beside a thread that unpacked with torch (before)"),
                      ("numpy", "beside a thread that unpacked with numpy (now)")):
        step = statistics.median(times[way])
        print(f"  {what:52s} {1000 * step:7.1f} ms   {step / alone:.2f}x")


if __name__ == "__main__":
    main()
