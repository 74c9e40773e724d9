"""DVC stage `train_tokenizer`: see tinyworlds/training/train_tokenizer.py."""

from tinyworlds.params import load_params
from tinyworlds.stage import run_stage
from tinyworlds.training.train_tokenizer import train_tokenizer

if __name__ == "__main__":
    run_stage(lambda: train_tokenizer(load_params()))
