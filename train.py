"""Train a model: ``python train.py [experiment=NAME] [GROUP=NAME ...] [key.path=VALUE ...] [seqlen=N]``.

With no arguments: the tiny GPT-2 on the offline Shakespeare corpus (CPU is fine). See README.md.
"""

import sys

from longctx.cli import train

if __name__ == "__main__":
    train(sys.argv[1:])
