import os
import sys
from pathlib import Path

import torch

# Tests import the top-level modules (flux_model, vae, ...) directly, as the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))
