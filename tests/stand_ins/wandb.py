"""A stand-in for Weights & Biases, on the PYTHONPATH of the tests' reference runs: `wandb.init` records the
arguments it was called with in `wandb-calls.jsonl` in the working directory, one line per call."""

import json


def init(**arguments):
    with open("wandb-calls.jsonl", "a") as calls:
        calls.write(json.dumps(arguments, default=str) + "\n")
