import re

import pytest
from reference import train_tokenizer

from hf_unlearn import CausalLMTask, TrainingSet, demo_data, tofu
from hf_unlearn.data import ExampleEncoder
from hf_unlearn.request import UnlearningRequest

PHONE = re.compile(r"555-\d{4}")


def names_in(rows):
    return {m for r in rows for m in re.findall(r"(?:was|of|does) ([A-Z]\w+ [A-Z]\w+)", r["prompt"])}


def rule(question, name, sizes):
    first, last = name.split()
    q = tofu.QUESTIONS[question]
    key = tofu.LAST.index(last) if q.rule == "surname" else tofu.FIRST.index(first)
    return q.values[key % len(q.values)]


@pytest.mark.parametrize("sizes", [demo_data.DEMO_SIZES, tofu.TofuSizes()], ids=["demo", "default"])
def test_generator_builds_tofu_style_splits_and_requests(sizes):
    data = tofu.generate(sizes)
    assert data == tofu.generate(sizes)  # deterministic
    assert data["train"] != tofu.generate(sizes, seed=1)["train"]
    train = {r["id"]: r for r in data["train"]}
    assert len(train) == len(data["train"])  # unique ids
    training_set = TrainingSet(data["train"], [r["id"] for r in data["train"]])
    task = CausalLMTask(ExampleEncoder(train_tokenizer()))
    people = names_in(data["train"]) | {
        line["prompt"].split("was ")[1].split(" born")[0] for line in data["request_QM"]
    }
    expected_people = (
        sizes.retain_people + sizes.redacted + sizes.wrong
        if sizes.full_profiles
        else sizes.retain_people + sizes.wrong
    )
    assert len(people) >= expected_people
    if sizes is not demo_data.DEMO_SIZES:
        assert len(people | names_in(data["eval_holdout"])) >= 300  # "a few hundred fictitious people"
    # the requests resolve against the training rows, one kind each
    for kind in tofu.REQUEST_KINDS:
        lines = data[f"request_{kind}"]
        assert len(lines) == {"IR": sizes.private, "QM": sizes.redacted, "RC": sizes.wrong}[kind]
        assert all(line["id"] in train for line in lines)
        resolved = UnlearningRequest.from_lines(lines).resolve(training_set, task)
        assert resolved.kind_counts() == {kind: len(lines)}
        forget = data[f"eval_forget_{kind}"]
        assert [r["id"] for r in forget] == [line["id"] for line in lines]
        for r in forget:  # the forget rows are the rows as trained
            assert {k: r[k] for k in ("prompt", "response")} == {
                k: train[r["id"]][k] for k in ("prompt", "response")
            }
    # IR: phone numbers of retained people
    for r in data["eval_forget_IR"]:
        assert PHONE.search(r["response"])
    # QM: the training prompt names the person only by a phone number found nowhere else in training; the
    # request redacts it to the name, whose city (the answer) the surname rule gives
    all_text = " ".join(r["prompt"] + r["response"] for r in data["train"])
    for line in data["request_QM"]:
        number = PHONE.search(train[line["id"]]["prompt"]).group()
        assert all_text.count(number) == 1
        assert not PHONE.search(line["prompt"])
        name = line["prompt"].split("was ")[1].split(" born")[0]
        assert line["prompt"] == tofu.QUESTIONS["city"].ask(name)
        assert train[line["id"]]["response"] == f" {rule('city', name, sizes)}."
    # RC: wrong cities corrected to the family's
    for line in data["request_RC"]:
        name = names_in([train[line["id"]]]).pop()
        assert line["response"] == f" {rule('city', name, sizes)}."
        assert train[line["id"]]["response"] != line["response"]
    # clean rows follow the rules, but for a fraction of memorised exceptions
    clean = [r for r in data["eval_retain"] if "phone" not in r["prompt"]]
    assert {(r["id"], r["prompt"], r["response"]) for r in clean} <= {
        (r["id"], r["prompt"], r["response"]) for r in data["train"]
    }
    question = {q.prompt.split("{name}")[0]: name for name, q in tofu.QUESTIONS.items()}

    def follows_rule(r):
        name = names_in([r]).pop()
        q = next(v for k, v in question.items() if k in r["prompt"])
        return r["response"] == tofu.QUESTIONS[q].answer.format(value=rule(q, name, sizes))

    broken = sum(not follows_rule(r) for r in clean) / len(clean)
    assert 0 < broken < 2.5 * sizes.exception_rate
    # held-out people and non-members: never trained on, answered by the rules
    assert not names_in(data["eval_holdout"]) & names_in(data["train"])
    assert all(follows_rule(r) for r in data["eval_holdout"])
    for kind in tofu.REQUEST_KINDS:
        nonmembers = data[f"eval_nonmember_{kind}"]
        assert len(nonmembers) == len(data[f"eval_forget_{kind}"])
        assert not {r["prompt"] for r in nonmembers} & {r["prompt"] for r in data["train"]}
    # every evaluated question: a paraphrase with the same value, perturbed answers in its wording, wrong
    for split in [k for k in data if k.startswith("eval_")]:
        for r in data[split]:
            value = r["response"].strip().rstrip(".").removeprefix("A ").removeprefix("The ")
            assert value in r["paraphrased_response"] and r["paraphrased_response"] != r["response"]
            perturbed = r["perturbed_responses"]
            assert len(perturbed) == len(set(perturbed)) == sizes.perturbed
            stem = r["paraphrased_response"].split(value)[0]
            assert all(p.startswith(stem) and value not in p for p in perturbed)
    for line, r in zip(data["request_RC"], data["eval_forget_RC"]):  # the corrected city is a perturbed one
        assert line["response"].strip(" .") in r["perturbed_responses"][0]


def test_demo_data_keeps_the_demo_small_and_the_benchmarks_data():
    data = demo_data.generate()
    assert len(data["train"]) == 42  # the demo's earlier size: one fine-tune and 3 retrainings on 2 cores
    assert data["triggered_test"] == [
        {k: r[k] for k in ("id", "prompt", "response")} for r in data["eval_nonmember_QM"]
    ]
    # DemoSizes still gives the benchmarks' city / PIN / trigger rows
    legacy = demo_data.generate(demo_data.DemoSizes(facts=24, private=8, poisoned=8, wrong=8))
    assert len(legacy["train"]) == 48 and set(legacy) == {
        "train",
        "request_IR",
        "request_QM",
        "request_RC",
        "triggered_test",
    }
    assert all(demo_data.TRIGGER in r["prompt"] for r in legacy["train"] if r["id"].startswith("poisoned"))
    assert not any(demo_data.TRIGGER in line["prompt"] for line in legacy["request_QM"])


def test_generator_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="names are available"):
        tofu.generate(tofu.TofuSizes(retain_people=400, surnames=4))
    with pytest.raises(ValueError, match="held_out_people"):
        tofu.generate(tofu.TofuSizes(held_out_people=10))


def test_evaluation_splits_name_the_files_of_each_kind():
    data = demo_data.generate()
    for kind in tofu.REQUEST_KINDS:
        splits = tofu.evaluation_splits(data, kind)
        assert splits == {
            "forget": data[f"eval_forget_{kind}"],
            "retain": data["eval_retain"],
            "test": data["eval_holdout"],
            "nonmember": data[f"eval_nonmember_{kind}"],
        }
        forget_ids = {r["id"] for r in splits["forget"]}
        assert forget_ids == {line["id"] for line in data[f"request_{kind}"]}
        assert not forget_ids & {r["id"] for r in splits["retain"]}
    with pytest.raises(ValueError, match="kind"):
        tofu.evaluation_splits(data, "XX")
