"""The student: the base vision-language model with LoRA (optionally quantised) and the task's head, if any.

    student, builder, processor = build_student(spec, str(resolve_base_model(spec.student.base_model)))
    loss = student(batch, labels)          # one module for DeepSpeed: the answer's loss plus the head's

The vision tower stays frozen unless `student.lora.vision`; multilabel and regression specs get a head
on the pooled hidden state, points specs with `student.point_head` one on the image tokens.
"""

from __future__ import annotations

import torch

from raydar.heads import PointsHead, image_token_maps, pool_hidden
from raydar.spec import DatasetSpec


class Student(torch.nn.Module):
    """The PEFT model and its head, if any: for multilabel and regression specs on the pooled hidden
    state, with `student.point_head` on the image tokens' hidden states. `forward(batch, labels)` returns
    the training loss (the answer text's, when the batch has answer tokens, plus the head's), so
    DeepSpeed sees one module."""

    def __init__(self, model, head) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, batch: dict, labels: list[dict]):
        out = self.model(**batch, output_hidden_states=self.head is not None)
        if self.head is None:
            return out.loss
        hidden = out.hidden_states[-1]
        if isinstance(self.head, PointsHead):  # trained on the head's loss alone (no answer text in its examples)
            outputs = self.head.outputs(image_token_maps(hidden, batch, self.model.config))
            loss = self.head.loss(outputs, self.head.targets(labels, outputs))
            return loss if out.loss is None else out.loss + loss
        pooled = pool_hidden(hidden, batch["attention_mask"])
        targets = self.head.targets(labels).to(pooled.device)
        return out.loss + self.head.loss(self.head(pooled), targets)


def build_student(spec: DatasetSpec, model_path: str, head_buffers: dict[str, list[float]] | None = None):
    """The base model with LoRA (and quantisation), its head, and the example builder."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from raydar.kinds import kind_of
    from raydar.models import load_processor
    from raydar.sft import SFTExamples

    s = spec.student
    processor = load_processor(model_path, s.max_pixels)
    quantisation = None
    if s.quantisation == "4bit":
        quantisation = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
    elif s.quantisation == "8bit":
        quantisation = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForImageTextToText.from_pretrained(model_path, quantization_config=quantisation,
                                                        dtype=torch.float32)
    if quantisation is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks still need a grad path
    vision = {n for n, _ in model.named_modules() if "visual" in n or "vision" in n}
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (
        n.rsplit(".", 1)[-1] in s.lora.vision_target_modules if _inside(n, vision) and s.lora.vision
        else n.rsplit(".", 1)[-1] in s.lora.target_modules and not _inside(n, vision))]
    model = get_peft_model(model, LoraConfig(r=s.lora.rank, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                                             target_modules=targets, modules_to_save=s.lora.modules_to_save or None))
    builder = SFTExamples.for_student(spec, processor)
    head = kind_of(spec.task).head(model.config.get_text_config().hidden_size, point_head=s.point_head)
    for name, value in (head_buffers or {}).items() if head is not None else ():
        getattr(head, name).copy_(torch.tensor(value))
    return Student(model, head), builder, processor


def _inside(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def evaluation_mode(module: torch.nn.Module) -> None:
    """eval() for dropout, except bitsandbytes' 4-bit layers (no dropout in them): in eval mode on the
    CPU they repack their weights for an inference kernel, which fails on these shapes."""
    module.eval()
    for layer in module.modules():
        if type(layer).__name__ == "Linear4bit":
            layer.train()
