import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread each. Two threads spin-wait on a busy 2-core machine (measured 13 min
# against 2.5 min for the Trainer tests); subprocesses (torchrun, the CLI) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
