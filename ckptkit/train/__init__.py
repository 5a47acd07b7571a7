"""A small Megatron-style parallel GPT trainer (tensor, sequence, pipeline and data parallel).

The model (:mod:`.model`) is a plain single-process GPT with Megatron-Core parameter
names; :mod:`.parallel` applies the parallelisms to it from outside; :mod:`.trainer`
runs the loop; checkpoints are Megatron per-rank files (:mod:`.checkpoint`).

>>> from ckptkit.train import MODEL_PRESETS, TrainConfig, train
>>> train(TrainConfig(model=MODEL_PRESETS["gpt2"], tp=2, pp=2, steps=10, save="out")).losses
"""
from .config import MODEL_PRESETS, TrainConfig, model_spec
from .model import GPT
from .optim import AdamConfig
from .trainer import StepRecord, TrainResult, Trainer, build_model, run_training, train

__all__ = ["AdamConfig", "GPT", "MODEL_PRESETS", "StepRecord", "TrainConfig", "TrainResult", "Trainer",
           "build_model", "model_spec", "run_training", "train"]
