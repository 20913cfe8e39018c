"""Peak resident memory of training steps, against the estimate of `inspect` (one measurement a process):

    OMP_NUM_THREADS=1 python bench/peak_train_memory.py specs/flowpp_cifar.flow 8 fp32 on [STEPS]

Builds, initialises on 2 random images, then runs STEPS (2) `Updater` steps (Adam, EMA, clipping) on
random images at the batch, with the malloc tuning, autocast and recompute calls of `train`. Prints JSON:
the peak resident size (VmHWM) less the resident size after imports, and the estimate, in bytes."""

import argparse
import json
from pathlib import Path

import torch

import flowspec
from flowspec.allocator import keep_freed_memory
from flowspec.devices import status_bytes
from flowspec.inspection.budget import measure, training_bytes
from flowspec.train.distributed import Dist
from flowspec.train.precision import autocast_dtype
from flowspec.train.update import Updater

parser = argparse.ArgumentParser(description="Peak resident memory of training steps, against the estimate.")
parser.add_argument("spec", help="the .flow file")
parser.add_argument("batch", type=int, help="images a step")
parser.add_argument("precision", choices=("fp32", "bf16"))
parser.add_argument("recompute", choices=("on", "off"))
parser.add_argument("steps", type=int, nargs="?", default=2, help="training steps measured (default 2)")
args = parser.parse_args()
spec_path, batch, precision, steps = args.spec, args.batch, args.precision, args.steps
recompute = args.recompute == "on"
torch.set_num_threads(1)
keep_freed_memory()
spec = flowspec.load_spec(spec_path, overrides=(f"train.batch={batch}", "train.init_batch=2"))
size = measure(spec)
base = status_bytes("VmRSS")
torch.manual_seed(0)
model = flowspec.build(spec)
shape = spec.data.shape
model.initialize(torch.randint(0, spec.data.levels, (2, *shape), dtype=torch.uint8))
model.set_autocast(autocast_dtype(precision))
model.set_recompute(recompute)
dist = Dist()
updater = Updater(model, spec.train, 1000, dist, torch.device("cpu"))
after_setup = status_bytes("VmRSS") - base
for _ in range(steps):
    x = torch.randint(0, spec.data.levels, (batch, *shape), dtype=torch.uint8)
    updater(x)
print(
    json.dumps(
        dict(
            spec=Path(spec_path).stem,
            batch=batch,
            precision=precision,
            recompute=recompute,
            measured=status_bytes("VmHWM") - base,
            setup=after_setup,
            estimate=training_bytes(size, spec, 1, recompute, precision),
            per_image=size.per_image,
            params=size.parameters,
        )
    )
)
