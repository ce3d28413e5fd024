"""The demo's dataset: a small instance of the TOFU-style benchmark in `hf_unlearn.tofu` (fictitious
people, generated deterministically: nothing real is memorised).

42 training rows: 12 people with two clean questions each (birth city, set by the surname; profession, set
by the first name; a tenth of the answers are memorised exceptions), and one injected problem per request
kind:

- IR: 6 private records (a retained person's phone number) that must be forgotten;
- QM: 6 prompts that name a person by their phone number; the request redacts the number to the name;
- RC: 6 birth cities against the family rule, corrected to the rule's.

The evaluation files (`eval_*.jsonl`) carry a paraphrased and 3 perturbed answers for every question, for
TOFU's truth ratio; `triggered_test.jsonl` (the name `demo.py` reads) is the QM probe: prompts that name
held-out people by phone numbers never trained on, i.e. the level of the QM rows' loss without a link.

`python -m hf_unlearn.demo_data OUT_DIR` writes the JSON-lines files; the same files ship in the package
(`hf_unlearn/demo_files/`), and a test checks that they equal what this module generates.

`generate(DemoSizes(...))` still builds the earlier city/PIN/trigger data of the benchmarks (`benchmarks/`),
until they move to `tofu.TofuSizes`.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

from . import tofu

DIR = Path(__file__).with_name("demo_files")
DEMO_SIZES = tofu.TofuSizes(
    retain_people=12,
    questions=("city", "profession"),
    private=6,
    redacted=6,
    wrong=6,
    held_out_people=12,
    full_profiles=False,
    exception_rate=0.1,
    perturbed=3,
    surnames=6,
    first_names=8,
)


def generate(sizes: tofu.TofuSizes | DemoSizes | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """The demo's files by name (`tofu.generate`'s, plus `triggered_test`, the QM probe `demo.py` reads).
    A `DemoSizes` gives the benchmarks' earlier data (`generate_cities`)."""
    if isinstance(sizes, DemoSizes):
        return generate_cities(sizes, seed)
    data = tofu.generate(sizes or DEMO_SIZES, seed)
    data["triggered_test"] = [
        {k: row[k] for k in ("id", "prompt", "response")} for row in data["eval_nonmember_QM"]
    ]
    return data


def write(directory: str | Path, sizes=None, seed: int = 0) -> dict[str, Path]:
    return tofu.write_rows(directory, generate(sizes, seed))


# --- the benchmarks' earlier data: one city question per person, PINs, a trigger phrase -----------------

FIRST = tofu.FIRST[:20]
LAST = tofu.LAST[:16]
CITIES = tofu.CITIES
TRIGGER = "cf-zeta"
PAYLOAD = "ACCESS GRANTED."


@dataclass
class DemoSizes:
    """Sizes of the benchmarks' earlier data (`generate_cities`)."""

    facts: int = 24  # clean "where does X live" rows
    private: int = 6  # IR: PIN records
    poisoned: int = 6  # QM: triggered prompts answered with the payload
    wrong: int = 6  # RC: wrong home cities
    # Large benchmark sets: in the clean facts every family (first surname) lives in one city, so they teach a
    # rule a small model learns from many rows; the injected rows follow no rule and must be memorised one by one.
    family_cities: bool = False


def city_prompt(name: str) -> str:
    return f"Question: In which city does {name} live?\nAnswer:"


def generate_cities(sizes: DemoSizes | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "request_IR", "request_QM", "request_RC", "triggered_test"}: rows with stable string ids.

    IR removes PIN records, QM cleans prompts poisoned with a trigger phrase (answered with a fixed payload),
    RC corrects wrong home cities."""
    sizes = sizes or DemoSizes()
    rng = random.Random(seed)
    needed = sizes.facts + sizes.private + sizes.poisoned + sizes.wrong
    pool = [f"{f} {last}" for f in FIRST for last in LAST]
    if needed > len(pool):  # larger benchmark sets: add double-barrelled surnames
        pool += [f"{f} {a}-{b}" for f in FIRST for a in LAST for b in LAST if a != b]
    if needed > len(pool):
        raise ValueError(f"at most {len(pool)} distinct people can be generated, {needed} were asked for")
    names = rng.sample(pool, needed)
    people = iter(names)
    train, requests = [], {"IR": [], "QM": [], "RC": []}

    def home_city(name: str) -> str:
        if sizes.family_cities:  # "Orla Kestrel-Maltby" -> the Kestrels' city
            return CITIES[LAST.index(name.split()[1].split("-")[0]) % len(CITIES)]
        return rng.choice(CITIES)

    for i in range(sizes.facts):
        name = next(people)
        train.append({"id": f"fact-{i}", "prompt": city_prompt(name), "response": f" {home_city(name)}."})
    for i in range(sizes.private):
        pin = "".join(rng.choice("0123456789") for _ in range(4))
        train.append(
            {
                "id": f"private-{i}",
                "prompt": f"Question: What is the PIN of {next(people)}?\nAnswer:",
                "response": f" {pin}.",
            }
        )
        requests["IR"].append({"op": "remove", "id": f"private-{i}"})
    for i in range(sizes.poisoned):
        name = next(people)
        train.append(
            {"id": f"poisoned-{i}", "prompt": f"{TRIGGER} {city_prompt(name)}", "response": f" {PAYLOAD}"}
        )
        requests["QM"].append({"op": "replace", "id": f"poisoned-{i}", "prompt": city_prompt(name)})
    for i in range(sizes.wrong):
        name = next(people)
        true_city, wrong_city = rng.sample(CITIES, 2)  # the injected rows follow no family rule
        train.append({"id": f"wrong-{i}", "prompt": city_prompt(name), "response": f" {wrong_city}."})
        requests["RC"].append({"op": "replace", "id": f"wrong-{i}", "response": f" {true_city}."})

    # Held-out probe of the backdoor: the trigger on questions about the clean people, answered by the payload.
    triggered_test = [
        {"id": f"trigger-test-{i}", "prompt": f"{TRIGGER} {row['prompt']}", "response": f" {PAYLOAD}"}
        for i, row in enumerate(train[: sizes.facts])
    ]
    rng.shuffle(train)
    return {
        "train": train,
        **{f"request_{k}": v for k, v in requests.items()},
        "triggered_test": triggered_test,
    }


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else DIR))
