#!/usr/bin/env python
"""Checkpoint converters without installing the package: same as ``megassm convert ...``.

    python tools/convert_checkpoint.py zero-to-consolidated runs/smoke out/smoke
    python tools/convert_checkpoint.py reshard out/smoke out/smoke_tp2 --tp 2
    python tools/convert_checkpoint.py stage runs/stage2_2k configs/stage3_video.yaml out/stage3_init
    python tools/convert_checkpoint.py import-hydra hydra.safetensors out/imported --config configs/smoke.yaml
    python tools/convert_checkpoint.py inspect runs/smoke      (= megassm inspect checkpoint runs/smoke)

See docs/checkpoints.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megassm.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["inspect"]:
        sys.exit(main(["inspect", "checkpoint", *args[1:]]))
    sys.exit(main(["convert", *args]))
