"""The loss contract: the one definition of the per-example loss ℓ, `S`, `T` and the normaliser `M`.

docs/method.md §2: `S(z; θ)` is the sum of an example's token losses and `T(z)` its number of loss tokens.
Under `"token"` normalisation `ℓ = S` and `M = Σ_i T(z_i)`; under `"example"`, `ℓ = S/T` and `M = n`.
The training objective is `R(θ) = (1/M) Σ_i ℓ(z_i; θ)`.

A model that is not a causal LM plugs in by subclassing `UnlearningTask` (kronfluence's task idea):
the algorithm only ever calls `collate`, `loss_sums`, `loss_counts`, `split` and `merge`; the
Gauss–Newton curvature (`curvature="ggn"`) additionally needs the optional pair `outputs` /
`output_losses`, which split `loss_sums` into the network's output and a loss that is convex in it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, TEXT_FIELDS, TOKEN_FIELDS, ExampleEncoder, row_form
from .errors import DataError, InvalidRequestError


class UnlearningTask:
    """How rows become batches and batches become per-example losses. Subclass for your own model."""

    def collate(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Rows -> a batch of tensors (on CPU; the engine moves it to the model's device)."""
        raise NotImplementedError

    def loss_sums(
        self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example `(S, T)`, each of shape (B,): loss sum (differentiable) and number of loss terms."""
        raise NotImplementedError

    def loss_counts(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example `T` (B,) without a forward pass (used for the normaliser M)."""
        raise NotImplementedError

    # Optional, for the generalised Gauss–Newton curvature: `loss_sums(model, batch)` must equal
    # `output_losses(outputs(model, batch), batch)`, and `output_losses` must be convex in the outputs
    # (so that its Hessian with respect to them is positive semi-definite).

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network output `z` (e.g. logits), differentiable in the parameters, any shape (B, ...)."""
        raise NotImplementedError

    def output_losses(
        self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example `(S, T)` as a function of the network output `z` alone (no model call)."""
        raise NotImplementedError

    def output_hessian_product(
        self,
        outputs: torch.Tensor,
        vectors: torch.Tensor,
        batch: Mapping[str, torch.Tensor],
        normalization: str,
    ) -> torch.Tensor:
        """`∇²_z [Σ_b ℓ_b(z)] · u` for a tangent `u` shaped like `z` (the Gauss–Newton middle factor).

        The default differentiates `output_losses` twice with respect to `z` only (never through the
        network); override it with a closed form when there is one.
        """
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            S, T = self.output_losses(z, batch)
            ell = S if normalization == "token" else S / T
            (g,) = torch.autograd.grad(ell.sum(), z, create_graph=True)
            (hu,) = torch.autograd.grad(g, z, grad_outputs=vectors)
        return hu

    def sampled_output_losses(
        self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional, for K-FAC with `kfac_targets="sampled"`: per-example `(S, T)` of `output_losses` with the
        targets drawn from the model's own predictive distribution at `outputs` (with `generator`), so that
        the second moment of its output gradient is the output Hessian (the Gauss–Newton middle factor)."""
        raise NotImplementedError

    def split(self, row: Mapping) -> tuple[object, object]:
        """(query part, response part) of a row, comparable with `==`; decides QM vs RC."""
        raise NotImplementedError

    def merge(self, old: Mapping, new_fields: Mapping) -> dict:
        """The new version of `old` given a replacement's fields."""
        return {**{k: v for k, v in old.items() if k != "id"}, **new_fields}


def pad_token_id(tokenizer=None, model=None) -> int:
    """The id padding positions get: the tokenizer's pad id, else the model config's, else 0. The one rule of
    the library (training, unlearning, evaluation, the demo): padding is masked (attention mask 0, labels
    -100), so the id only has to be a valid token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad or 0


def causal_lm_task(tokenizer=None, model=None, encoding=None) -> CausalLMTask:
    """`CausalLMTask` over `tokenizer` (with the text encoding `encoding`), padded with `pad_token_id`."""
    return CausalLMTask(ExampleEncoder(tokenizer, encoding), pad_token_id=pad_token_id(tokenizer, model))


class CausalLMTask(UnlearningTask):
    """Causal-LM cross entropy with the one-token shift; labels of -100 carry no loss."""

    def __init__(self, encoder: ExampleEncoder | None = None, pad_token_id: int = 0):
        self.encoder = encoder or ExampleEncoder()
        self.pad_token_id = pad_token_id

    def collate(self, rows):
        examples = [self.encoder(row) for row in rows]
        length = max(len(e["input_ids"]) for e in examples)

        def pad(key, value):
            return torch.tensor(
                [e[key] + [value] * (length - len(e[key])) for e in examples], dtype=torch.long
            )

        return {
            "input_ids": pad("input_ids", self.pad_token_id),  # (B, L)
            "attention_mask": pad("attention_mask", 0),  # (B, L)
            "labels": pad("labels", IGNORE_INDEX),  # (B, L)
        }

    def loss_sums(self, model, batch):
        return self.output_losses(self.outputs(model, batch), batch)

    def outputs(self, model, batch):
        """Logits at the loss positions only, (B, K, V): position t predicts token t+1, and K is the union over
        the batch of the positions whose next token carries a loss (see `loss_positions`). The language-model
        head is the costliest layer of a small LM over a 50k vocabulary, and prompts are most of the tokens, so
        this skips most of its work; models whose forward has no `logits_to_keep` are sliced after the head."""
        positions = loss_positions(batch)  # (K,)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if _accepts_logits_to_keep(model):
            return model(**kwargs, logits_to_keep=positions).logits  # (B, K, V)
        return model(**kwargs).logits[:, positions]  # (B, K, V)

    def output_losses(self, logits, batch):
        targets = batch["labels"][:, loss_positions(batch) + 1]  # (B, K): the token each position predicts
        token_losses = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, K), zero where ignored
        return token_losses.sum(dim=1), self.loss_counts(batch).to(token_losses.dtype)

    def output_hessian_product(self, logits, vectors, batch, normalization):
        """Closed form: per loss token t, `w_t (diag(p_t) − p_t p_tᵀ) u_t` with `p_t = softmax(logits_t)`.

        `w_t` is 1 under 'token' normalisation and `1/T` of the token's example under 'example'; positions
        without a loss (label -100) contribute nothing.
        """
        p = torch.softmax(logits.detach(), dim=-1)  # (B, K, V)
        hu = p * (vectors - (p * vectors).sum(dim=-1, keepdim=True))  # (B, K, V)
        weight = (batch["labels"][:, loss_positions(batch) + 1] != IGNORE_INDEX).to(logits.dtype)  # (B, K)
        if normalization == "example":
            weight = weight / self.loss_counts(batch).to(logits.dtype).clamp_min(1).unsqueeze(1)
        return hu * weight.unsqueeze(-1)

    def sampled_output_losses(self, logits, batch, generator):
        """Cross entropy against tokens drawn from `softmax(logits)` at the loss positions (one draw each):
        `E_y[(p − e_y)(p − e_y)ᵀ] = diag(p) − ppᵀ`, the output Hessian of `output_hessian_product`."""
        probs = torch.softmax(logits.detach().float(), dim=-1)  # (B, K, V), K = loss_positions(batch)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        labels = batch["labels"].clone()  # (B, L)
        predicted = loss_positions(batch) + 1  # (K,): the label positions the logits predict
        targets = labels[:, predicted]  # (B, K)
        labels[:, predicted] = torch.where(
            targets != IGNORE_INDEX, drawn.view(targets.shape).to(labels.device), targets
        )
        return self.output_losses(logits, {**batch, "labels": labels})

    def loss_counts(self, batch):
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,)

    def split(self, row):
        if row_form(row) == "text":
            return row["prompt"], row["response"]
        example = self.encoder(row)
        labels, ids = example["labels"], example["input_ids"]
        first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
        return ids[:first], list(zip(ids[first:], labels[first:]))

    def merge(self, old, new_fields):
        if unknown := sorted(set(new_fields) - {*TEXT_FIELDS, *TOKEN_FIELDS, "attention_mask"}):
            raise InvalidRequestError(
                f"A replacement gives unknown field(s) {unknown}; it gives prompt and/or response, or input_ids "
                "and labels (and optionally attention_mask)."
            )
        text = [k for k in TEXT_FIELDS if k in new_fields]
        tokens = [k for k in TOKEN_FIELDS if k in new_fields]
        if text and tokens:
            raise InvalidRequestError(
                "A replacement gives either text (prompt/response) or tokens, not both."
            )
        if tokens:
            if len(tokens) != 2:
                raise InvalidRequestError("A pre-tokenised replacement must give both input_ids and labels.")
            return {k: new_fields[k] for k in (*TOKEN_FIELDS, "attention_mask") if k in new_fields}
        if not text:
            raise InvalidRequestError(
                "A replacement has no new content: give prompt and/or response, or input_ids and labels."
            )
        if len(text) == 1 and row_form(old) != "text":
            raise InvalidRequestError(
                "The training row is pre-tokenised, so its replacement must give both prompt and response "
                "(or input_ids and labels)."
            )
        return {k: new_fields[k] if k in new_fields else old[k] for k in TEXT_FIELDS}


def loss_positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(K,) sorted positions t at which some row of the batch has a loss on token t+1 (labels ≠ -100)."""
    return torch.nonzero((batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def example_losses(task: UnlearningTask, model, batch, normalization: str) -> torch.Tensor:
    """ℓ for each example of the batch, (B,): `S` under 'token', `S/T` under 'example'."""
    S, T = task.loss_sums(model, batch)
    if normalization == "token":
        return S
    if (T == 0).any():
        raise DataError(
            "A row has no loss tokens (every label is -100, e.g. its response was truncated away), so its "
            "per-example mean loss is undefined under loss_normalization='example'; drop or fix the row."
        )
    return S / T


def normaliser(
    task: UnlearningTask, rows: Sequence[Mapping], normalization: str, batch_size: int = 64
) -> float:
    """M: the total number of loss terms (`'token'`) or the number of rows (`'example'`)."""
    if normalization == "example":
        return float(len(rows))
    return float(
        sum(
            task.loss_counts(task.collate(rows[i : i + batch_size])).sum().item()
            for i in range(0, len(rows), batch_size)
        )
    )
