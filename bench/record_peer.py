"""Copy the peer's JSON lines (stdin) to stdout and to a results file in the bench/results format:
impl "peer", the case name as given, the GPU and the date. usage: peer_baseline.py CASE | record_peer.py CASE FILE"""

import json
import sys
import time

case, out = sys.argv[1], sys.argv[2]
gpu = None
for line in sys.stdin:
    print(line, end="", flush=True)
    if not line.startswith("{"):
        continue
    rec = json.loads(line)
    if "gpu" in rec and "case" not in rec:  # the header line: versions and the measured matmul rate
        gpu = rec["gpu"]
        continue
    rec.update(impl="peer", peer_case=rec.get("case"), case=rec.get("case", case) if "/" not in str(rec.get("case"))
               else case, gpu=gpu, date=time.strftime("%Y-%m-%d"))
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
