"""DVC stage `tokenize`: see tinyworlds/inference/tokens.py.

(Not named tokenize.py: run as a script, it would shadow the standard library module.)
"""

from tinyworlds.core.params import load_params
from tinyworlds.core.stage import run_stage
from tinyworlds.inference.tokens import tokenize

if __name__ == "__main__":
    run_stage(lambda: tokenize(load_params()))
