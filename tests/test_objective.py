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
