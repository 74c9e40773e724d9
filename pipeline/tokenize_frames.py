"""DVC stage `tokenize`: see tinyworlds/training/tokenize.py.

(Not named tokenize.py: run as a script, it would shadow the standard library module.)
"""

from tinyworlds.params import load_params
from tinyworlds.stage import run_stage
from tinyworlds.training.tokenize import tokenize

if __name__ == "__main__":
    run_stage(lambda: tokenize(load_params()))
