"""``python -m ckptkit.train`` (or ``torchrun ... -m ckptkit.train``): the ``ckptkit train`` command."""
from .command import train

if __name__ == "__main__":
    train(prog_name="python -m ckptkit.train")
