"""What each process of a sharded run chooses for speed, when the processes see different free memory:

    torchrun --nproc_per_node 2 tests/train/speed_plans.py CONFIG OUT_DIR

Rank 0 sees plenty of host memory, the others almost none (as when rank 0 alone holds the weights, or another
program takes memory while the run starts). Each process builds the model as a run does and writes the speed
plan it chose to OUT_DIR/rank<N>.txt.
"""

import sys
from pathlib import Path

import psutil
import torch

from tunelab.config.load import load_config
from tunelab.model.load import resolve_model_path
from tunelab.train import parallel
from tunelab.train.log import RunLogger
from tunelab.train.setup import _build_model

AVAILABLE = {0: 1e12}  # bytes of free host memory each rank sees; other ranks: 2 MB
_real = psutil.virtual_memory


def _seen(rank: int):
    return lambda: _real()._replace(available=AVAILABLE.get(rank, 2e6))


def main() -> None:
    cfg = load_config(sys.argv[1], ["train.strategy=zero3", "model.gradient_checkpointing=auto"])
    out = Path(sys.argv[2])
    par = parallel.setup(cfg.train.strategy, torch.device("cpu"))
    psutil.virtual_memory = _seen(par.rank)
    try:
        built = _build_model(cfg, par, resolve_model_path(cfg.model.path), torch.float32,
                             RunLogger(out / "log", enabled=False))
        (out / f"rank{par.rank}.txt").write_text(built.speed.describe())
        del built
    finally:
        parallel.teardown(par)


if __name__ == "__main__":
    main()
