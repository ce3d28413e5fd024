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
from peft import LoraConfig, get_peft_model  # noqa: E402
from reference import LORA, REQUESTS_FOR_CLI, ROWS_FOR_CLI, fit, tiny_llama_base, write_jsonl  # noqa: E402

from hf_unlearn import CausalLMTask  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama base and a LoRA adapter trained on `ROWS_FOR_CLI`, saved to disk, with the training file and
    the request files of `REQUESTS_FOR_CLI` (paths by name: "base", "adapter", "train", "IR", "QM", "RC"), for
    the command-line tests. Built once per test module; a module with its own `workspace` fixture uses that."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama_base(seed=3, dtype=torch.float32, exact=False)
    base.save_pretrained(root / "base")
    model = fit(get_peft_model(base, LoraConfig(**LORA)), CausalLMTask(), ROWS_FOR_CLI, steps=80)
    model.save_pretrained(root / "adapter")
    files = {"root": root, "base": str(root / "base"), "adapter": str(root / "adapter")}
    files["train"] = write_jsonl(root / "train.jsonl", ROWS_FOR_CLI)
    for kind, lines in REQUESTS_FOR_CLI.items():
        files[kind] = write_jsonl(root / f"{kind}.jsonl", lines)
    return files
