"""What each process of a several-process run (zero3 by default) chooses for speed, when the processes see
different free memory:

    torchrun --nproc_per_node 2 tests/train/speed_plans.py CONFIG OUT_DIR [--bf16-on-rank-1] [--strategy NAME]

Rank 0 sees plenty of host memory, the others almost none (as when rank 0 alone holds the weights, or another
program takes memory while the run starts). Each process builds the model as a run does and writes the speed
plan it chose, or the error that stopped it, to OUT_DIR/rank<N>.txt. --bf16-on-rank-1: rank 1 computes in
bfloat16 (as on a node whose hardware lacks what the others have). --strategy: train.strategy (default zero3).
Each process also writes OUT_DIR/rank<N>.sharded: whether the set-up told the speed plan that the weights are
sharded.
"""

import sys
from pathlib import Path

import psutil
import torch

from tunelab.config.load import load_config
from tunelab.errors import TrainingError
from tunelab.model.load import resolve_model_path
from tunelab.train import parallel, setup
from tunelab.train.log import RunLogger
from tunelab.train.setup import _build_model

AVAILABLE = {0: 1e12}  # bytes of free host memory each rank sees; other ranks: 2 MB
_real = psutil.virtual_memory


def _seen(rank: int):
    return lambda: _real()._replace(available=AVAILABLE.get(rank, 2e6))


def main() -> None:
    strategy = sys.argv[sys.argv.index("--strategy") + 1] if "--strategy" in sys.argv else "zero3"
    cfg = load_config(sys.argv[1], [f"train.strategy={strategy}", "model.gradient_checkpointing=auto"])
    out = Path(sys.argv[2])
    par = parallel.setup(cfg.train.strategy, torch.device("cpu"))
    plan = setup.prepare_for_training

    def heard(*args, **kwargs):
        (out / f"rank{par.rank}.sharded").write_text(str(kwargs["sharded"]))
        return plan(*args, **kwargs)

    setup.prepare_for_training = heard
    psutil.virtual_memory = _seen(par.rank)
    dtype = torch.bfloat16 if par.rank == 1 and "--bf16-on-rank-1" in sys.argv else torch.float32
    try:
        built = _build_model(cfg, par, resolve_model_path(cfg.model.path), dtype, RunLogger(out / "log", enabled=False))
        (out / f"rank{par.rank}.txt").write_text(built.speed.describe())
        del built
    except TrainingError as e:
        (out / f"rank{par.rank}.txt").write_text(f"error: {e}")
    finally:
        parallel.teardown(par)


if __name__ == "__main__":
    main()
