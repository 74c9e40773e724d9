"""DVC stage `train_dynamics`: see tinyworlds/training/train_dynamics.py."""

from tinyworlds.params import load_params
from tinyworlds.stage import run_stage
from tinyworlds.training.train_dynamics import train_dynamics

if __name__ == "__main__":
    run_stage(lambda: train_dynamics(load_params()))
