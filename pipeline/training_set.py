"""DVC stage `training_set`: see tinyworlds/data/training_set.py."""

from tinyworlds.core.params import load_params
from tinyworlds.core.stage import run_stage
from tinyworlds.data.training_set import write_training_set

if __name__ == "__main__":
    run_stage(lambda: print(f"training_set: {', '.join(write_training_set(load_params())['datasets'])}"))
