"""Start-up parts on the GPU host: import time of the training path, and a model's load time read straight to the
GPU (`device_map`, tunelab's path) against a load into host memory followed by `.to("cuda")` (the path before).

usage: python bench/load_time.py [--models DIR] [--out FILE] [SHAPE]    (SHAPE: a peer shape, default 1_8b)
Prints one JSON line: {"case": "load_time", "import_s", "load_direct_s", "load_via_host_s", "gpu", "date"}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(code: str) -> float:
    """Seconds a fresh interpreter takes to run `code` (its own process: no module already imported)."""
    out = subprocess.run([sys.executable, "-c", f"import time; t=time.perf_counter(); {code}; "
                          "print(time.perf_counter()-t)"], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="1_8b")
    ap.add_argument("--models", default="/tmp/tl_models")
    ap.add_argument("--out")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from sharded_check import make_model

    folder = make_model(a.shape, Path(a.models))
    load = ("import torch; from tunelab.model.load import load_model; "
            "m = load_model({path!r}, dtype=torch.bfloat16, device=torch.device({dev!r})){to}; "
            "torch.cuda.synchronize()")
    r = {"case": "load_time", "shape": a.shape,
         "import_s": timed("import torch; torch.cuda.init(); import tunelab.train.loop, tunelab.train.setup"),
         "load_direct_s": timed(load.format(path=str(folder), dev="cuda", to="")),
         "load_via_host_s": timed(load.format(path=str(folder), dev="cpu", to=".to('cuda')")),
         "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y%m%d")}
    print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
