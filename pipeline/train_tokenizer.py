"""DVC stage `train_tokenizer`: see tinyworlds/training/train_tokenizer.py.

On `train.nproc` > 1 processes it re-launches itself under torchrun (tinyworlds/training/distributed.py).
"""

from tinyworlds.training.distributed import run_training_stage
from tinyworlds.training.train_tokenizer import train_tokenizer

if __name__ == "__main__":
    run_training_stage(train_tokenizer)
