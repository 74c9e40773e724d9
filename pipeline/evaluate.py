"""DVC stage `evaluate`: see tinyworlds/evaluation/evaluate.py."""

from tinyworlds.core.params import load_params
from tinyworlds.core.stage import run_stage
from tinyworlds.evaluation.evaluate import evaluate

if __name__ == "__main__":
    run_stage(lambda: evaluate(load_params()))
