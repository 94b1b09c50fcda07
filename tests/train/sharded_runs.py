"""Several training runs in one torchrun launch, so a test pays the processes' start-up once:

    torchrun --nproc_per_node N tests/train/sharded_runs.py JOBS.json

JOBS.json: [{"config": PATH, "work_dir": PATH, "overrides": ["train.strategy=zero3", ...]}, ...]. The process
group is started here, so each run joins it instead of starting its own.
"""

import gc
import json
import sys
from pathlib import Path

import torch.distributed as dist

from tunelab.config.load import load_config
from tunelab.train.loop import train


def main() -> None:
    dist.init_process_group("gloo")
    for job in json.loads(Path(sys.argv[1]).read_text()):
        train(load_config(job["config"], job["overrides"]), "tiny", work_dir=Path(job["work_dir"]))
    gc.collect()  # nothing may hold the group when it goes (see parallel.teardown)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
