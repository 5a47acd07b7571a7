"""The README.md (model card) that goes with a converted model.

The card says where the weights came from (the Megatron-LM checkpoint's format, parallel layout and
iteration), what they are (architecture, parameter count, dtype, hyper-parameters) and how the
conversion was checked (e.g. the largest logits difference against Megatron-LM). Its YAML metadata
makes the Hub load it with transformers and list it under the ``ckptkit``, ``megatron-lm`` and
``converted`` tags.

The converter describes the model with a plain dict; only ``architecture`` is required::

    info = {
        "architecture": "GPT2LMHeadModel", "family": "gpt2", "num_parameters": 124439808,
        "dtype": "float32", "ckptkit_version": "0.1.0", "source_format": "megatron-legacy",
        "source_layout": {"tp": 2, "pp": 2, "vpp": 1, "iteration": 10, "checkpoint_version": 3.0,
                          "naming": "mcore-local"},
        "verification": {"logits_max_abs_diff": 1.4e-6, "tokens": 64, "reference": "Megatron-LM logits"},
        "spec": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    }
    write_model_card("gpt2-hf", info)  # writes gpt2-hf/README.md unless one is there
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import BadInput

TAGS = ("ckptkit", "megatron-lm", "converted")

# The generated part of a card sits between these markers, so rebuilding a card that a person has
# edited replaces only that part.
SECTION_BEGIN = "<!-- ckptkit:conversion:begin -->"
SECTION_END = "<!-- ckptkit:conversion:end -->"

SOURCE_LABELS = {
    "layout": "layout", "tp": "tensor parallel (TP)", "pp": "pipeline parallel (PP)",
    "vpp": "virtual pipeline stages (VPP)", "iteration": "iteration", "release": "release checkpoint",
    "checkpoint_version": "checkpoint version", "naming": "parameter naming", "dtype": "dtype",
}
VERIFICATION_LABELS = {
    "logits_max_abs_diff": "max |logits difference|", "tokens": "tokens compared",
    "reference": "reference",
}


def build_model_card(info: dict, existing_readme: str | None = None):
    """A ``huggingface_hub.ModelCard`` describing a converted model.

    With ``existing_readme``, its text and metadata are kept: ckptkit's tags are added to its
    metadata and the conversion section is appended (or replaces the one from an earlier build).

        >>> card = build_model_card({"architecture": "GPT2LMHeadModel",
        ...                          "verification": {"logits_max_abs_diff": 1.4e-6, "tokens": 64}})
        >>> card.data.tags
        ['ckptkit', 'megatron-lm', 'converted']
        >>> "1.4e-06" in card.text
        True
    """
    from huggingface_hub import ModelCard, ModelCardData

    if not info.get("architecture"):
        raise BadInput("model card: info has no 'architecture' (e.g. 'GPT2LMHeadModel')")
    section = f"{SECTION_BEGIN}\n{_conversion_section(info)}{SECTION_END}\n"
    pipeline_tag = "text-generation" if _auto_class(info["architecture"]) == "AutoModelForCausalLM" else None

    if existing_readme is None:
        data = ModelCardData(library_name="transformers", tags=list(TAGS), pipeline_tag=pipeline_tag)
        title = f"# {info.get('family') or info['architecture']} converted from Megatron-LM\n\n"
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{title}{section}")

    # A README without a metadata block gets an empty one (ModelCard would otherwise log a warning).
    if not existing_readme.lstrip().startswith("---"):
        existing_readme = f"---\n{{}}\n---\n{existing_readme}"
    card = ModelCard(existing_readme)
    card.data.library_name = card.data.library_name or "transformers"
    if pipeline_tag and not card.data.pipeline_tag:
        card.data.pipeline_tag = pipeline_tag
    card.data.tags = list(card.data.tags or []) + [tag for tag in TAGS if tag not in (card.data.tags or [])]
    previous = re.compile(re.escape(SECTION_BEGIN) + r".*?" + re.escape(SECTION_END) + r"\n?", re.DOTALL)
    if previous.search(card.text):
        card.text = previous.sub(lambda _: section, card.text, count=1)
    else:
        card.text = card.text.rstrip("\n") + "\n\n" + section
    return card


def write_model_card(dst_dir: str | Path, info: dict, overwrite_readme: bool = False) -> Path | None:
    """Write ``dst_dir/README.md``; keep an existing one unless ``overwrite_readme``.

    Returns the path written, or None when an existing README.md was kept.
    """
    readme = Path(dst_dir) / "README.md"
    if readme.exists() and not overwrite_readme:
        return None
    content = str(build_model_card(info))
    # Written beside the target and renamed, so a README.md is never left half-written.
    handle, partial = tempfile.mkstemp(prefix=".README.md.", dir=readme.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(content)
        os.replace(partial, readme)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return readme


def _conversion_section(info: dict) -> str:
    parts = [_summary(info), "## Source\n\n" + _source_table(info), "## Architecture\n\n" + _architecture_table(info),
             "## Verification\n\n" + _verification(info.get("verification"))]
    return "\n".join(parts)


def _summary(info: dict) -> str:
    what = info["architecture"] + (f" ({info['family']})" if info.get("family") else "")
    source = f" ({info['source_format']})" if info.get("source_format") else ""
    version = f" {info['ckptkit_version']}" if info.get("ckptkit_version") else ""
    text = f"The weights of a {what} converted from a Megatron-LM checkpoint{source} with ckptkit{version}.\n"
    auto_class = _auto_class(info["architecture"])
    if auto_class:
        text += (f"\n```python\nfrom transformers import {auto_class}\n\n"
                 f'model = {auto_class}.from_pretrained("OWNER/NAME")  # this repository, or its local folder\n'
                 "```\n")
    return text


# transformers' Auto class of an architecture, by the end of its name
_AUTO_CLASSES = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                 ("ForPreTraining", "AutoModelForPreTraining"))


def _auto_class(architecture: str) -> str | None:
    """``"MegatronBertForPreTraining"`` -> ``"AutoModelForPreTraining"``; None when unknown."""
    return next((auto for ending, auto in _AUTO_CLASSES if architecture.endswith(ending)), None)


def _source_table(info: dict) -> str:
    rows = []
    if info.get("source_format"):
        rows.append(("format", info["source_format"]))
    for key, value in (info.get("source_layout") or {}).items():
        if _is_scalar(value) and value is not None:
            rows.append((SOURCE_LABELS.get(key, key), value))
    return _table(("field", "value"), rows) if rows else "Not recorded.\n"


def _architecture_table(info: dict) -> str:
    rows = [("architecture", info["architecture"])]
    if info.get("family"):
        rows.append(("family", info["family"]))
    if info.get("num_parameters") is not None:
        rows.append(("parameters", f"{info['num_parameters']:,} ({_short_count(info['num_parameters'])})"))
    if info.get("dtype"):
        rows.append(("dtype", info["dtype"]))
    rows += [(key, value) for key, value in (info.get("spec") or {}).items()
             if _is_scalar(value) and value is not None]
    return _table(("field", "value"), rows)


def _verification(verification: dict | None) -> str:
    if not verification:
        return "No numerical check was recorded for this conversion.\n"
    text = ""
    difference = verification.get("logits_max_abs_diff")
    if difference is not None:
        reference = verification.get("reference", "the source checkpoint's logits")
        tokens = f" over {verification['tokens']} tokens" if verification.get("tokens") is not None else ""
        text += (f"The converted model's logits match {reference}{tokens} to within a maximum absolute "
                 f"difference of **{_number(difference)}**.\n\n")
    rows = [(VERIFICATION_LABELS.get(key, key), value) for key, value in verification.items()
            if _is_scalar(value) and value is not None]
    return text + _table(("check", "value"), rows)


def _table(header: tuple[str, str], rows) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return _number(value).replace("|", "\\|").replace("\n", " ")


def _number(value) -> str:
    """Floats far from 1 in scientific notation with 3 digits (1.4e-06), the rest as Python prints them."""
    if isinstance(value, float) and value != 0 and not 1e-3 <= abs(value) < 1e6:
        return f"{value:.3g}"
    return str(value)


def _short_count(count: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None
