import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SMALL_PRESETS = ["cae2_debug", "cae2_vit_tiny", "cae2_vit_small", "cae2_vit_base"]
ALL_PRESETS = SMALL_PRESETS + [pytest.param("cae2_vit_large", marks=pytest.mark.slow)]
