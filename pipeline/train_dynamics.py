"""DVC stage `train_dynamics`: see tinyworlds/training/train_dynamics.py.

On `train.nproc` > 1 processes it re-launches itself under torchrun (tinyworlds/training/distributed.py).
"""

from tinyworlds.training.distributed import run_training_stage
from tinyworlds.training.train_dynamics import train_dynamics

if __name__ == "__main__":
    run_training_stage(train_dynamics)
