"""DVC stage `train_actions`: see tinyworlds/training/train_actions.py.

On `train.nproc` > 1 processes it re-launches itself under torchrun (tinyworlds/training/distributed.py).
"""

from tinyworlds.training.distributed import run_training_stage
from tinyworlds.training.train_actions import train_actions

if __name__ == "__main__":
    run_training_stage(train_actions)
