#!/usr/bin/env python3
"""Convert checkpoints between HF safetensors and megatron-core (same as `sdzero convert`).

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF --out-dir MCORE --tp 2
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir MCORE --out-dir HF_OUT
"""

import sys

from sdzero_mcore.checkpoint.convert import main

if __name__ == "__main__":  # spawned converter workers re-import this file; the guard keeps them idle
    sys.exit(main())
