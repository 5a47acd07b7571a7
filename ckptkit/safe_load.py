"""Load ``torch.save`` files without executing code hidden in them.

Megatron's ``model_optim_rng.pt`` pickles more than tensors: ``argparse.Namespace``
(the training args), numpy RNG state, ``signal.Signals`` and Megatron's own enums
(``megatron.core.transformer.enums.AttnBackend``, ``megatron.core.enums.ModelType``,
...). ``torch.load(weights_only=True)`` refuses all of them by default, and a plain
unpickle would need Megatron installed and would run whatever a hostile file names.

We load with ``weights_only=True`` and an explicit allow-list:

* harmless standard-library and numpy types (listed in ``HARMLESS_GLOBALS``);
* every ``megatron.*`` global is replaced by an inert :class:`MegatronStandIn` that
  only records the name and the value it was built with. Megatron code never runs.

Anything else is refused with :class:`~ckptkit.errors.BadInput` naming the file and
the global, unless the caller passes ``trust_remote_pickle=True``.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import os
import signal
import warnings
import zipfile
from pathlib import Path

import numpy
import torch

from .errors import BadInput


class MegatronStandIn:
    """Inert replacement for a Megatron enum or class found in a pickle.

    ``megatron.core.transformer.enums.AttnBackend(5)`` unpickles as a stand-in whose
    ``qualified_name`` is that dotted name and whose ``value`` is ``5``.
    """

    qualified_name = "megatron.?"

    def __init__(self, *args, **kwargs):
        self.value = args[0] if len(args) == 1 else args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.qualified_name}: {self.value!r}>"

    def __reduce__(self):
        # Re-saving a stand-in writes the value only, never a Megatron reference.
        return (_identity, (self.value,))


def _identity(value):
    return value


def _numpy_globals():
    multiarray = getattr(numpy, "_core", None) or numpy.core
    found = [multiarray.multiarray._reconstruct, numpy.ndarray, numpy.dtype]
    # numpy>=1.25 pickles dtypes through their concrete DType classes.
    dtypes = getattr(numpy, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    # Files written with numpy 1.x name numpy.core; map it onto numpy 2's object.
    aliases = [(multiarray.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    return found, aliases


def _harmless_globals():
    numpy_found, numpy_aliases = _numpy_globals()
    return [argparse.Namespace, signal.Signals, codecs.encode, collections.OrderedDict,
            *numpy_found, *numpy_aliases, (_identity, "ckptkit.safe_load._identity")]


HARMLESS_GLOBALS = _harmless_globals()


def _stand_in_for(qualified_name: str):
    return type(qualified_name.rsplit(".", 1)[-1], (MegatronStandIn,),
                {"qualified_name": qualified_name})


def pickled_globals(path: str | os.PathLike) -> list[str]:
    """Dotted names of every global the file's pickle refers to, none allowed yet."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as error:
        raise BadInput(f"{path}: not a readable torch checkpoint ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = True,
                    trust_remote_pickle: bool = False, map_location: str = "cpu"):
    """``torch.load`` a checkpoint file with ``weights_only=True`` and our allow-list.

    >>> state = safe_torch_load("iter_0000010/mp_rank_00_000/model_optim_rng.pt")
    >>> state["args"].tensor_model_parallel_size
    2
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: file is empty (zero bytes)")
    if trust_remote_pickle:
        warnings.warn(f"{path}: loading with full unpickling (--trust-remote-pickle): "
                      "code inside this file can run", stacklevel=2)
        return _load(path, mmap, weights_only=False, map_location=map_location)
    unknown = pickled_globals(path)
    harmless_names = {_dotted(entry) for entry in HARMLESS_GLOBALS}
    stand_ins, refused = [], []
    for name in unknown:
        if name in harmless_names:
            continue
        if name.startswith("megatron."):
            stand_ins.append((_stand_in_for(name), name))
        else:
            refused.append(name)
    if refused:
        raise BadInput(f"{path}: refuses to unpickle disallowed global {refused[0]!r} "
                       "(it could run code; pass --trust-remote-pickle only for files you trust)")
    with torch.serialization.safe_globals(HARMLESS_GLOBALS + stand_ins):
        return _load(path, mmap, weights_only=True, map_location=map_location)


def _dotted(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def _load(path: Path, mmap: bool, weights_only: bool, map_location: str = "cpu"):
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=weights_only)
    except RuntimeError as error:
        if mmap and "mmap" in str(error):
            # Files from torch<1.6 (non-zip) cannot be memory-mapped.
            return torch.load(path, map_location=map_location, weights_only=weights_only)
        raise BadInput(f"{path}: cannot load ({_first_line(error)})") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        raise BadInput(f"{path}: cannot load ({_first_line(error)})") from None
    except Exception as error:  # pickle.UnpicklingError and friends from hostile files
        raise BadInput(f"{path}: cannot load ({_first_line(error)})") from None


def without_stand_ins(value):
    """``value`` with Megatron stand-ins replaced by their plain values, at any depth.

    Stand-ins re-pickle as a ckptkit function, which Megatron could not unpickle
    without ckptkit installed; Megatron reads none of these enum fields back from
    checkpoint args, so writers store the plain values.
    """
    if isinstance(value, MegatronStandIn):
        return value.value
    if isinstance(value, argparse.Namespace):
        return argparse.Namespace(**{name: without_stand_ins(item) for name, item in vars(value).items()})
    if type(value) in (list, tuple):
        return type(value)(without_stand_ins(item) for item in value)
    if type(value) is dict:
        return {key: without_stand_ins(item) for key, item in value.items()}
    return value
