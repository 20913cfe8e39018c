"""The examples each command's `--help` ends with (the tests parse every one of them)."""

from __future__ import annotations

EXAMPLES: dict[str, tuple[str, ...]] = {
    "specs": (
        "flowspec specs",
        "flowspec specs my-specs",
    ),
    "validate": (
        "flowspec validate specs/*.flow specs/ablations/*.flow",
        "flowspec validate specs/quickstart.flow --set defaults.coupling.heads=8",
    ),
    "show": (
        "flowspec show specs/ablations/affine_coupling.flow",
        "flowspec show specs/flowpp_cifar.flow --format json --set train.lr=1e-3",
    ),
    "inspect": (
        "flowspec inspect specs/flowpp_cifar.flow --depth 1",
        "flowspec inspect specs/quickstart.flow --format md --set defaults.coupling.filters=32",
        "flowspec inspect specs/quickstart.flow --probe --batch 4 --threads 1",
    ),
    "diff": (
        "flowspec diff specs/flowpp_cifar.flow specs/ablations/uniform_dequant.flow",
        "flowspec diff specs/quickstart.flow --set defaults.coupling.attention=off",
    ),
    "train": (
        "flowspec train specs/quickstart.flow --out runs/quickstart",
        "flowspec train specs/flowpp_cifar.flow --data ../shared/data/cifar10 --device cuda --precision bf16",
        "flowspec train specs/quickstart.flow --set train.lr=1e-3 --max-steps 200 --threads 1",
        "flowspec train --resume runs/quickstart --max-time 30m",
    ),
    "eval": (
        "flowspec eval runs/quickstart --iw 16",
        "flowspec eval runs/quickstart --split train --limit 256 --batch 64 --out train_eval.json",
        "flowspec eval runs/quickstart --set data.classes=3 --seed 1",
    ),
    "sample": (
        "flowspec sample runs/quickstart -n 64 --temperature 0.8 --out grid.png --seed 0",
        "flowspec sample runs/quickstart/best.pt -n 16 --set model=quickstart_best --device cpu",
    ),
    "export": (
        "flowspec export runs/quickstart",
        "flowspec export runs/quickstart/best.pt --out quickstart.safetensors",
    ),
    "ablate": (
        "flowspec ablate specs/flowpp_cifar.flow specs/ablations/*.flow --budget 20m --data ~/cifar10",
        "flowspec ablate specs/quickstart.flow --steps 100 --set defaults.coupling.blocks=2 --out runs/ab",
        "flowspec ablate --resume runs/ab",
    ),
    "cache": (
        "flowspec cache ~/data/imagenet64",
        "flowspec cache ~/data/imagenet64 --clean",
        "flowspec cache --all",
    ),
}


def epilog(command: str) -> str:
    """The `--help` epilog of `command`: its examples, one per line."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in EXAMPLES[command])
