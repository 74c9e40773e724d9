"""DVC stage `evaluate`: see tinyworlds/evaluation/evaluate.py."""

from tinyworlds.evaluation.evaluate import evaluate
from tinyworlds.params import load_params
from tinyworlds.stage import run_stage

if __name__ == "__main__":
    run_stage(lambda: evaluate(load_params()))
