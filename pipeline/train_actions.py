"""DVC stage `train_actions`: see tinyworlds/training/train_actions.py."""

from tinyworlds.params import load_params
from tinyworlds.stage import run_stage
from tinyworlds.training.train_actions import train_actions

if __name__ == "__main__":
    run_stage(lambda: train_actions(load_params()))
