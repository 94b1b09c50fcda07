"""Where a model load's seconds go on the GPU host: cProfile of `load_model` for a saved random-weight model of a
peer shape (after a first load, so imports are not counted), top functions by own time and by cumulative time.

usage: python bench/load_profile.py [--models DIR] [SHAPE] > profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="1_8b")
    ap.add_argument("--models", default="/tmp/tl_models")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from sharded_check import make_model

    from tunelab.model.load import load_model

    folder = str(make_model(a.shape, Path(a.models)))
    cuda = torch.device("cuda")
    t = time.perf_counter()
    del_me = load_model(folder, dtype=torch.bfloat16, device=cuda)
    torch.cuda.synchronize()
    print(f"first load (transformers and CUDA already used by make_model): {time.perf_counter() - t:.2f} s")
    del del_me
    torch.cuda.empty_cache()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    model = load_model(folder, dtype=torch.bfloat16, device=cuda)
    torch.cuda.synchronize()
    prof.disable()
    print(f"second load: {time.perf_counter() - t:.2f} s, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
