"""The fine-tune job on a real local Ray: Ray Train workers, DeepSpeed ZeRO, PEFT LoRA, tiny real models,
labelled Parquet written by the real label job. Each run asserts the loss fell and the adapter changed."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from safetensors.torch import load_file

from cluster import StorageRoot, connect
from jobs.finetune import REPORT_INTERVAL_S, finetune
from jobs.label import label_images
from raydar.heads import PointsHead, load_head
from raydar.spec import SpecError
from tests.conftest import DEMO_SPEC, REPO, TEST_STUDENT, squares
from raydar.spec import load_spec


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """40 demo images labelled by the simulated teacher, on a module-wide local Ray."""
    connect(num_cpus=2)
    storage = StorageRoot(tmp_path_factory.mktemp("store"))
    spec = student_spec()
    result = label_images(spec, storage, progress=False)
    assert result.ok_new == 40
    yield storage
    ray.shutdown()


def student_spec(**student):
    values = {"images.generate.n": 40, "images.generate.size": 96, "teacher.simulated.latency_s": 0.0, **TEST_STUDENT,
              "student.epochs": 2, "student.batch_size": 4, "student.learning_rate": 5e-3, "student.warmup_steps": 2,
              "student.lora.vision": False, "student.point_head": False}
    values.update({f"student.{k}": v for k, v in student.items()})
    return load_spec(DEMO_SPEC, overrides=values)


@dataclass(frozen=True)
class DieOnce:
    """An `on_step` callback: the rank-0 worker dies at `step`, once (the mark it leaves at `marker` keeps the
    restarted worker alive)."""

    step: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != 0 or os.path.exists(self.marker):
            return
        Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
        Path(self.marker).touch()
        # The controller takes a worker's queued report when it polls (every REPORT_INTERVAL_S): a worker dying
        # sooner after its checkpoint's report would take the report with it. Waiting out two polls makes the
        # restart resume from that checkpoint, as a later death would.
        time.sleep(2 * REPORT_INTERVAL_S)
        os._exit(1)  # a worker dying mid-run; Ray Train restarts the group from the last checkpoint


def die_once(storage: StorageRoot, run_name: str, step: int) -> DieOnce:
    return DieOnce(step, str(storage.child("demo_cells").local_path("train", run_name, "injected-failure")))


def adapter_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint) / "adapter" / "adapter_model.safetensors")


def assert_learned(result) -> None:
    m = result.metrics
    epochs = [h for h in result.history if "val_loss" in h]  # the per-epoch reports (the others are per step)
    assert m["loss"] < m["first_loss"], m
    assert m["val_loss"] < epochs[0]["val_loss"] + 1e-6, m
    steps = [h for h in result.history if "step_s" in h]
    assert steps and all(h["tokens_per_s"] > 0 and 0 <= h["data_wait_share"] <= 1 for h in steps)
    rates = [h["learning_rate"] for h in steps]
    assert len(rates) < 2 or max(rates) > rates[-1]  # the schedule decays after its warm-up
    weights = adapter_weights(result.checkpoint)
    lora_b = [t for n, t in weights.items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at zero: training moved it
    assert not any("visual" in n for n in weights)  # the vision tower stayed frozen


@pytest.mark.slow
def test_lora_learns_with_two_workers_under_zero3_and_a_restart_takes_up_each_ranks_optimiser_partition(labelled):
    """ZeRO-3 partitions the weights and AdamW's moments over the two ranks; each rank's partition goes into the
    one checkpoint, and the restarted group (rank 0 dies at step 6, in the second epoch) loads them back."""
    spec = student_spec(workers=2, deepspeed_stage=3)
    result = finetune(spec, labelled, run_name="w2-z3", report_every=2,
                      on_step=die_once(labelled, "w2-z3", 6))  # 4 steps an epoch
    per_epoch = [h for h in result.history if "val_loss" in h]
    assert [(h["epoch"], h["step"]) for h in per_epoch] == [(0, 4), (1, 8)], result.history
    assert per_epoch[1]["resumed_from_step"] == 4 and per_epoch[1]["optimizer_restored"] is True, per_epoch
    assert_learned(result)
    assert_checkpoint_files(result)
    layout, optimiser = training_state(result.checkpoint)
    assert layout == {"world_size": 2, "zero_stage": 3} and len(optimiser) == 2, (layout, optimiser)


def training_state(checkpoint: str) -> tuple[dict, list[Path]]:
    """A checkpoint's `training_state/`: its layout, and the ranks' optimiser files."""
    state = Path(checkpoint) / "training_state"
    return json.loads((state / "layout.json").read_text()), sorted(state.glob("last/*optim_states.pt"))


def assert_checkpoint_files(result) -> None:
    folder = Path(result.checkpoint)
    for name in ("adapter/adapter_config.json", "processor/processor_config.json", "spec.json", "metrics.json"):
        assert (folder / name).is_file(), name


@pytest.mark.slow
def test_a_point_head_trains_beside_the_adapter_and_is_saved_whole_under_zero3(labelled):
    """The demo's student: a point head on the image tokens, LoRA on the language model and the vision tower,
    two workers under ZeRO-3, which partitions the head too; the checkpoint holds it whole, trained."""
    from raydar.predict import StudentDetector

    spec = student_spec(workers=2, deepspeed_stage=3, point_head=True, epochs=4, **{"lora.vision": True})
    result = finetune(spec, labelled, run_name="point-head", report_every=2)
    epochs = [h for h in result.history if "val_loss" in h]  # "loss": the epoch's mean training loss
    assert epochs[-1]["loss"] < epochs[0]["loss"] - 0.05, epochs  # the head's loss alone: no answer text
    weights = adapter_weights(result.checkpoint)
    assert any("visual" in n and t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)
    head = load_head(result.checkpoint)
    assert isinstance(head, PointsHead) and head.classes == list(spec.task.ontology)
    assert head.net[0].weight.shape == (128, head.hidden_size, 3, 3)  # whole, not this rank's slice
    detector = StudentDetector.from_checkpoint(result.checkpoint)
    image = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 170, 210)).save(image, "PNG")
    [answer] = detector.detect([image.getvalue()])
    assert isinstance(detector.head, PointsHead) and answer["error"] is None and answer["raw"] == ""


ZERO3_STEPS = """
import json, os, sys
import deepspeed, torch
from PIL import Image
from jobs.finetune import deepspeed_config
from raydar.models import resolve_base_model
from raydar.sft import collate
from raydar.student import build_student
from tests.test_finetune import student_spec

os.environ["LOCAL_RANK"] = "0"  # what a launcher (Ray Train's here) sets for DeepSpeed
torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=sys.argv[1])
spec = student_spec(deepspeed_stage=3, point_head=True)
student, builder, processor = build_student(spec, str(resolve_base_model(spec.student.base_model, "qwen2_vl")))
engine, *_ = deepspeed.initialize(model=student, config=deepspeed_config(spec.student, 5), dist_init_required=False,
                                  model_parameters=[p for p in student.parameters() if p.requires_grad])
trace = engine.optimizer.parameter_offload.get_param_coordinator()
image, label = Image.new("RGB", (96, 96), (200, 170, 210)), {"points": [{"label": "explicit", "x": 0.5, "y": 0.5}]}
complete = []
for images in (2, 2, 2, 1, 2):  # an epoch's short last batch, then the next epoch
    batch = collate([builder.example(image) for _ in range(images)], processor.tokenizer.pad_token_id)
    engine.backward(engine(batch, [label] * images))
    engine.step()
    complete.append(trace.is_complete_trace())
print(json.dumps(complete))
"""


@pytest.mark.slow
def test_under_zero3_a_step_fetches_the_same_modules_whatever_its_batch_size(tmp_path):
    """Every ZeRO-3 worker must fetch the same modules in the same order at every step. Ray Data formats
    batches on several threads, so an epoch's short last batch comes at a different step on each worker;
    a step whose module order depended on its batch size left the workers waiting on each other for
    torch's 30 minutes (CI, 2026-11-23: the point head returned one tensor per image, and DeepSpeed
    fetches a module again in the backward pass for each tensor it returned). Here DeepSpeed's record of
    the order (its trace), taken at the first full steps, must still hold after a one-image step."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ZERO3_STEPS, f"file://{tmp_path / 'rendezvous'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    complete = json.loads(done.stdout.strip().splitlines()[-1])
    assert complete == [False, True, True, True, True], complete  # recorded at step 1, then held


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["4bit", "8bit"], ids=["qlora-4bit", "lora-on-8bit"])
def test_a_quantised_base_trains(labelled, bits):
    spec = student_spec(quantisation=bits, deepspeed_stage=0, epochs=1)
    result = finetune(spec, labelled, run_name=f"quantised-{bits}", report_every=2)
    assert result.metrics["loss"] < result.metrics["first_loss"]
    assert any(t.abs().sum() > 0 for n, t in adapter_weights(result.checkpoint).items() if "lora_B" in n)


@pytest.mark.slow
def test_lora_learns_on_one_worker_under_zero2_and_a_worker_that_dies_mid_run_resumes_from_the_last_checkpoint(
        labelled):
    """One run for both (a run is mostly start-up): the worker dies once at step 9, in the second epoch. Then
    the run is started again under its name."""
    spec = student_spec(deepspeed_stage=2)
    result = finetune(spec, labelled, run_name="dies", report_every=2,
                      on_step=die_once(labelled, "dies", 9))  # 7 steps an epoch
    per_epoch = [h for h in result.history if "val_loss" in h]
    assert labelled.exists("demo_cells", "train", "dies", "injected-failure")  # a worker did die at step 9
    # epoch 0 was not trained again: resumed from its checkpoint, and the step count went on from there
    assert [(h["epoch"], h["step"]) for h in per_epoch] == [(0, 7), (1, 14)], result.history
    steps = [h for h in result.history if "step_s" in h]
    assert [h["step"] for h in steps] == [2, 4, 6, 8, 10, 12, 14]
    # Steps 2-6 are the first attempt's, kept in the checkpoint, not those of a second go at epoch 0: each
    # report carries the time of its attempt's first step.
    starts = [h["first_step_at"] for h in steps]
    assert len(set(starts[:3])) == 1 and len(set(starts[3:])) == 1 and starts[3] > starts[0], starts
    # The resumed attempt took up the weights, AdamW's moments and the schedule where epoch 0 left them, so the run
    # goes on learning: its validation loss ends below epoch 0's (6.11, as without the death). Before, the weights
    # alone were loaded, after DeepSpeed had copied the initial ones into its optimiser, which wrote those back at
    # its first step: the validation loss ended above epoch 0's, 6.34 against 6.29.
    assert per_epoch[1]["resumed_from_step"] == 7 and per_epoch[1]["optimizer_restored"] is True, per_epoch
    assert "resumed_from_step" not in per_epoch[0]
    assert_learned(result)
    layout, optimiser = training_state(result.checkpoint)
    assert layout == {"world_size": 1, "zero_stage": 2} and len(optimiser) == 1, (layout, optimiser)

    # Started again under the same name, for a third epoch and under ZeRO-3, it goes on from its last checkpoint.
    # ZeRO-2's optimiser state does not fit ZeRO-3's partitions, so it takes the weights and the schedule's step.
    more = finetune(student_spec(deepspeed_stage=3, epochs=3), labelled, run_name="dies", report_every=7)
    per_epoch = [h for h in more.history if "val_loss" in h]
    assert [(h["epoch"], h["step"]) for h in per_epoch] == [(0, 7), (1, 14), (2, 21)], more.history
    assert per_epoch[2]["resumed_from_step"] == 14 and per_epoch[2]["optimizer_restored"] is False, per_epoch
    assert more.metrics["first_loss"] == result.metrics["first_loss"]  # the same run's, kept in its checkpoint
    # From the weights epoch 1 left. (Loaded after DeepSpeed had wrapped the model, they were overwritten by
    # the optimiser's copy of the initial weights at the first step: validation loss 6.51, epoch 0's 6.29.)
    assert per_epoch[2]["val_loss"] < per_epoch[0]["val_loss"], per_epoch
    assert training_state(more.checkpoint)[0]["zero_stage"] == 3
    assert_checkpoint_files(result)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"base_model": "/nowhere/model"}, "neither a folder nor in the local Hugging Face cache"),
        ({"base_model": "raydar-tiny-gpt"}, "unknown tiny model"),
        ({"quantisation": "8bit", "deepspeed_stage": 3}, "ZeRO-3 partitions weights"),
        pytest.param({"use_gpu": True}, r"1 worker, each with 1 CPU and a GPU \(student.use_gpu\); this cluster "
                     r"holds 0 \(its nodes have 2 CPUs, 0 GPUs\); .*set student.use_gpu: false",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        ({"cpus_per_worker": 8}, r"1 worker, each with 8 CPUs; this cluster holds 0 \(its nodes have 2 CPUs, 0 GPUs\)"),
        ({"workers": 2, "cpus_per_worker": 2},
         r"2 workers, each with 2 CPUs; this cluster holds 1 .*lower student.workers"),
    ],
    ids=["unknown-model", "unknown-tiny-model", "zero3-with-8bit", "gpu-on-a-cpu-cluster", "more-cpus-than-a-node",
         "more-workers-than-the-node-holds"],
)
def test_impossible_requests_fail_before_any_worker_starts(labelled, student, message):
    start = time.monotonic()
    with pytest.raises(SpecError, match=message):
        finetune(student_spec(**student), labelled, run_name="never")
    assert time.monotonic() - start < 10
    assert not labelled.exists("demo_cells", "train", "never")


@pytest.mark.slow
def test_no_labelled_rows_is_a_clear_error(labelled, tmp_path):
    with pytest.raises(FileNotFoundError, match="no labels yet"):
        finetune(student_spec(), StorageRoot(tmp_path / "empty"), run_name="never")


def test_gradient_checkpointing_recomputes_and_still_trains_the_adapter(demo_folder):
    """`student.gradient_checkpointing`: the base checkpoints its layers, and LoRA still gets gradients
    through the frozen embeddings (the input-grad hook PEFT needs)."""
    from PIL import Image

    from raydar.models import resolve_base_model
    from raydar.sft import collate
    from raydar.student import build_student
    from tests.conftest import STUDENT_LABEL, ground_truth_files

    spec = student_spec(gradient_checkpointing=True)
    student, builder, processor = build_student(spec, str(resolve_base_model(spec.student.base_model, "qwen2_vl")))
    assert student.model.is_gradient_checkpointing
    image = Image.open(demo_folder / ground_truth_files(demo_folder)[0]).convert("RGB")
    batch = collate([builder.example(image, STUDENT_LABEL)], processor.tokenizer.pad_token_id)
    student.train()
    student(batch, [STUDENT_LABEL]).backward()
    grads = [p.grad for n, p in student.named_parameters() if "lora_B" in n]  # A gets none while B is 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_lora_on_the_vision_tower_only_when_asked(family):
    """`student.lora.vision` puts LoRA on the vision tower's own layer names (Qwen's qkv / proj / fc1 / fc2,
    CLIP's q_proj ... out_proj), which the language model's target modules do not name."""
    from raydar.models import resolve_base_model
    from raydar.student import build_student

    for vision in (False, True):
        spec = student_spec(base_model=f"raydar-tiny-{family.replace('_', '-')}", family=family, point_head=False,
                            **{"lora.vision": vision})
        student, _, _ = build_student(spec, str(resolve_base_model(spec.student.base_model, family)))
        lora = [n for n, p in student.named_parameters() if p.requires_grad and "lora_A" in n]
        in_vision = [n for n in lora if ".visual." in n or ".vision_tower." in n]
        assert len(lora) > len(in_vision) > 0 if vision else lora and not in_vision, (vision, lora)


@pytest.mark.slow
def test_each_pass_of_examples_streams_out_in_blocks_of_about_a_batch(labelled):
    """A pass's first batch must not wait for the whole pass: its one Ray task emits the examples in blocks of a
    batch or two, not one block when its input is done (which made every epoch start wait)."""
    from jobs.finetune import example_rows
    from raydar.labels import LabelStore
    from raydar.models import resolve_base_model
    from raydar.sources import resolve_source

    spec = student_spec(max_pixels=112 * 112)  # the size the block target assumes, near the 96-px images' 84x84
    root = labelled.child(spec.name)
    rows = LabelStore(root.child("labels")).read_labels()
    model = str(resolve_base_model(spec.student.base_model, spec.student.family))
    examples = example_rows(rows, resolve_source(spec, root), spec, model, augment=True)
    sizes = [m.num_rows for bundle in examples.iter_internal_ref_bundles() for m in bundle.metadata]
    assert sum(sizes) == rows.num_rows == 40
    assert len(sizes) >= 4 and max(sizes) <= 2 * spec.student.batch_size, sizes  # before: one block of 40
    assert ray.data.DataContext.get_current().target_max_block_size != examples.context.target_max_block_size


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["chest_xray", "nutrition"], ids=["multilabel-head", "regression-head"])
def test_a_multilabel_or_regression_head_trains_beside_the_adapter_in_the_job(labelled, tmp_path, dataset):
    """The seed 004 and 003 specs on the job: the head learns with the LoRA adapter (one loss, one DeepSpeed
    engine) and is saved beside it. Labels are written straight to the label store (no teacher answers
    these kinds here), as labelled Parquet rows of the head tests' images with 0-3 squares."""
    import hashlib
    import json

    from raydar.kinds import kind_of
    from raydar.labels import LabelStore, answered_row
    from raydar.models import resolve_base_model
    from raydar.student import build_student

    folder = tmp_path / "images"
    folder.mkdir()
    spec = load_spec(REPO / "datasets" / f"{dataset}.yaml", overrides={
        "images.uri": str(folder), **TEST_STUDENT, "student.workers": 1, "student.deepspeed_stage": 2,
        "student.epochs": 3, "student.batch_size": 4, "student.learning_rate": 5e-3, "student.warmup_steps": 2,
        "student.quantisation": "none", "student.lora.vision": False, "student.gradient_checkpointing": False,
        "student.use_gpu": False, "student.cpus_per_worker": 2})
    names = list(getattr(spec.task, "ontology", None) or spec.task.targets)
    rng, rows = np.random.default_rng(3), []
    for i in range(40):
        image, _, squared = squares(rng)
        count, cover = int(squared["values"]["squares"]), squared["values"]["cover"] / 100
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        (folder / f"{i:03d}.png").write_bytes(data)
        if spec.task.kind == "multilabel":  # the first `count` findings present
            label = {"probabilities": {n: float(k < count) for k, n in enumerate(names)}}
        else:  # a portion that grows with the squares
            label = {"values": {n: round(cover * spec.task.targets[n].max * (k + 1) / 8, 2) for k, n in enumerate(names)}}
        image_id = hashlib.sha256(data).hexdigest()
        rows.append(answered_row(
            image_id=image_id, source_uri=str(folder / f"{i:03d}.png"), width=64, height=64,
            split="val" if i % 8 == 0 else "train", task=kind_of(spec.task).name,
            label=json.dumps(kind_of(spec.task).validate(label)), teacher_model="written-by-the-test",
            teacher_fingerprint="test", run_id="test"))
    storage = StorageRoot(tmp_path / "store")
    store = LabelStore(storage.child(spec.name, "labels"))
    store.append(rows, "test", 0)
    store.write_snapshot("test")

    result = finetune(spec, storage, run_name="heads")

    assert result.metrics["loss"] < result.metrics["first_loss"], result.metrics
    assert any(t.abs().sum() > 0 for n, t in adapter_weights(result.checkpoint).items() if "lora_B" in n)
    head = load_head(result.checkpoint)  # saved beside the adapter
    assert head.config()["kind"] == spec.task.kind
    # The head the worker started from: the same seed and build as `train_student`, twice to show it is one.
    path = str(resolve_base_model(spec.student.base_model, spec.student.family))
    initial = []
    for _ in range(2):
        torch.manual_seed(0)
        initial.append({n: p.detach() for n, p in build_student(spec, path)[0].head.named_parameters()})
    assert all(torch.equal(initial[0][n], initial[1][n]) for n in initial[0])
    trained = dict(head.named_parameters())  # parameters only: not the multilabel head's fitted pos_weight
    assert trained.keys() == initial[0].keys()
    moved = [n for n in initial[0] if not torch.allclose(trained[n], initial[0][n])]
    assert moved, "the head's weights did not change"
