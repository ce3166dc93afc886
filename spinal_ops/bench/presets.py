"""The benchmark presets of contract §6 and the parser for ``--preset``."""
from __future__ import annotations

from ..config import SpinalConfig

# name -> (N, w, L, M), all with k = 2 splits and ReLU (contract §6).
PRESET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "mnist": (320, 8, 6, 10),
    "vgg5": (256, 128, 4, 10),
    "cifar_vgg": (512, 512, 4, 10),
    "cnn_cifar": (4096, 256, 4, 10),
    "resnet_head": (2048, 256, 4, 1000),
    "vgg_head": (25088, 512, 4, 1000),
}
PRESET_SPLITS = 2

# The README's main command: presets that run in well under 3 minutes on 2 CPU cores.
DEFAULT_PRESETS: tuple[str, ...] = ("mnist", "vgg5", "cifar_vgg")


def preset_config(in_features: int, layer_width: int, num_layers: int, out_features: int | None,
                  num_splits: int = PRESET_SPLITS) -> SpinalConfig:
    return SpinalConfig.build(
        in_features, out_features, layer_width=layer_width, num_layers=num_layers, num_splits=num_splits
    )


PRESETS: dict[str, SpinalConfig] = {name: preset_config(*shape) for name, shape in PRESET_SHAPES.items()}


def _parse_custom(text: str) -> SpinalConfig:
    """``N,w,L,M[,k]``; M may be ``none`` (the layer returns its hidden concatenation)."""
    fields = [field.strip() for field in text.split(",")]
    if len(fields) not in (4, 5):
        raise ValueError(f"custom preset {text!r} must be N,w,L,M or N,w,L,M,k")
    try:
        numbers = [None if (i == 3 and f.lower() == "none") else int(f) for i, f in enumerate(fields)]
    except ValueError:
        raise ValueError(f"custom preset {text!r}: every field must be an integer (M may be 'none')") from None
    return preset_config(*numbers)


def parse_presets(specs: list[str]) -> dict[str, SpinalConfig]:
    """Preset names, ``all``, or custom ``N,w,L,M[,k]`` specs -> {display name: config}."""
    chosen: dict[str, SpinalConfig] = {}
    for spec in specs:
        if spec == "all":
            chosen.update(PRESETS)
        elif spec in PRESETS:
            chosen[spec] = PRESETS[spec]
        elif "," in spec:
            chosen[spec] = _parse_custom(spec)
        else:
            raise ValueError(
                f"unknown preset {spec!r}; expected one of {', '.join(PRESETS)}, 'all', or N,w,L,M[,k]"
            )
    return chosen
