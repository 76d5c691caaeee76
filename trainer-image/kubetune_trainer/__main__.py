"""The trainer image's entry point: `python -m kubetune_trainer [CONFIG]`.

Reads the TrainerConfig the operator mounted (default wire.CONFIG_PATH), serves Prometheus
metrics on its port, runs the pipeline, writes the compact result to the termination message
path and exits with the result's code (process.py). A distributed run starts through
`python -m kubetune_trainer.launch`, whose processes each run `process.run_process`.
"""

from __future__ import annotations

import sys

from kubetune_trainer.process import main

if __name__ == "__main__":
    sys.exit(main())
