import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread each. Two threads spin-wait on a busy 2-core machine (measured 13 min
# against 2.5 min for the Trainer tests); subprocesses (torchrun, the CLI) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The Python API's digest key (hf_unlearn.request.default_digest_key_path): a per-run file, not the user's.
os.environ.setdefault(
    "HF_UNLEARN_DIGEST_KEY",
    os.path.join(__import__("tempfile").mkdtemp(prefix="hf_unlearn_key_"), "digest_key"),
)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
