"""Tiny config-built models and exact float64 references for the tests.

Everything here is deliberately naive: per-example and per-token Python loops, dense Hessians from
`torch.func.hessian`, `torch.linalg.solve`. The library is checked against it.
"""

from __future__ import annotations

import json
import random
import types

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.func import functional_call
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, TrainerCallback
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_unlearn import UnlearningArguments, UnlearningTask
from hf_unlearn.config import SINGLE_UPDATE
from hf_unlearn.params import ParameterSpace

VOCAB = 32


def _rmsnorm_in_own_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention_in_own_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, L, L)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("eager_own_dtype", _eager_attention_in_own_dtype)
AttentionMaskInterface.register("eager_own_dtype", eager_mask)


def tiny_llama_base(seed: int = 0, dtype=torch.float64, exact: bool = True, vocab_size: int = VOCAB):
    """A 2-layer Llama built from a config.

    Llama's RMSNorm and eager softmax compute in float32 whatever the model dtype, which caps agreement
    between two float64 computations at ~1e-8; `exact` keeps both in the model's dtype so that the maths
    can be checked to float64 round-off.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager_own_dtype" if exact else "eager",
    )
    base = LlamaForCausalLM(config).to(dtype)
    if exact:
        for module in base.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(_rmsnorm_in_own_dtype, module)
    return base


LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}


def tiny_llama(seed: int = 0, dtype=torch.float64, exact: bool = True):
    """`tiny_llama_base` with LoRA (r=2) on q_proj/v_proj; B is random so that ∂ℓ/∂A ≠ 0."""
    base = tiny_llama_base(seed, dtype, exact)
    return get_peft_model(base, LoraConfig(**LORA, init_lora_weights=False)).to(dtype)


def token_rows(n: int, seed: int = 0, min_len: int = 5, max_len: int = 10) -> list[dict]:
    """Pre-tokenised rows with a prompt (labels -100) and a response (labels = ids), varied lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        prompt = rng.randint(1, length - 2)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


ROWS_FOR_CLI = token_rows(14, seed=7)
REPLACEMENTS_FOR_CLI = {
    # QM: new prompt tokens, same response tokens; RC: same prompt, new response.
    "QM": (
        3,
        {"input_ids": [9, 9, 9] + ROWS_FOR_CLI[3]["input_ids"][ROWS_FOR_CLI[3]["labels"].count(-100) :]},
    ),
    "RC": (
        5,
        {"input_ids": ROWS_FOR_CLI[5]["input_ids"][: ROWS_FOR_CLI[5]["labels"].count(-100)] + [4, 5, 6]},
    ),
}
REQUESTS_FOR_CLI = {  # the request files of the `workspace` fixture (conftest.py)
    "IR": [{"op": "remove", "id": 2}, {"op": "remove", "id": 8}],
    "QM": [
        {
            "op": "replace",
            "id": 3,
            **REPLACEMENTS_FOR_CLI["QM"][1],
            "labels": [-100] * 3 + REPLACEMENTS_FOR_CLI["QM"][1]["input_ids"][3:],
        }
    ],
    "RC": [
        {
            "op": "replace",
            "id": 5,
            **REPLACEMENTS_FOR_CLI["RC"][1],
            "labels": [-100] * ROWS_FOR_CLI[5]["labels"].count(-100) + [4, 5, 6],
        }
    ],
}


def write_jsonl(path, rows) -> str:
    """Write `rows` as a JSON-lines file at `path`; returns the path as a string (a command-line argument)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def loop_loss_sum(model, row) -> tuple[torch.Tensor, int]:
    """S and T of one row by an explicit loop over its tokens."""
    ids = torch.tensor([row["input_ids"]])
    logits = model(input_ids=ids).logits[0]  # (L, V)
    S, T = logits.new_zeros(()), 0
    for t in range(len(row["labels"]) - 1):
        target = row["labels"][t + 1]
        if target != -100:
            S = S - torch.log_softmax(logits[t], dim=-1)[target]
            T += 1
    return S, T


def loop_ell(model, row, normalization):
    S, T = loop_loss_sum(model, row)
    return S if normalization == "token" else S / T


def loop_normaliser(rows, normalization) -> float:
    if normalization == "example":
        return float(len(rows))
    return float(sum(sum(1 for y in r["labels"][1:] if y != -100) for r in rows))


class DenseReference:
    """Exact docs/method.md §2 quantities for a model, over flat θ, by loops and `torch.func`."""

    def __init__(self, model, normalization: str, ell=None, normaliser=None):
        self.model = model.eval()
        self.space = ParameterSpace(model)
        self.theta = self.space.vector().clone()
        self.normalization = normalization
        self.ell = ell or (lambda m, row: loop_ell(m, row, normalization))
        self.normaliser = normaliser or (lambda rows: loop_normaliser(rows, normalization))

    def _call(self, theta):
        params = dict(zip(self.space.names, self.space.unflatten(theta)))
        space_model = self.model

        class Bound(torch.nn.Module):
            def forward(self, *args, **kwargs):
                return functional_call(space_model, params, args, kwargs, strict=False)

        return Bound()

    def ell_at(self, theta, row):
        return self.ell(self._call(theta), row)

    def objective(self, rows, M=None):
        M = M or self.normaliser(rows)
        return lambda theta: sum(self.ell_at(theta, r) for r in rows) / M

    def grad_sum(self, rows):
        """Σ ∇ℓ over rows, one example at a time."""
        total = torch.zeros_like(self.theta)
        for r in rows:
            total += torch.func.grad(lambda th, r=r: self.ell_at(th, r))(self.theta)
        return total

    def hessian(self, rows, M=None):
        return torch.func.hessian(self.objective(rows, M))(self.theta)

    def edited_hessian(self, train_rows, old, new):
        """∇²R' at θ: the rows of `train_rows` not in `old` (by identity) plus `new`, M of `train_rows` fixed."""
        kept = [r for r in train_rows if not any(r is o for o in old)]
        return self.hessian(kept + list(new), self.normaliser(train_rows))

    def update(self, train_rows, old, new, damping, curvature_rows=None, mu=0.0, curvature_M=None):
        """Δθ = −(H + (μ + λ)I)⁻¹ b with b = (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old)), M over the full training set.

        H is the Hessian of R' (the kept rows plus `new`, M fixed), or over `curvature_rows` normalised by
        `curvature_M` (default: their own) when they are given (the full training set: the Hessian of R)."""
        M = self.normaliser(train_rows)
        b = (self.grad_sum(new) - self.grad_sum(old)) / M
        if curvature_rows is None:
            H = self.edited_hessian(train_rows, old, new)
        else:
            H = self.hessian(curvature_rows, curvature_M)
        A = H + (mu + damping) * torch.eye(len(self.theta), dtype=H.dtype)
        return -torch.linalg.solve(A, b)


class MaskedRegressionTask(UnlearningTask):
    """Linear regression with a mask of observed outputs: `S = Σ_observed (ŷ − y)²`, `T` = #observed.

    Quadratic in the parameters, so one Newton step is exact where the Hessian does not change.
    """

    def collate(self, rows):
        return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in ("x", "y", "mask")}

    def loss_sums(self, model, batch):
        return self.output_losses(self.outputs(model, batch), batch)

    def outputs(self, model, batch):
        return model(batch["x"])  # (B, K)

    def output_losses(self, outputs, batch):
        residual = (outputs - batch["y"]) * batch["mask"]  # (B, K)
        return residual.pow(2).sum(dim=1), batch["mask"].sum(dim=1)

    def loss_counts(self, batch):
        return batch["mask"].sum(dim=1)

    def sampled_output_losses(self, outputs, batch, generator):
        """Targets `y ~ N(ŷ, I/2)`: the output gradient `2(ŷ − y)` then has second moment 2I, the output
        Hessian of the squared error (on the observed entries)."""
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype) * 0.5**0.5
        return self.output_losses(outputs, {**batch, "y": outputs.detach() + noise})

    def split(self, row):
        return tuple(row["x"]), (tuple(row["y"]), tuple(row["mask"]))


def regression_rows(n: int, d: int = 3, k: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(k, d, generator=g, dtype=torch.float64)
    rows = []
    for _ in range(n):
        x = torch.randn(d, generator=g, dtype=torch.float64)
        y = W @ x + 0.3 * torch.randn(k, generator=g, dtype=torch.float64)
        mask = [1.0] * k
        if torch.rand((), generator=g) < 0.4:
            mask[int(torch.randint(k, (), generator=g))] = 0.0
        rows.append({"x": x.tolist(), "y": y.tolist(), "mask": mask})
    return rows


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def fit(model, task, rows, normalization: str = "token", steps: int = 60, lr: float = 0.02):
    """A few full-batch Adam steps on R so that θ* is near a minimum, as after real training."""
    from hf_unlearn.objective import example_losses, normaliser

    space = ParameterSpace(model)
    optimizer = torch.optim.Adam(space.params, lr=lr)
    batch, M = task.collate(rows), normaliser(task, rows, normalization)
    model.eval()
    for _ in range(steps):
        optimizer.zero_grad()
        (example_losses(task, model, batch, normalization).sum() / M).backward()
        optimizer.step()
    return model


def train_tokenizer(vocab_size: int = 96):
    """A BPE tokenizer trained in ~0.1 s on Python's own help texts, wrapped as a transformers tokenizer."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def dense_ggn(model, rows, normalization: str, M=None) -> torch.Tensor:
    """(1/M) Σ_rows Σ_t w_t J_tᵀ (diag(p_t) − p_t p_tᵀ) J_t with J_t the `jacrev` Jacobian of the logits
    (M: the rows' own normaliser unless given)."""
    ref = DenseReference(model, normalization)
    M = M or loop_normaliser(rows, normalization)
    total = torch.zeros(len(ref.theta), len(ref.theta), dtype=ref.theta.dtype)
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        logits = ref._call(ref.theta)(input_ids=ids).logits[0]  # (L, V)
        J = torch.func.jacrev(lambda th, ids=ids: ref._call(th)(input_ids=ids).logits[0])(
            ref.theta
        )  # (L, V, P)
        T = sum(1 for y in row["labels"][1:] if y != -100)
        for t in range(len(row["labels"]) - 1):
            if row["labels"][t + 1] == -100:
                continue
            p = torch.softmax(logits[t].detach(), dim=-1)
            H_out = torch.diag(p) - torch.outer(p, p)  # exact softmax cross-entropy Hessian in the logits
            w = 1.0 if normalization == "token" else 1.0 / T
            total += w * J[t].T @ H_out @ J[t]
    return total / M


def dense_fisher(model, rows, normalization: str, M=None) -> torch.Tensor:
    """(1/M) Σ g_i g_iᵀ from per-example gradients, one row at a time (M: the rows' own unless given)."""
    ref = DenseReference(model, normalization)
    M = M or ref.normaliser(rows)
    total = torch.zeros(len(ref.theta), len(ref.theta), dtype=ref.theta.dtype)
    for r in rows:
        g = torch.func.grad(lambda th, r=r: ref.ell_at(th, r))(ref.theta)
        total += torch.outer(g, g)
    return total / M


# The single update with no capture: what the dense references of the update compute.
SINGLE_STEP = {**SINGLE_UPDATE, "capture_curvature": False}
# the same as `hf-unlearn unlearn` flags (put first: a flag given again later wins)
SINGLE_STEP_FLAGS = [
    f"--{name.replace('_', '-')}={value}"
    for name, value in SINGLE_STEP.items()
    if name != "capture_curvature"
]


def single_step(**overrides) -> UnlearningArguments:
    """`UnlearningArguments` of the single update on the exact Hessian, with `overrides`."""
    return UnlearningArguments(**{**SINGLE_STEP, **overrides})


def common_args(tmp_path, **kwargs):
    """`TrainingArguments` keywords of the Trainer tests: CPU, constant learning rate, nothing saved or logged."""
    return dict(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=1000,
        seed=0, use_cpu=True, **kwargs,
    )  # fmt: skip


class Snapshot(TrainerCallback):
    """Saves the trained adapter (θ*) before the unlearning callback, listed after it, edits it; `model(base)`
    rebuilds it in float64 on a fresh base (a deep copy would keep the Trainer's patched forward methods)."""

    def __init__(self, directory):
        self.directory = str(directory)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.save_pretrained(self.directory)

    def model(self, base):
        return PeftModel.from_pretrained(base, self.directory, is_trainable=True).double()
