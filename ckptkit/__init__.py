"""ckptkit: convert and reshard LLM checkpoints between Megatron-LM and Hugging Face.

The library API is four functions returning typed results; the ``ckptkit`` command line
is a thin layer over them.

>>> import ckptkit
>>> ckptkit.inspect("checkpoints/gpt2").layout["tp"]
2
>>> ckptkit.convert("checkpoints/gpt2", "gpt2-hf", to="hf", dtype="bf16").files[:1]
['model.safetensors']
>>> ckptkit.reshard("checkpoints/gpt2", "gpt2-tp1pp3", tp=1, pp=3).target_layout["pp"]
3
>>> ckptkit.verify("checkpoints/gpt2", "gpt2-tp1pp3").equivalent
True
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "inspect", "convert", "reshard", "verify"]

import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _Package(_types.ModuleType):
    """The ``ckptkit`` package, whose function ``convert`` shares its name with the
    submodule ``ckptkit.convert``.

    Python binds a submodule as an attribute of its package when it is first imported,
    which would replace the function. The submodule is imported lazily (it imports torch:
    a second that ``ckptkit --help`` does not need), so that binding is refused here
    instead; ``import ckptkit.convert`` and ``sys.modules`` still give the module.
    """

    def __setattr__(self, name, value):
        if name == "convert" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def inspect(path, **options):
    """Describe a checkpoint of any supported layout without reading tensor data.

    Returns an :class:`ckptkit.inspection.InspectResult`: ``layout`` (format, TP/PP/VPP,
    iteration, checkpoint_version, naming, dtype), ``family``, ``architecture``, ``spec``
    (hyper-parameters), ``num_parameters`` and ``tensors`` (each canonical tensor's
    shape, partition rule and per-rank shape).

    >>> info = ckptkit.inspect("checkpoints/gpt2")
    >>> info.family, info.layout["tp"], info.layout["pp"], info.num_parameters
    ('gpt2', 2, 2, 773376)
    """
    from .inspection import inspect_checkpoint

    return inspect_checkpoint(path, **options)


def convert(source, destination, *, to: str, tp: int = 1, pp: int = 1, vpp: int = 1, dtype=None,
            progress=None, **options):
    """Convert ``source`` into ``destination``; ``to="hf"`` or ``to="megatron"``.

    ``to="hf"``: any Megatron layout (per-rank files, torch_dist, .zip) -> Hugging Face
    folder; options ``max_shard_size="5GB"``, ``tokenizer=DIR``, ``vocab_size``.
    ``to="megatron"``: a Hugging Face folder -> Megatron at ``tp``/``pp``/``vpp``; options
    ``format="torch"|"torch_dist"``, ``naming="mcore-local"|"mcore-te"|"legacy"``,
    ``make_vocab_size_divisible_by=128``. Both take ``overwrite``, ``strict``,
    ``trust_remote_pickle``, and ``progress``: a callable receiving each canonical tensor
    name as it is written (nothing is printed by the library).

    Returns a :class:`ckptkit.convert.ConvertResult` (files written, bytes, seconds,
    source and target layouts, notes such as dropped optimizer state).

    >>> result = ckptkit.convert("hf/llama", "llama-tp2pp2", to="megatron", tp=2, pp=2, dtype="bf16")
    >>> result.target_layout["tp"], len(result.files)  # 4 rank files and the tracker
    (2, 5)
    """
    import importlib

    from .errors import BadInput

    conversions = importlib.import_module(f"{__name__}.convert")  # the submodule, not this function
    if to == "hf":
        return conversions.megatron_to_hf(source, destination, dtype=dtype, progress=progress, **options)
    if to == "megatron":
        return conversions.hf_to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, dtype=dtype,
                                          progress=progress, **options)
    raise BadInput(f"convert: to={to!r}; expected 'hf' or 'megatron'")


def reshard(source, destination, *, tp: int, pp: int, vpp: int = 1, progress=None, **options):
    """Rewrite a Megatron checkpoint at other parallel sizes, keeping iteration and args.

    Weights are bit-identical; optimizer and RNG state belong to the old layout and are
    dropped (``result.notes`` says so). Options: ``format`` (default: the source's),
    ``naming``, ``dtype``, ``make_vocab_size_divisible_by``, ``overwrite``, ``strict``.

    >>> ckptkit.reshard("checkpoints/gpt2", "gpt2-tp2pp1", tp=2, pp=1).target_layout["pp"]
    1
    """
    from .convert import reshard as reshard_checkpoint

    return reshard_checkpoint(source, destination, tp=tp, pp=pp, vpp=vpp, progress=progress, **options)


def verify(a, b=None, *, atol: float = 0.0, ignore_dtype: bool = False, **options):
    """Compare two checkpoints of any layouts tensor by tensor (``b=None``: check ``a`` alone).

    Returns a :class:`ckptkit.verification.VerifyResult` whose ``equivalent`` is True
    only for the same architecture, tensor set, shapes, dtypes (unless ``ignore_dtype``)
    and values within ``atol`` (0: bit-identical); ``tensors`` has one row per tensor.

    >>> _ = ckptkit.convert("checkpoints/gpt2", "gpt2-fp32-hf", to="hf")
    >>> ckptkit.verify("checkpoints/gpt2", "gpt2-fp32-hf").equivalent
    True
    """
    from .verification import verify as verify_checkpoints

    return verify_checkpoints(a, b, atol=atol, ignore_dtype=ignore_dtype, **options)
