"""Each process prepares a run's data the way train/setup.py does, and writes whether its rows came from the
node's cache:

    torchrun --nproc_per_node 3 tests/train/data_once.py CONFIG OUT_DIR

The first process of the node tokenises and fills the cache while the others wait; they then read the cache.
"""

import sys
from pathlib import Path

import torch

from tunelab.config.load import load_config
from tunelab.data.dataset import prepare_data
from tunelab.model.load import load_tokenizer, resolve_model_path
from tunelab.train import parallel

cfg = load_config(sys.argv[1])
out = Path(sys.argv[2])
par = parallel.setup("ddp", torch.device("cpu"))
tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
with parallel.node_leader_first(par):
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
(out / f"rank{par.rank}.txt").write_text(f"{data.from_cache} {len(data.rows)}")
parallel.teardown(par)
