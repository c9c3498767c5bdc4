"""Run configuration for the recipes: one dataclass, loadable from YAML or command-line flags."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    """Everything one training run needs. Defaults are the papers' CIFAR settings (SGD 0.1,
    momentum 0.9, weight decay 5e-4, batch 128) with a cosine schedule.

    Examples:
        >>> cfg = RunConfig.from_yaml("branchify/recipes/configs/cifar100_resnet32_one.yaml")  # doctest: +SKIP
        >>> cfg.method, cfg.epochs                                                   # doctest: +SKIP
        ('one', 300)
    """

    model: str = "resnet32"
    dataset: str = "fashion_mnist"
    method: str = "baseline"
    method_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"          # "cosine" or "step"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs (step)
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"                 # "auto" = cuda if available
    amp: bool = False                    # bf16 autocast (GPU)
    channels_last: bool = False
    train_subset: int | None = None      # seeded, class-stratified subset of the training set
    test_subset: int | None = None       # evaluate on the first N test images (smoke runs)
    augment: bool = True
    data_root: str | None = None
    fake_data: bool = False              # random data with the dataset's shapes (smoke tests)
    fake_batches: int = 2
    max_steps: int | None = None         # stop each epoch early (smoke tests)
    eval_every: int = 1                  # evaluate every N epochs (and always after the last); checkpoints too
    freeze_bn: bool = False              # BatchNorm in eval mode while training (exact data-parallel equality)
    out_dir: str = "runs/latest"

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "step"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'step', got {self.lr_schedule!r}")
        for name in ("epochs", "batch_size", "eval_every", "fake_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_steps", "train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            hints = "".join(f" ({u!r}: did you mean {close[0]!r}?)" for u in unknown
                            if (close := difflib.get_close_matches(u, sorted(valid), n=1, cutoff=0.6)))
            raise ValueError(f"unknown config keys {unknown}{hints}; valid keys: {sorted(valid)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        """Load a YAML file, or a bundled config by name (``"cifar100_resnet32_one"``, see
        :func:`bundled_configs`)."""
        data = yaml.safe_load(resolve_config(path).read_text()) or {}
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})


CONFIG_DIR = Path(__file__).parent / "configs"
"""The paper settings shipped with branchify (package data, so an installed wheel has them)."""


def bundled_configs() -> list[str]:
    """Names of the configs shipped in :data:`CONFIG_DIR`.

    Examples:
        >>> "cifar100_resnet32_one" in bundled_configs()
        True
    """
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """``path`` if it is a file, else the bundled config of that name; an error lists the names."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / f"{p.stem if p.suffix in ('.yaml', '.yml') else p.name}.yaml"
    if bundled.is_file():
        return bundled
    raise FileNotFoundError(f"no config file {str(path)!r} and no bundled config of that name; bundled configs: "
                            f"{', '.join(bundled_configs())}")
