"""TensorBoard logs of a run (optional, `--tensorboard`): the evaluation rows as scalars and the sample
grids as images, in `RUN_DIR/tensorboard`, beside `metrics.jsonl`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flowspec.errors import UserError

FOLDER = "tensorboard"


def require_tensorboard() -> None:
    """A `UserError` unless the tensorboard package is installed (checked before a run reads its data)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install 'flowspec[tensorboard]' (or pip install tensorboard)"
        ) from None


class TensorBoard:
    """A `SummaryWriter` into `run_dir/tensorboard`, for a run (re)starting at `step`: what came after it
    is dropped (a resumed run writes it again), and with `again` what came at `step` too (the evaluation
    of a --max-steps or --max-time stop, which the run leaves out when training goes on)."""

    def __init__(self, run_dir: Path, step: int = 0, again: bool = False):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        purge = step if again else step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / FOLDER), purge_step=purge if step else None)

    def train(self, step: int, bpd: float) -> None:
        """The latest training bits/dim, at a logging step."""
        if math.isfinite(bpd):
            self.writer.add_scalar("train/bpd_latest", bpd, step)

    def evaluation(self, row: dict[str, Any], grids: dict[float, Path]) -> None:
        """Every number of a `metrics.jsonl` row as `train/`, `test/` or `run/` scalars, and the grids."""
        import numpy as np
        from PIL import Image

        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                group, _, name = (
                    key.partition("_") if key.startswith(("train_", "test_")) else ("run", "", key)
                )
                self.writer.add_scalar(f"{group}/{name}", value, step)
        for temperature, path in grids.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"samples/T={temperature}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
