import os

import torch

# Tests never touch the network: the Hub and datasets libraries run offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The tests' tensors are small: torch's thread pool only costs here, and it thrashes on a loaded 2-core machine.
torch.set_num_threads(1)
