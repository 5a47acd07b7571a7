"""Local fixes to a copy of Megatron-LM d98e8a6 so that it resumes the distributed optimizer
with PyTorch's Adam (neither Transformer Engine nor apex on the machines used here):

    python3 tools/megatron_local_fixes.py MEGATRON_COPY [--step-fix]

1. ``state_dict()`` before the optimizer's first step: its state is empty, so there is no step
   yet (Megatron asserts one).
2. Loading parameter state: torch Adam's own state holds ``step``, which ``distrib_optim.pt``
   does not.

With ``--step-fix``, two more (they change Megatron's numbers, see docs/optimizer.md):

3. ``load_state_dict``: each parameter its own step (one shared tensor is advanced once per
   parameter by torch's AdamW).
4. torch_dist (``dp_reshardable``): the parameter state loaded from the checkpoint carries the
   ``step`` tensor of the optimizer as it was before loading (a ``LocalNonpersistentObject``:
   0 after fix 1), which ``_set_main_param_and_optimizer_states`` copied over the loaded step.

Each fix must match its code exactly once, or nothing is written and the exit code is 1.
"""
import sys
from pathlib import Path

FILE = "megatron/core/optimizer/distrib_optimizer.py"
FIXES = [
    ("            assert len(steps) == 1\n            step = steps[0]\n",
     "            assert len(steps) <= 1\n            step = steps[0] if steps else 0\n"),
    ("                if not isinstance(tensors[key], torch.Tensor):\n",
     "                if not isinstance(tensors.get(key), torch.Tensor):\n"),
]
STEP_FIXES = [
    ('                s["step"] = step\n', '                s["step"] = step.clone()\n'),
    ("                if not isinstance(tensors.get(key), torch.Tensor):\n",
     "                if key == \"step\" or not isinstance(tensors.get(key), torch.Tensor):\n"),
]


def main(argv: list[str]) -> int:
    path = Path(argv[0]) / FILE
    text = path.read_text()
    fixes = FIXES + (STEP_FIXES if "--step-fix" in argv[1:] else [])
    for old, new in fixes:
        if text.count(old) != 1:
            print(f"{path}: the code to fix was not found once: {old!r}", file=sys.stderr)
            return 1
        text = text.replace(old, new)
    path.write_text(text)
    print("applied", len(fixes), "fixes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
