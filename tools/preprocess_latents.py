#!/usr/bin/env python
"""Encode images/videos + captions into latent shards: the same as ``megassm preprocess``.

    python tools/preprocess_latents.py --input /data/imgs --output /data/lat256 \
        --vae /ckpt/vae --text-encoder /ckpt/t5 --resolution 256
    srun --ntasks=8 python tools/preprocess_latents.py ...   # one rank per task/GPU

Run with --help for every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megassm.data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]], prog="tools/preprocess_latents.py"))
