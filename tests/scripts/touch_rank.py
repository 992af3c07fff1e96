"""torchrun's launcher-test script, torch-free: OUTDIR/<RANK>.json records the worker's view
(torchrun's environment and argv). A second argument `fail` exits 3 after that; `hold`
waits to be stopped."""

import json
import os
import signal
import sys

outdir = sys.argv[1]
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_NAME",
         "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "ELASTIC_NODE_ID")
view = {name: os.environ.get(name) for name in names}
view["argv"] = sys.argv[1:]
view["name"] = __name__
view["pid"] = os.getpid()
view["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
path = os.path.join(outdir, f"{os.environ['RANK']}.json")
with open(path + ".tmp", "w") as f:
    json.dump(view, f)
os.rename(path + ".tmp", path)  # whole, for a test that waits for it
if sys.argv[2:3] == ["fail"]:
    sys.exit(3)
if sys.argv[2:3] == ["hold"]:
    signal.pause()
