"""Megatron-LM's own pretrain_gpt.py, run after tools/megatron_deepseek_local.py lets the local
layer spec build multi-latent attention (see there). Same command line as pretrain_gpt.py:

    MEGATRON_PATH=/path/to/Megatron-LM torchrun --nproc-per-node 2 \
        tools/megatron_deepseek_pretrain.py --multi-latent-attention ... --transformer-impl local
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ["MEGATRON_PATH"])

from megatron_deepseek_local import build_without_transformer_engine  # noqa: E402

build_without_transformer_engine()
runpy.run_path(os.path.join(os.environ["MEGATRON_PATH"], "pretrain_gpt.py"), run_name="__main__")
