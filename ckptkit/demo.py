"""``ckptkit demo``: the whole flow on the real Megatron-LM checkpoint shipped in the package.

The checkpoint (GPT-2 style, 6 layers, hidden 96, TP2 PP2, float32, 10 training
iterations) and the logits Megatron-LM computed for it live in ``ckptkit/data/demo``.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .convert import megatron_to_hf, reshard
from .inspection import inspect_checkpoint
from .safe_load import safe_torch_load
from .verification import verify

DEMO_CHECKPOINT = "gpt2_tp2pp2"
DEMO_LOGITS = "gpt2_tp2pp2_logits.pt"
LOGITS_TOLERANCE = 1e-4  # float32 conversion reaches ~1e-6; a wrong activation lands near 6e-4


@dataclass
class DemoStep:
    name: str
    ok: bool
    detail: str


@dataclass
class DemoSummary:
    workdir: str
    steps: list[DemoStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def to_dict(self) -> dict:
        return {"workdir": self.workdir, "ok": self.ok, "steps": [step.__dict__ for step in self.steps]}


def demo_data() -> Path:
    return Path(str(resources.files("ckptkit") / "data" / "demo"))


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def run_demo(keep: str | None = None, log=print) -> DemoSummary:
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="ckptkit-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = DemoSummary(str(workdir))
    try:
        source = workdir / "megatron_tp2pp2"
        if source.exists():
            shutil.rmtree(source)
        shutil.copytree(demo_data() / DEMO_CHECKPOINT, source)
        log(f"copied the bundled Megatron-LM checkpoint to {source}")

        info = inspect_checkpoint(source)
        layout = info.layout
        summary.steps.append(DemoStep("inspect", True,
                                      f"{layout['layout']} {info.family}, TP={layout['tp']} PP={layout['pp']}, "
                                      f"iteration {layout['iteration']}, {info.num_parameters:,} parameters"))

        hf_dir = workdir / "hf"
        converted = megatron_to_hf(source, hf_dir, overwrite=True)
        summary.steps.append(DemoStep("megatron-to-hf", True, f"{len(converted.files)} files, "
                                      f"{converted.bytes_written / 1e6:.1f} MB in {converted.seconds:.2f} s"))

        reference = safe_torch_load(demo_data() / DEMO_LOGITS)
        vocab = reference["vocab"]
        logits = hf_logits(hf_dir, reference["tokens"])
        difference = (logits[..., :vocab] - reference["logits"][..., :vocab].float()).abs().max().item()
        summary.steps.append(DemoStep("logits vs Megatron-LM", difference < LOGITS_TOLERANCE,
                                      f"max |diff| {difference:.2e} over {reference['tokens'].numel()} tokens "
                                      f"(tolerance {LOGITS_TOLERANCE:g})"))

        resharded = workdir / "megatron_tp1pp3"
        reshard(source, resharded, tp=1, pp=3, overwrite=True)
        check = verify(source, resharded)
        summary.steps.append(DemoStep("reshard TP2PP2 -> TP1PP3", check.equivalent,
                                      f"{len(check.tensors)} tensors bit-identical" if check.equivalent
                                      else f"max |diff| {check.max_abs_diff:.3g}"))

        check = verify(resharded, hf_dir)
        summary.steps.append(DemoStep("verify TP1PP3 vs HF", check.equivalent,
                                      f"{len(check.tensors)} tensors, max |diff| {check.max_abs_diff:.3g}"))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return summary
