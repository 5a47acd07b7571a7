"""Local fixes to a copy of a 2024 Megatron-LM (fd5cfec0ba, with megatron/legacy/) so that its
pre-Core BERT (--use-legacy-models) trains on a machine with neither apex nor Transformer Engine:

    python3 tools/megatron_encoder_legacy_fixes.py MEGATRON_COPY

1. ``MixedFusedLayerNorm`` (megatron/legacy/model/fused_layer_norm.py) imports apex's
   ``fused_layer_norm_cuda`` in its constructor and calls apex's ``fused_layer_norm_affine`` in
   forward; both become ``torch.nn.functional.layer_norm``, the same function of the same
   parameters (weight, bias, eps; ``weight + 1`` under --apply-layernorm-1p is kept).
2. megatron/core/models/bert/bert_layer_specs.py builds its Transformer Engine spec at import
   (pretrain_bert.py imports it even for the legacy model); without Transformer Engine the
   three TE class names are undefined there (NameError), so they are set to None: the spec
   object is built but never used.
3. ``torch.load`` of the per-rank files (megatron/training/checkpointing.py) passes
   ``weights_only=False``: torch 2.6 made True the default, and these files pickle
   argparse.Namespace and Megatron's enums.
4. ``from pkg_resources import packaging`` in the modules a BERT run imports: setuptools 81
   dropped pkg_resources.
5. tools/checkpoint/convert.py's Megatron loader and saver build the models with
   ``--no-gradient-accumulation-fusion`` too (that fusion is an apex extension).
6. ``fused_kernels.load`` (megatron/legacy/fused_kernels/__init__.py) runs nvcc to find the CUDA
   version although that version builds no kernel any more; it returns at once instead.

Each fix must match its code exactly once (or the stated number of times), or nothing is
written and the exit code is 1.
"""
import sys
from pathlib import Path

# setuptools 81 dropped pkg_resources; ``import packaging.version`` binds the same ``packaging``.
PKG_RESOURCES = ("from pkg_resources import packaging\n", "import packaging.version\n")
NO_APEX_FUSION = ("                '--no-bias-dropout-fusion',\n",
                  "                '--no-bias-dropout-fusion',\n                '--no-gradient-accumulation-fusion',\n")
FIXES = {
    "megatron/core/tensor_parallel/random.py": [PKG_RESOURCES],
    "megatron/core/transformer/attention.py": [PKG_RESOURCES],
    "megatron/core/dist_checkpointing/strategies/torch.py": [PKG_RESOURCES],
    "megatron/legacy/model/transformer.py": [PKG_RESOURCES],
    "megatron/core/models/retro/config.py": [PKG_RESOURCES],
    # torch 2.6 made weights_only=True the default of torch.load; these files pickle
    # argparse.Namespace and Megatron's enums. Three reads of the per-rank files.
    "megatron/training/checkpointing.py": [
        ("torch.load(checkpoint_name, map_location='cpu')",
         "torch.load(checkpoint_name, map_location='cpu', weights_only=False)", 3),
    ],
    "megatron/legacy/model/fused_layer_norm.py": [
        ('        fused_layer_norm_cuda = importlib.import_module("fused_layer_norm_cuda")\n',
         "        fused_layer_norm_cuda = None\n"),
        ("        assert fused_layer_norm_affine is not None, \\\n"
         '            "fused_layer_norm_affine is not available, please install apex from https://github.com/NVIDIA/apex"\n'
         "        return fused_layer_norm_affine(input, weight, self.bias, self.normalized_shape, eps=self.eps)\n",
         "        return torch.nn.functional.layer_norm(input, self.normalized_shape, weight, self.bias, self.eps)\n"),
    ],
    "megatron/core/models/bert/bert_layer_specs.py": [
        ("except ImportError:\n    HAVE_TE = False\n",
         "except ImportError:\n    HAVE_TE = False\n"
         "    TEDotProductAttention = TELayerNormColumnParallelLinear = TERowParallelLinear = None\n"),
    ],
    # The converter builds the models from its own argument list, where gradient accumulation
    # fusion (an apex extension) is on by default.
    "tools/checkpoint/loader_megatron.py": [NO_APEX_FUSION],
    "tools/checkpoint/saver_megatron.py": [NO_APEX_FUSION],
    "megatron/legacy/fused_kernels/__init__.py": [
        ("def load(args):\n", "def load(args):\n    return\n"),
    ],
}


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    patched = {}
    for name, fixes in FIXES.items():
        text = (root / name).read_text()
        for old, new, *times in fixes:
            expected = times[0] if times else 1
            if text.count(old) != expected:
                print(f"{root / name}: the code to fix was not found {expected} time(s): {old!r}", file=sys.stderr)
                return 1
            text = text.replace(old, new)
        patched[name] = text
    for name, text in patched.items():
        (root / name).write_text(text)
    print("applied", sum(len(fixes) for fixes in FIXES.values()), "fixes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
