"""End-to-end unlearning on a small model, offline, in about a minute on a laptop CPU.

1. Builds a small Llama from a config and a tokenizer trained on the data (nothing is downloaded).
2. LoRA fine-tunes it with the HF Trainer on `train.jsonl` (fictitious people and their PINs).
3. Runs `hf-unlearn unlearn` to forget three people (IR) and correct one answer (RC).
4. Prints the loss of the forgotten and kept rows before and after.

    python recipes/quickstart.py --output-dir quickstart_out
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from hf_unlearn.cli import main as hf_unlearn
from hf_unlearn.objective import causal_lm_task
from hf_unlearn.toy import build_toy_model

NAMES = ["Ada", "Bram", "Cleo", "Dag", "Edda", "Finn", "Gala", "Hugo", "Iris", "Joss", "Kai", "Lena", "Milo", "Nora",
         "Otto", "Pia", "Quin", "Rosa", "Sven", "Tove", "Ugo", "Vera", "Wim", "Xena"]  # fmt: skip


def make_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"person-{i}", "prompt": f"What is the PIN of {name}?", "response": " ".join(rng.choice("0123456789") for _ in range(4))}
        for i, name in enumerate(NAMES)
    ]  # fmt: skip


def build(rows, out: Path):
    return build_toy_model(rows, out / "base")


def train_adapter(base, tokenizer, rows, out: Path, epochs: int):
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    task = causal_lm_task(tokenizer, base)
    args = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=300, save_strategy="no",
                             report_to=[], remove_unused_columns=False, disable_tqdm=True, seed=0)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows, data_collator=task.collate).train()
    model.save_pretrained(out / "adapter")
    return task


@torch.no_grad()
def mean_loss(model, task, rows):
    model.eval()
    S, T = task.loss_sums(model, task.collate(rows))
    return (S.sum() / T.sum()).item()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="quickstart_out")
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    rows = make_rows()
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    forget = ["person-3", "person-7", "person-11"]
    corrected = {"id": "person-0", "response": "1 2 3 4"}
    request = [{"op": "remove", "id": i} for i in forget] + [{"op": "replace", **corrected}]
    (out / "request.jsonl").write_text("".join(json.dumps(r) + "\n" for r in request))

    base, tokenizer = build(rows, out)
    task = train_adapter(
        base, tokenizer, [{k: r[k] for k in ("prompt", "response")} for r in rows], out, args.epochs
    )

    command = ["unlearn", "--model", str(out / "base"), "--adapter", str(out / "adapter"), "--train-file",
               str(out / "train.jsonl"), "--request", str(out / "request.jsonl"), "--output-dir", str(out / "unlearned"),
               "--damping", "1.0", "--max-iter", "500", "--overwrite"]  # fmt: skip
    print("$ hf-unlearn " + " ".join(command))
    if hf_unlearn(command) != 0:
        raise SystemExit(1)

    by_id = {r["id"]: r for r in rows}
    groups = {
        "forgotten rows (IR)": [by_id[i] for i in forget],
        "corrected row, old answer": [by_id["person-0"]],
        "corrected row, new answer": [{**by_id["person-0"], "response": corrected["response"]}],
        "kept rows": [r for r in rows if r["id"] not in forget and r["id"] != "person-0"],
    }
    losses = {}
    for adapter in ("adapter", "unlearned"):
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / adapter)
        losses[adapter] = {name: mean_loss(model, task, group) for name, group in groups.items()}
    print(f"\n{'mean token loss':<28}{'original':>10}{'unlearned':>11}")
    for name in groups:
        print(f"{name:<28}{losses['adapter'][name]:>10.3f}{losses['unlearned'][name]:>11.3f}")
    print(f"\nUnlearned adapter, manifest and model card: {out / 'unlearned'}")


if __name__ == "__main__":
    main()
