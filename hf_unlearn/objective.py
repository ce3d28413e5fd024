"""The loss contract: the one definition of the per-example loss ℓ, `S`, `T` and the normaliser `M`.

DESIGN §2: `S(z; θ)` is the sum of an example's token losses and `T(z)` its number of loss tokens.
Under `"token"` normalisation `ℓ = S` and `M = Σ_i T(z_i)`; under `"example"`, `ℓ = S/T` and `M = n`.
The training objective is `R(θ) = (1/M) Σ_i ℓ(z_i; θ)`.

A model that is not a causal LM plugs in by subclassing `UnlearningTask` (kronfluence's task idea):
the algorithm only ever calls `collate`, `loss_sums`, `loss_counts`, `split` and `merge`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, TEXT_FIELDS, TOKEN_FIELDS, ExampleEncoder, row_form
from .errors import InvalidRequestError


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

    def split(self, row: Mapping) -> tuple[object, object]:
        """(query part, response part) of a row, comparable with `==`; decides QM vs RC."""
        raise NotImplementedError

    def merge(self, old: Mapping, new_fields: Mapping) -> dict:
        """The new version of `old` given a replacement's fields."""
        return {**{k: v for k, v in old.items() if k != "id"}, **new_fields}


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
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # (B, L, V)
        targets = batch["labels"][:, 1:]  # (B, L-1): token t+1 is predicted at position t
        token_losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, L-1), zero where ignored
        return token_losses.sum(dim=1), self.loss_counts(batch).to(token_losses.dtype)

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


def example_losses(task: UnlearningTask, model, batch, normalization: str) -> torch.Tensor:
    """ℓ for each example of the batch, (B,): `S` under 'token', `S/T` under 'example'."""
    S, T = task.loss_sums(model, batch)
    return S if normalization == "token" else S / T


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
