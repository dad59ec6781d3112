import json
import os

import pytest
import torch

# Tests never touch the network: the Hub and datasets libraries run offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The tests' tensors are small: torch's thread pool only costs here, and it thrashes on a loaded 2-core machine.
torch.set_num_threads(1)


# The trainer tests' shared inputs, made once per test module (test_train.py defines what they hold)
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from test_train import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def unet_config(tmp_path_factory):
    from test_train import TINY_UNET

    path = tmp_path_factory.mktemp("config") / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path
