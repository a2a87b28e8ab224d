import os
import sys
from pathlib import Path

import torch

# Tests import the top-level modules (flux_model, vae, ...) directly, as the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# 2 threads on CI's 2 cores; OMP_NUM_THREADS=1 keeps a loaded machine from thrashing
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
