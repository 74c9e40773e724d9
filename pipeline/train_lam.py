"""DVC stage `train_lam`: see tinyworlds/training/train_lam.py.

On `train.nproc` > 1 processes it re-launches itself under torchrun (tinyworlds/training/distributed.py).
"""

from tinyworlds.training.distributed import run_training_stage
from tinyworlds.training.train_lam import train_lam

if __name__ == "__main__":
    run_training_stage(train_lam)
