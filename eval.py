"""Evaluate a checkpoint: ``python eval.py ckpt=runs/NAME/checkpoints/last.ckpt [splits=[val,test]]``.

Prints perplexity per split and writes them as JSON (``out=PATH``, default eval.json in the run directory).
"""

import sys

from longctx.cli import evaluate

if __name__ == "__main__":
    evaluate(sys.argv[1:])
