"""The student checkpoint: its layout, saving and loading it, the best of a run, the run's name and history.

A finetune run lives in `<storage>/<dataset>/train/<run name>/` (Ray Train's run folder), one
`checkpoint_<time>/` per epoch, the best and the last kept:

    adapter/              the LoRA adapter (PEFT's safetensors)
    processor/            the processor the student was trained with
    head.pt, head.json    the task's head, when the student has one (raydar.heads.save_head)
    spec.json             the dataset spec
    metrics.json          the epoch's metrics; `val_loss` picks the best of a run
    history.json          every report of the run up to this checkpoint
    trainable.pt          the trainable weights in full, for resuming
    training_state/       DeepSpeed's checkpoint: each rank's partition of the optimiser's state

Every finished run also points `<storage>/<dataset>/train/latest` at its best checkpoint: a small file
holding that checkpoint's URI, so that a serving config can name `.../train/latest` and get the newest
tuned student whatever its run is called (`write_latest`, `resolve_reference`).

Written by the finetune job (`save_checkpoint`, `save_training_state`), read by prediction, evaluation,
the pipeline and serving (`local_checkpoint`, `run_history`). Importing this module is cheap: torch and
DeepSpeed are imported by the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

from raydar.sources import resolve
from raydar.spec import DatasetSpec, SpecError

TRAIN_DIR = "train"  # under the dataset's folder of the storage root: one folder per run
ADAPTER_DIR = "adapter"
PROCESSOR_DIR = "processor"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
TRAINABLE_FILE = "trainable.pt"
TRAINING_STATE = "training_state"  # DeepSpeed's checkpoint: optimiser, schedule, weights
LATEST = "latest"  # under TRAIN_DIR: a file holding the URI of the newest finished run's best checkpoint
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------- runs


def run_name(spec: DatasetSpec, inputs_key: str | None = None) -> str:
    """The name of the spec's finetune run: `<dataset>-finetune`, what `raydar finetune` writes without
    --run-name and what evaluation reads; or, named after the key of its inputs (the pipeline's), the
    same name for the same inputs, so that a crashed run resumes."""
    return f"{spec.name}-{inputs_key[:10]}" if inputs_key else f"{spec.name}-finetune"


def finetune_run_folder(spec: DatasetSpec, storage, name: str | None = None) -> str:
    """Where `raydar finetune` leaves the spec's run (its checkpoints) under `storage` (a cluster.StorageRoot)."""
    root = storage.child(spec.name)
    name = name or run_name(spec)
    if not root.exists(TRAIN_DIR, name):
        raise FileNotFoundError(f"{root.uri_of(TRAIN_DIR, name)}: no finetune run; run `raydar finetune --spec "
                                f"{spec.source_file}` first, or pass --checkpoint")
    return root.uri_of(TRAIN_DIR, name)


def write_latest(storage, spec: DatasetSpec, checkpoint: str) -> str:
    """Point the dataset's `train/latest` at `checkpoint` (a URI); returns the pointer's URI."""
    root = storage.child(spec.name)
    root.write_bytes((checkpoint + "\n").encode(), TRAIN_DIR, LATEST)
    return root.uri_of(TRAIN_DIR, LATEST)


def resolve_reference(uri: str) -> str:
    """The checkpoint or run folder `uri` names: itself, or for a pointer file (`train/latest`) the URI
    written in it."""
    import pyarrow.fs as pafs

    fs, path = resolve(str(uri).removeprefix("file://"))
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return str(uri)
    with fs.open_input_stream(path) as f:
        target = f.read().decode().strip()
    if not target:
        raise FileNotFoundError(f"{uri}: an empty checkpoint pointer")
    return target


def best_checkpoint(checkpoints: list[tuple[str, dict]]) -> str | None:
    """Of (path, metrics) pairs, the path with the lowest validation loss: the latest of equal ones (a path
    `checkpoint_<time>` sorts by time), and one without a finite loss counts as the worst."""
    ordered = sorted(checkpoints, key=lambda c: c[0])
    if not ordered:
        return None

    def val_loss(metrics: dict) -> float:
        try:
            loss = float(metrics.get("val_loss", math.inf))
        except (TypeError, ValueError):
            return math.inf
        return loss if math.isfinite(loss) else math.inf

    return min(enumerate(ordered), key=lambda c: (val_loss(c[1][1]), -c[0]))[1][0]


def run_history(uri: str) -> list[dict]:
    """The training curve of a checkpoint, or of a run folder's latest checkpoint (history.json, local or
    any pyarrow URI); [] when there is none."""
    from pyarrow.fs import FileSelector

    try:
        fs, path = resolve(uri)
        found = [i.path for i in fs.get_file_info(FileSelector(path, recursive=True))
                 if i.path.endswith("/" + HISTORY_FILE)]
        if not found:
            return []
        with fs.open_input_stream(max(found)) as f:  # checkpoint_<time> sorts by time: the latest
            return json.loads(f.read())
    except (OSError, ValueError):
        return []


# ---------------------------------------------------------------- reading one


def local_checkpoint(uri: str) -> Path:
    """A local folder holding the checkpoint `uri` names (a folder or any pyarrow URI; a remote one is
    copied): the checkpoint itself, or for a run folder its best checkpoint."""
    return _checkpoint_in(_local_copy(resolve_reference(uri)))


def saved_spec(folder: Path) -> DatasetSpec:
    return DatasetSpec.model_validate_json((folder / SPEC_FILE).read_text())


def saved_metrics(folder: Path) -> dict:
    return json.loads((folder / METRICS_FILE).read_text())


def saved_history(folder: Path) -> list[dict]:
    """Every report of the run up to this checkpoint; [] for a checkpoint without one."""
    path = folder / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def saved_trainable(folder: Path) -> dict:
    """The trainable weights (`trainable_state`) of a local checkpoint, on the CPU."""
    import torch

    return torch.load(folder / TRAINABLE_FILE, map_location="cpu", weights_only=True)


def adapter_digest(folder: Path) -> str:
    """What names the adapter in responses: sha256 of its weights."""
    weights = folder / ADAPTER_DIR / _ADAPTER_WEIGHTS
    return "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


def _local_copy(uri: str) -> Path:
    """A local folder with the checkpoint: the folder itself, or a copy of a remote one (s3://, gs://, ...)."""
    if "://" not in str(uri) or str(uri).startswith("file://"):
        folder = Path(str(uri).removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{uri}: no such checkpoint folder")
        return folder
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(str(uri))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such checkpoint folder")
    local = Path(tempfile.mkdtemp(prefix="raydar-checkpoint-"))
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def _checkpoint_in(folder: Path) -> Path:
    """The folder itself if it is a checkpoint; for a run folder, its best checkpoint."""
    if (folder / ADAPTER_DIR).is_dir():
        missing = [name for name in (SPEC_FILE, PROCESSOR_DIR) if not (folder / name).exists()]
        if missing:
            raise SpecError(f"{folder}: not a complete finetune checkpoint (missing {', '.join(missing)})")
        return folder
    candidates = [c for c in folder.glob("checkpoint_*") if (c / ADAPTER_DIR).is_dir()]
    if not candidates:
        raise SpecError(f"{folder}: holds no finetune checkpoint (an {ADAPTER_DIR}/ folder, or checkpoint_*/ "
                        "folders with one, as `raydar finetune` writes)")

    def metrics(c: Path) -> dict:
        try:
            return saved_metrics(c)
        except (OSError, ValueError):
            return {}

    return _checkpoint_in(Path(best_checkpoint([(str(c), metrics(c)) for c in candidates])))


# ---------------------------------------------------------------- writing one (on the Ray Train workers)


def save_checkpoint(folder: Path, student, processor, spec: DatasetSpec, state: dict, metrics: dict,
                    history: list[dict] | None = None) -> None:
    """adapter/ (safetensors), head, processor, the spec, the metrics and their history; `trainable.pt`
    for resuming. `student` is a raydar.student.Student, `state` its `trainable_state`."""
    import torch

    from raydar.heads import save_head
    from raydar.kinds import kind_of

    lora = {n[len("model."):]: t for n, t in state.items() if n.startswith("model.")}
    student.model.save_pretrained(folder / ADAPTER_DIR, state_dict=lora)
    if student.head is not None:
        # A fresh head on the CPU: under ZeRO-3 the live one holds only this rank's slice of each weight.
        head = kind_of(spec.task).head(student.head.hidden_size, point_head=spec.student.point_head)
        buffers = dict(student.head.named_buffers())
        head.load_state_dict({**buffers, **{n[len("head."):]: t for n, t in state.items() if n.startswith("head.")}})
        save_head(head, folder)
    processor.save_pretrained(folder / PROCESSOR_DIR)
    (folder / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (folder / HISTORY_FILE).write_text(json.dumps(history or [metrics]))
    torch.save(state, folder / TRAINABLE_FILE)


def trainable_state(engine) -> dict:
    """The trainable weights (LoRA, head) in full, gathered from every rank under ZeRO-3."""
    import deepspeed

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None,
                                           enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone().cpu() for n, p in params.items()}


def load_trainable(student, state: dict) -> None:
    """The trainable weights of a checkpoint (`trainable_state`) into the student, before DeepSpeed wraps it."""
    import torch

    params = dict(student.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{TRAINABLE_FILE}: weights this student does not have: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_training_state(engine, folder: Path, world: int) -> None:
    """DeepSpeed's own checkpoint of the trainable weights, AdamW's moments and the schedule, under
    `training_state/`: each rank writes its partition (ZeRO shards the optimiser's state), so a resumed run
    takes up the optimiser where it stopped. Every rank must call it."""
    engine.save_checkpoint(str(folder / TRAINING_STATE), tag="last", save_latest=False, exclude_frozen_parameters=True)
    if engine.global_rank == 0:
        layout = {"world_size": world, "zero_stage": engine.zero_optimization_stage()}
        (folder / TRAINING_STATE / "layout.json").write_text(json.dumps(layout))


def load_training_state(engine, folder: Path, world: int) -> bool:
    """Whether the optimiser's state, the schedule and the trainable weights were restored from a
    checkpoint's `training_state/`. They are not when it has none (a checkpoint written without it) or
    when it was written by another number of workers or ZeRO stage, whose partitions do not fit: the
    run then goes on from the weights alone (`trainable.pt`, loaded before DeepSpeed wrapped the model)."""
    layout_file = folder / TRAINING_STATE / "layout.json"
    if not layout_file.is_file():
        return False
    layout = json.loads(layout_file.read_text())
    here = {"world_size": world, "zero_stage": engine.zero_optimization_stage()}
    if layout != here:
        print(f"resume: the optimiser's state was saved by {layout}, this run is {here}; "
              "going on from the weights alone (AdamW's moments start from zero)", flush=True)
        return False
    path, _ = engine.load_checkpoint(str(folder / TRAINING_STATE), tag="last", load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    return path is not None
