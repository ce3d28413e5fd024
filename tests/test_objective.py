import pytest
import torch
from reference import VOCAB, loop_loss_sum, loop_normaliser, tiny_llama, token_rows

from hf_unlearn import CausalLMTask
from hf_unlearn.objective import example_losses, normaliser


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


def test_collate_pads_right_and_ignores_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = CausalLMTask(pad_token_id=1).collate(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_batched_losses_match_token_loop(model, normalization):
    rows = token_rows(9, seed=3)
    task = CausalLMTask()
    S, T = task.loss_sums(model, task.collate(rows))
    for i, row in enumerate(rows):
        S_loop, T_loop = loop_loss_sum(model, row)
        assert T[i].item() == T_loop
        torch.testing.assert_close(S[i], S_loop, rtol=1e-12, atol=1e-12)
    ell = example_losses(task, model, task.collate(rows), normalization)
    torch.testing.assert_close(ell, S if normalization == "token" else S / T, rtol=0, atol=0)


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_normaliser(normalization):
    rows = token_rows(11, seed=4)
    assert normaliser(CausalLMTask(), rows, normalization, batch_size=3) == loop_normaliser(
        rows, normalization
    )


def test_loss_excludes_prompt_tokens(model):
    """Changing a prompt label that is -100 does nothing; un-ignoring it changes S and T."""
    row = {"input_ids": [3, 4, 5, 6, 7], "labels": [-100, -100, 5, 6, 7]}
    task = CausalLMTask()
    S, T = task.loss_sums(model, task.collate([row]))
    assert T.item() == 3
    S2, T2 = task.loss_sums(model, task.collate([{**row, "labels": [-100, 4, 5, 6, 7]}]))
    assert T2.item() == 4 and S2.item() > S.item()
    assert max(row["input_ids"]) < VOCAB
    # exactly the response tokens' NLL: S = −Σ_{t ≥ 2} log p(y_t | y_<t), and S2 adds token 1's term
    logp = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].log_softmax(-1)  # (L, V)
    nll = [-logp[t - 1, row["input_ids"][t]] for t in range(1, 5)]
    torch.testing.assert_close(S[0], sum(nll[1:]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S2[0], sum(nll), rtol=1e-12, atol=1e-12)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (as in older or custom architectures)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_outputs_are_the_logits_at_the_loss_positions(model):
    prompt = [3, 4, 5, 6, 7]  # a shared prompt with no loss: those positions need no logits
    rows = [
        {"input_ids": prompt + r["input_ids"], "labels": [-100] * len(prompt) + r["labels"]}
        for r in token_rows(7, seed=5)
    ]
    task = CausalLMTask()
    batch = task.collate(rows)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    has_loss = (batch["labels"][:, 1:] != -100).any(0)  # (L-1,)
    assert not has_loss.all(), "the rows must have prompt positions for this test to mean anything"
    expected = full[:, :-1][:, has_loss]
    torch.testing.assert_close(task.outputs(model, batch), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(task.outputs(_NoLogitsToKeep(model), batch), expected, rtol=0, atol=0)
    S, _ = task.loss_sums(_NoLogitsToKeep(model), batch)
    torch.testing.assert_close(
        S, torch.stack([loop_loss_sum(model, r)[0] for r in rows]), rtol=1e-12, atol=1e-12
    )


def test_a_row_without_loss_tokens_is_refused_under_example_normalisation(model):
    from hf_unlearn import DataError

    task = CausalLMTask()
    batch = {  # the encoder refuses such a row; a Trainer's own collator may still produce one
        "input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 3, 4], [-100, -100, -100, -100]]),
    }
    assert torch.isfinite(example_losses(task, model, batch, "token")).all()  # it adds nothing to a sum
    with pytest.raises(DataError, match="no loss tokens"):
        example_losses(task, model, batch, "example")  # its mean would be 0/0


def test_computation_mode_undoes_a_conversion_that_fails_part_way(monkeypatch):
    from hf_unlearn.params import computation_mode

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)).float().train()
    original_to, calls = torch.Tensor.to, []

    def to(self, *args, **kwargs):  # out of memory on the third conversion to float64
        calls.append(args)
        if args and args[0] is torch.float64 and len(calls) == 3:
            raise RuntimeError("out of memory")
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(RuntimeError, match="out of memory"), computation_mode(model, torch.float64):
        pass
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.training
