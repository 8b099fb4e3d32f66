"""Fine-tune a student on the labelled images: Ray Train workers running DeepSpeed over a PEFT LoRA model.

    raydar finetune --spec datasets/demo_cells.yaml
    ray job submit --working-dir . -- python -m jobs.finetune --spec datasets/demo_cells.yaml

The driver checks everything a worker would trip over (the base model, the quantisation against the
ZeRO stage, the labelled rows) before any worker starts. Each worker builds the student
(raydar.student: the base model, optionally 4-bit NF4 or 8-bit through bitsandbytes, LoRA on the
language model, the vision tower frozen unless `student.lora.vision`, the task's head for multilabel
and regression specs and the point head for points specs with `student.point_head`, trained on its
own loss: the examples then carry no answer text), and trains under DeepSpeed ZeRO 0, 2 or 3
(configs in cluster/deepspeed/) on its shard of a Ray Data stream: the images are read once into the
object store, and each epoch Ray tasks decode, augment and run the processor ahead of the loop,
which only pads. Loss on the answer tokens only (raydar.sft); warm-up then cosine decay. Every few
steps it reports loss, learning rate, step time, throughput, data wait and memory (also to
TensorBoard when installed); every epoch validation loss and a checkpoint (raydar.checkpoint:
adapter, head, processor, spec, metrics, history); the best and the last are kept, with DeepSpeed's
checkpoint of the optimiser's state (each rank's partition). A worker that dies is replaced and the
run resumes from its last checkpoint, optimiser included; so does a run started again with the same
`--run-name`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

import raydar.checkpoint
from cluster import StorageRoot, connect
from cluster.connect import embedded
from jobs.arguments import job_parser, spec_from_args
from raydar.checkpoint import (TRAIN_DIR, best_checkpoint, load_trainable, load_training_state, run_history,
                               save_checkpoint, save_training_state, saved_history, saved_metrics, saved_trainable,
                               trainable_state)
from raydar.kinds import kind_of
from raydar.labels import LabelStore
from raydar.models import resolve_base_model
from raydar.sources import resolve_source, with_file_bytes
from raydar.spec import DatasetSpec, SpecError, StudentSpec
from raydar.student import build_student, evaluation_mode

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "cluster" / "deepspeed"


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("raydar finetune", __doc__)
    parser.add_argument("--run-name", default=None, help="Name of the run; the same name resumes it.")
    parser.add_argument("--max-steps", type=int, default=None, help="Stop after this many optimiser steps.")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                        help="Skip scoring the base and the tuned student on the held-out split afterwards.")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    storage = StorageRoot(args.storage)
    connect(args.address)
    try:
        result = finetune(spec, storage, run_name=args.run_name, max_steps=args.max_steps)
    except (SpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary(), flush=True)
    if args.evaluate and (result.best_checkpoint or result.checkpoint):
        from raydar.evaluation import evaluate

        scored = evaluate(spec, storage, checkpoint=result.best_checkpoint or result.checkpoint,
                          members=["base", "finetuned"], report=False, progress=not args.quiet)
        print("before and after: " + scored.summary())
    return 0


# ---------------------------------------------------------------- the run


@dataclass
class FinetuneResult:
    run_name: str
    checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        m = self.metrics
        return (
            f"{self.run_name}: {m.get('step', 0)} steps, {m.get('epoch', 0) + 1} epochs; train loss "
            f"{m.get('first_loss', float('nan')):.3f} -> {m.get('loss', float('nan')):.3f}, val loss "
            f"{m.get('val_loss', float('nan')):.3f} -> checkpoint {self.best_checkpoint or self.checkpoint}"
        )


def finetune(
    spec: DatasetSpec,
    storage: StorageRoot,
    *,
    run_name: str | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
    report_every: int = 5,
    placement_strategy: str = "PACK",
) -> FinetuneResult:
    """Train the spec's student on its labelled rows. Ray must be up. `on_step(step, rank)` is called on
    every worker after each optimiser step (a picklable callable: tests watch or stop the run with it).
    `placement_strategy` places the workers: PACK (fewest nodes), SPREAD, or STRICT_SPREAD (one worker
    per node)."""
    student = spec.student
    check_student(spec)
    check_resources(spec, placement_strategy)
    model_path = resolve_base_model(student.base_model, student.family)
    root = storage.child(spec.name)
    rows = LabelStore(root.child("labels")).read_labels()
    train_rows = rows.filter(pc.equal(rows["split"], "train"))
    val_rows = rows.filter(pc.equal(rows["split"], "val"))
    if train_rows.num_rows == 0:
        raise SpecError(
            f"{root.uri_of('labels', 'labels.parquet')}: no labelled training rows; run `raydar label --spec "
            f"{spec.source_file}` first"
        )
    source = resolve_source(spec, root)
    run_name = run_name or raydar.checkpoint.run_name(spec)
    # What the head learns from the training labels up front (e.g. per-class weights of its loss).
    head_buffers = kind_of(spec.task).head_buffers([json.loads(x) for x in train_rows["label"].to_pylist()])
    config = {
        "spec": spec.model_dump(mode="json"),
        "source_file": spec.source_file,
        "model_path": str(model_path),
        "max_steps": max_steps,
        "on_step": on_step,
        "report_every": report_every,
        "head_buffers": head_buffers,
        "total_steps": total_steps(train_rows.num_rows, student, max_steps),
        "steps_per_epoch": steps_per_epoch(train_rows.num_rows, student),
        "log_dir": _tensorboard_dir(root, run_name),
    }
    trainer = TorchTrainer(
        train_student,
        train_loop_config=config,
        torch_config=TorchConfig(timeout_s=student.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=student.workers, use_gpu=student.use_gpu,
                                     resources_per_worker={"CPU": student.cpus_per_worker},
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=root.join(TRAIN_DIR),
            storage_filesystem=root.fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=2),
        ),
        datasets={"train": example_rows(train_rows, source, spec, str(model_path), augment=student.augment),
                  "val": example_rows(val_rows, source, spec, str(model_path), augment=False)},
    )
    # The dashboard's Train view shows a run only when its driver tracks state (read when fit() starts);
    # without a dashboard the tracker only logs that it cannot reach one.
    from cluster.connect import dashboard_url

    if dashboard_url():
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    result = trainer.fit()
    best = best_checkpoint([(c.path, metrics) for c, metrics in result.best_checkpoints or []])
    last = root.uri_for(result.checkpoint.path) if result.checkpoint else None
    if best or last:
        raydar.checkpoint.write_latest(storage, spec, root.uri_for(best) if best else last)
    return FinetuneResult(
        run_name=run_name,
        checkpoint=last,
        best_checkpoint=root.uri_for(best) if best else None,
        metrics=result.metrics or {},
        history=run_history(last) if last else [],
    )


# ---------------------------------------------------------------- examples (Ray Data)


def example_rows(rows: pa.Table, source: str, spec: DatasetSpec, model_path: str, *, augment: bool) -> ray.data.Dataset:
    """Ray Data rows of ready model inputs: the image bytes are read once and kept in the object store,
    then every pass (epoch) decodes, augments and runs the model's processor on Ray tasks ahead of
    the training loop, which only pads them into batches. Without augmentation, examples that fit in a
    quarter of the object store are made once."""
    images = ray.data.from_arrow(rows.select(["image_id", "source_uri", "label"])).map_batches(
        with_file_bytes, fn_kwargs={"source": source}, batch_format="pyarrow", batch_size=16,
        # Reading bytes is I/O: no CPU reserved, or it would wait forever behind workers holding every core.
        # A task on a worker Ray already has, not an actor: an actor is a new process, and one running a class of
        # this module would import torch and Ray Train first, for train and again for val.
        compute=ray.data.TaskPoolStrategy(size=1), num_cpus=0,
    ).materialize()
    spec_json = spec.model_dump_json()
    examples = images.map_batches(
        _make_examples, fn_kwargs={"spec_json": spec_json, "model_path": model_path, "augment": augment},
        batch_format="pyarrow", batch_size=spec.student.batch_size, num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=1),
    )
    example_bytes = spec.student.max_pixels * _EXAMPLE_BYTES_PER_PIXEL  # at most, for a full-size image
    # Blocks of a batch or two, out of the task as they are made (the target is half a batch of full-size
    # images): with the default 128 MiB a map task emits its whole input's examples at once, and each
    # pass's first batch waits for most of the pass.
    examples.context.target_max_block_size = max(2**20, spec.student.batch_size * example_bytes // 2)
    if not augment and rows.num_rows * example_bytes < ray.cluster_resources().get("object_store_memory", 0) / 4:
        # The same examples every pass: made once here, and each pass only streams them from the object
        # store (no processor work competing with training, and a faster start of each pass).
        return examples.materialize()
    return examples


# A Qwen example's pixel values: 3 x 2 x 14 x 14 float32 per 14x14-pixel patch.
_EXAMPLE_BYTES_PER_PIXEL = 24


_BUILDERS: dict[str, tuple] = {}  # per Ray worker process: the example builder of each (spec, model)


def _make_examples(batch: pa.Table, spec_json: str, model_path: str, augment: bool) -> pa.Table:
    """Decode, (augment,) and turn each row into the student's tensors, serialised for the trainer."""
    from PIL import Image, ImageOps

    from raydar.sft import augmented, pack_example

    key = spec_json + model_path
    if key not in _BUILDERS:
        from raydar.models import load_processor
        from raydar.sft import SFTExamples

        spec = DatasetSpec.model_validate_json(spec_json)
        builder = SFTExamples.for_student(spec, load_processor(model_path, spec.student.max_pixels))
        _BUILDERS[key] = (builder, np.random.default_rng(), spec.student.point_head)
    builder, rng, point_head = _BUILDERS[key]
    examples, labels = [], []
    for data, text in zip(batch["image"].to_pylist(), batch["label"].to_pylist()):
        # Upright as the teacher saw it (labels refer to the EXIF-rotated image).
        image, label = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), json.loads(text)
        if augment:
            image, label = augmented(image, label, builder.kind, rng)
        # A point head answers for the student: it learns from the label itself, with no answer text.
        examples.append(pack_example(builder.example(image, None if point_head else label)))
        labels.append(json.dumps(label))
    return pa.table({"example": pa.array(examples, pa.binary()), "label": labels})


# ---------------------------------------------------------------- on each worker


def train_student(config: dict) -> None:
    """The training loop of one Ray Train worker."""
    import deepspeed

    from raydar.sft import collate, unpack_example

    spec = DatasetSpec.model_validate({**config["spec"], "source_file": config["source_file"]})
    s = spec.student
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(s.cpus_per_worker)  # the cores this worker reserved, no more, no fewer
    torch.manual_seed(0)
    student, _, processor = build_student(spec, config["model_path"], config["head_buffers"])

    ds_config = deepspeed_config(s, config["total_steps"])

    step, start_epoch, first_loss = 0, 0, None
    history: list[dict] = []  # every report, saved with each checkpoint: the report's loss curves
    resumed: dict = {}  # in this attempt's epoch reports when it went on from a checkpoint
    checkpoint = ray.train.get_checkpoint()
    # The checkpoint's folder (downloaded once, from remote storage) is read before and after DeepSpeed wraps the model.
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
        if folder:
            meta = saved_metrics(Path(folder))
            history = saved_history(Path(folder))
            # Into the model before DeepSpeed wraps it: ZeRO's optimiser copies the weights it starts from (its
            # fp32 master copy), and its first step would write that copy back over weights loaded afterwards.
            load_trainable(student, saved_trainable(Path(folder)))
        engine, _, _, scheduler = deepspeed.initialize(
            model=student, model_parameters=[p for p in student.parameters() if p.requires_grad], config=ds_config,
            dist_init_required=False,
        )
        whole = bool(folder) and load_training_state(engine, Path(folder), world)
    if checkpoint:
        step, start_epoch, first_loss = meta["step"], meta["epoch"] + 1, meta.get("first_loss")
        resumed = {"resumed_from_step": step, "optimizer_restored": whole}
        if not whole:  # the weights alone (loaded above): AdamW's moments start again from zero
            for _ in range(step):
                scheduler.step()  # the learning rate goes on from where the checkpoint left it
    board = _summary_writer(config["log_dir"]) if rank == 0 else None
    first_step_at = None  # wall-clock time of this attempt's first optimiser step (submit-to-first-step)

    shards = {split: ray.train.get_dataset_shard(split) for split in ("train", "val")}

    def batches(split: str):
        """Padded batches of this worker's shard (the examples were made on Ray Data) and their labels."""
        for rows in shards[split].iter_batches(batch_size=s.batch_size, batch_format="pyarrow", prefetch_batches=4):
            examples = [unpack_example(b) for b in rows["example"].to_pylist()]
            batch = collate(examples, processor.tokenizer.pad_token_id)
            yield {k: v.to(engine.device) for k, v in batch.items()}, [json.loads(x) for x in rows["label"].to_pylist()]

    upcoming = prefetch_in_thread(batches("train")) if start_epoch < s.epochs else None
    reported_at = time.monotonic()
    for epoch in range(start_epoch, s.epochs):
        engine.train()
        window: list[float] = []
        images = tokens = done = 0  # in the current reporting window
        waited, tick = 0.0, time.perf_counter()
        stream, upcoming = upcoming, None
        epoch_start = step
        while True:
            asked = time.perf_counter()
            batch, labels = next(stream, (None, None))
            waited += time.perf_counter() - asked
            if batch is None:
                break
            loss = engine(batch, labels)
            engine.backward(loss)
            engine.step()
            step += 1
            done += 1
            first_step_at = first_step_at or time.time()
            window.append(loss.item())
            first_loss = first_loss if first_loss is not None else window[-1]
            images += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
            if config["on_step"] is not None:
                config["on_step"](step, rank)
            if step % config["report_every"] == 0:
                elapsed = time.perf_counter() - tick
                metrics = {"step": step, "epoch": epoch, "loss": sum(window[-done:]) / done,
                           "learning_rate": scheduler.get_last_lr()[0], "step_s": elapsed / done,
                           "images_per_s": images * world / elapsed, "tokens_per_s": tokens * world / elapsed,
                           "data_wait_share": waited / elapsed, "peak_memory_mb": _peak_memory_mb(),
                           "first_step_at": first_step_at}
                _log(board, metrics)
                history.append(metrics)
                images = tokens = done = 0
                waited, tick = 0.0, time.perf_counter()  # a report's own time counts in the next window
                steps_left = config["steps_per_epoch"] - (step - epoch_start)
                if _agreed(time.monotonic() - reported_at >= REPORT_INTERVAL_S
                           and steps_left * metrics["step_s"] >= REPORT_INTERVAL_S, rank, world):
                    ray.train.report(metrics)
                    reported_at = time.monotonic()
            if config["max_steps"] and step >= config["max_steps"]:
                break
        if epoch + 1 < s.epochs and not (config["max_steps"] and step >= config["max_steps"]):
            # Ray Data starts the next pass during validation and the checkpoint.
            upcoming = prefetch_in_thread(batches("train"))
        evaluation_mode(engine)
        val_losses = []
        with torch.no_grad():
            for batch, labels in batches("val"):
                val_losses.append(float(engine(batch, labels)))
        metrics = {
            "step": step, "epoch": epoch, "loss": sum(window) / max(1, len(window)), "first_loss": first_loss,
            "val_loss": sum(val_losses) / len(val_losses) if val_losses else float("nan"),
            "learning_rate": scheduler.get_last_lr()[0], "peak_memory_mb": _peak_memory_mb(), **resumed,
        }
        _log(board, metrics)
        history.append(metrics)
        state = trainable_state(engine)  # every rank: ZeRO-3 gathers the partitioned weights collectively
        with tempfile.TemporaryDirectory() as folder:
            save_training_state(engine, Path(folder), world)  # every rank: its part of the optimiser's state
            if rank == 0:
                save_checkpoint(Path(folder), engine.module, processor, spec, state, metrics, history)
            # Ray Train puts every rank's files in the one checkpoint folder.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        reported_at = time.monotonic()
        if config["max_steps"] and step >= config["max_steps"]:
            break
    if board is not None:
        board.close()


# Ray Train's controller takes one report from each worker per health check (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
# 2 s) and a worker's queue holds one: a worker reporting more often waits in ray.train.report. The per-step
# metrics go to the history and TensorBoard every `report_every` steps, and to Ray Train at most this often
# (and not when the epoch's checkpoint report would follow within it).
REPORT_INTERVAL_S = 2.0


# ---------------------------------------------------------------- the driver's checks and sizes


def check_student(spec: DatasetSpec) -> None:
    """What would fail on a worker fails here, before any worker starts."""
    s = spec.student
    where = spec.source_file or spec.name
    if s.quantisation != "none" and s.deepspeed_stage == 3:
        raise SpecError(
            f"{where}: student.deepspeed_stage: ZeRO-3 partitions weights, which bitsandbytes' {s.quantisation} "
            "weights cannot be; use deepspeed_stage 0 or 2 with quantisation"
        )
    if s.quantisation != "none" and s.workers > 1 and not s.use_gpu:
        raise SpecError(f"{where}: student.quantisation: {s.quantisation} training on the CPU runs one worker only")


def check_resources(spec: DatasetSpec, placement_strategy: str = "PACK") -> None:
    """Workers the cluster cannot hold all at once: on the embedded Ray, which no autoscaler grows, an
    error before anything starts (Ray Train would wait for them forever); on a joined cluster a warning
    that the workers wait until nodes that can hold them join."""
    s = spec.student
    need = {"CPU": float(s.cpus_per_worker), **({"GPU": 1.0} if s.use_gpu else {})}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    per_node = [int(min(have.get(name, 0.0) // amount for name, amount in need.items())) for have in nodes]
    held = sum(min(n, 1) for n in per_node) if placement_strategy == "STRICT_SPREAD" else sum(per_node)
    if held >= s.workers:
        return
    what = f"{_count(s.workers, 'worker')}, each with {_count(s.cpus_per_worker, 'CPU')}"
    what += " and a GPU (student.use_gpu)" if s.use_gpu else ""
    what += ", one per node" if placement_strategy == "STRICT_SPREAD" else ""
    nodes_have = "; ".join(f"{_count(have.get('CPU', 0), 'CPU')}, {_count(have.get('GPU', 0), 'GPU')}"
                           for have in nodes)
    message = (f"{spec.source_file or spec.name}: student: {what}; this cluster holds {held} "
               f"(its nodes have {nodes_have})")
    if embedded():
        fixes = ["lower student.workers or student.cpus_per_worker"] + (
            ["set student.use_gpu: false"] if s.use_gpu else [])
        raise SpecError(f"{message}; {' or '.join(fixes)}, or run on a cluster that can hold them")
    print(f"warning: {message}; the workers wait until nodes that can hold them join", file=sys.stderr, flush=True)


def _count(n: float, what: str) -> str:
    return f"{n:g} {what}" + ("" if n == 1 else "s")


def steps_per_epoch(rows: int, student) -> int:
    """Optimiser steps of one epoch on each worker."""
    return -(-rows // (student.batch_size * student.workers))


def total_steps(rows: int, student, max_steps: int | None) -> int:
    """Optimiser steps of the whole run (the learning-rate schedule's length)."""
    per_epoch = steps_per_epoch(rows, student)
    return min(per_epoch * student.epochs, max_steps or per_epoch * student.epochs)


def _tensorboard_dir(root: StorageRoot, run_name: str) -> str | None:
    """TensorBoard events beside the run on a local root (`tensorboard --logdir` on it); none on a bucket."""
    try:
        return str(root.local_path(TRAIN_DIR, run_name, "tensorboard"))
    except ValueError:
        return None


# ---------------------------------------------------------------- the worker's parts


def deepspeed_config(student: StudentSpec, total_steps: int) -> dict:
    """DeepSpeed's config for `student`: the ZeRO stage's file from cluster/deepspeed/,
    the batch, AdamW and the warm-up + cosine schedule over `total_steps`."""
    ds_config = json.loads((DEEPSPEED_CONFIGS / f"zero{student.deepspeed_stage}.json").read_text())
    ds_config.update(
        train_micro_batch_size_per_gpu=student.batch_size,
        gradient_accumulation_steps=1,
        optimizer={"type": "AdamW", "params": {"lr": student.learning_rate, "weight_decay": 0.0}},
        bf16={"enabled": bool(student.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())},
    )
    if student.cpu_offload and student.deepspeed_stage in (2, 3):
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    # torch's AdamW, not DeepSpeed's fused ones: those compile C++/CUDA at first use (minutes, and a compiler
    # on every worker), and LoRA's few parameters gain nothing from fusing.
    ds_config["optimizer"]["params"]["torch_adam"] = True
    ds_config["scheduler"] = {"type": "WarmupCosineLR", "params": {
        "total_num_steps": max(total_steps, student.warmup_steps + 1), "warmup_num_steps": student.warmup_steps,
        "warmup_type": "linear", "cos_min_ratio": 0.1}}
    return ds_config


def _agreed(flag: bool, rank: int, world: int) -> bool:
    """Rank 0's `flag` on every worker: all workers must make the same ray.train.report calls. Sent through
    Ray Train, not torch.distributed, whose process group DeepSpeed's ZeRO-3 collectives are using."""
    if world == 1:
        return flag
    from ray.train.collective import broadcast_from_rank_zero

    return bool(broadcast_from_rank_zero(flag if rank == 0 else None))


_END = object()


def prefetch_in_thread(items: Iterator, depth: int = 4) -> Iterator:
    """`items`, run on a thread `depth` ahead of the caller, starting now: the training loop then only
    waits when the data truly falls behind (deserialising and padding a batch happen off its thread,
    and the start of a pass overlaps whatever the loop does first)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)

    def run() -> None:
        try:
            for item in items:
                ready.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            ready.put(e)
            return
        ready.put(_END)

    threading.Thread(target=run, name="batches-ahead", daemon=True).start()

    def consume() -> Iterator:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    return consume()


def _summary_writer(log_dir: str | None):
    """A TensorBoard writer when torch's or tensorboardX's is installed (`tensorboard --logdir` on it)."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(log_dir)


def _log(board, metrics: dict) -> None:
    if board is None:
        return
    for name, value in metrics.items():
        if name not in ("step", "epoch", "first_step_at") and isinstance(value, (int, float)) and not math.isnan(value):
            board.add_scalar(f"train/{name}", value, metrics["step"])
    board.flush()


def _peak_memory_mb() -> float:
    import resource

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
