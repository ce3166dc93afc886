"""csrc/ includes in one direction: common/ <- chain/ <- cpu/, cuda/ <- the registration files.

Every ``#include "..."`` under csrc/ is resolved against the including file's folder and must
land in a layer the includer may use:

* ``common/`` (shape checks, activations, messages) includes no other layer;
* ``chain/`` (the device-generic hoisted chain and its GEMM-engine hook) only ``common/``;
* ``cpu/`` and ``cuda/`` include ``common/`` and ``chain/``, never each other;
* the registration files at csrc/'s top level (ops.cpp, autograd.cpp, python_module.cpp) are the
  top layer and may include anything; nothing includes them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE_SUFFIXES = {".h", ".cuh", ".cpp", ".cu"}
TOP = ""  # the registration files at csrc/'s top level

# The layers each layer may include (besides its own).
ALLOWED = {
    "common": set(),
    "chain": {"common"},
    "cpu": {"common", "chain"},
    "cuda": {"common", "chain"},
    TOP: {"common", "chain", "cpu", "cuda"},
}

INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def layer_of(path: Path, root: Path = CSRC) -> str:
    """The layer of a file under root (csrc/): its first folder, or TOP for root itself."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else TOP


def layering_violations(root: Path = CSRC) -> list[str]:
    """Every quoted include under root that breaks the direction, as 'file: "include" (why)'."""
    problems = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in SOURCE_SUFFIXES or not path.is_file():
            continue
        source_layer = layer_of(path, root)
        if source_layer not in ALLOWED:
            problems.append(f"{path.relative_to(root)}: csrc/{source_layer}/ is not a known layer")
            continue
        for name in INCLUDE.findall(path.read_text(encoding="utf-8")):
            target = Path(os.path.normpath(path.parent / name))
            where = f'{path.relative_to(root)}: "{name}"'
            if not target.is_file():
                problems.append(f"{where} (no such file under csrc/)")
                continue
            try:
                target_layer = layer_of(target, root)
            except ValueError:
                problems.append(f"{where} (outside csrc/)")
                continue
            if target_layer == source_layer:
                continue
            if target_layer not in ALLOWED.get(source_layer, set()):
                shown = "the top level" if target_layer == TOP else f"{target_layer}/"
                problems.append(f"{where} (csrc/{source_layer or '.'} may not include {shown})")
    return problems


def test_every_source_is_in_a_layer():
    folders = {path.name for path in CSRC.iterdir() if path.is_dir()}
    assert folders == set(ALLOWED) - {TOP}, folders


def test_includes_point_down_the_layers():
    assert layering_violations() == []


@pytest.mark.parametrize(
    ("layer", "include", "expected"),
    [
        ("common", "../chain/hoisted_chain.h", "csrc/common may not include chain/"),
        ("chain", "../cpu/blas.h", "csrc/chain may not include cpu/"),
        ("chain", "../cuda/kernels.h", "csrc/chain may not include cuda/"),
        ("cpu", "../cuda/kernels.h", "csrc/cpu may not include cuda/"),
        ("cuda", "../cpu/tile_gemm.h", "csrc/cuda may not include cpu/"),
        ("cpu", "../ops.cpp", "csrc/cpu may not include the top level"),
    ],
)
def test_a_wrong_include_is_caught(tmp_path, layer, include, expected):
    """The scan itself: a copy of csrc/ with one wrong include added fails it."""
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    (copy / layer / "layer_probe.h").write_text(f'#pragma once\n#include "{include}"\n', encoding="utf-8")
    problems = layering_violations(copy)
    assert len(problems) == 1 and expected in problems[0], problems
