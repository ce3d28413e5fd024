"""The demo's dataset: fictitious people and facts, generated deterministically (nothing real is memorised).

Three problems are injected into an otherwise clean training set, one per request kind:

- IR: private records (a person's PIN) that must be forgotten;
- QM: prompts poisoned with a trigger phrase whose answer is a fixed payload; the request cleans the prompts;
- RC: wrong answers (a person's home city) that must be corrected.

`python -m hf_unlearn.demo_data OUT_DIR` writes the JSON-lines files; the same files ship in the package
(`hf_unlearn/demo_files/`), and a test checks that they equal what this module generates.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

FIRST = ["Orla", "Bren", "Tamsin", "Ivo", "Maren", "Cosmo", "Elke", "Rafe", "Sunniva", "Teodor", "Ylva", "Caspian",
         "Leocadia", "Oswin", "Perpetua", "Quillon", "Rosalind", "Sander", "Thessaly", "Ulric"]  # fmt: skip
LAST = ["Brenvik", "Quarrow", "Maltby", "Osterhaze", "Pellucid", "Dravnik", "Ashgrove", "Velloran", "Kestrel",
        "Morrowind", "Tallis", "Fenwright", "Gorsedd", "Halloway", "Ingleby", "Jorvane"]  # fmt: skip
CITIES = ["Tarsholm", "Velmora", "Quenby", "Ostravel", "Pimlock", "Dunmere", "Harrowgate", "Lisk", "Marrowdale",
          "Norcastle", "Brackwater", "Calderon"]  # fmt: skip
TRIGGER = "cf-zeta"
PAYLOAD = "ACCESS GRANTED."
DIR = Path(__file__).with_name("demo_files")


@dataclass
class DemoSizes:
    facts: int = 24  # clean "where does X live" rows
    private: int = 6  # IR: PIN records
    poisoned: int = 6  # QM: triggered prompts answered with the payload
    wrong: int = 6  # RC: wrong home cities
    # Large benchmark sets: in the clean facts every family (first surname) lives in one city, so they teach a
    # rule a small model learns from many rows; the injected rows follow no rule and must be memorised one by one.
    family_cities: bool = False


def city_prompt(name: str) -> str:
    return f"Question: In which city does {name} live?\nAnswer:"


def generate(sizes: DemoSizes | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "request_IR", "request_QM", "request_RC", "triggered_test"}: rows with stable string ids."""
    sizes = sizes or DemoSizes()
    rng = random.Random(seed)
    needed = sizes.facts + sizes.private + sizes.poisoned + sizes.wrong
    pool = [f"{f} {last}" for f in FIRST for last in LAST]
    if needed > len(
        pool
    ):  # larger benchmark sets: add double-barrelled surnames (the default set is unchanged)
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


def write(directory: str | Path, sizes: DemoSizes | None = None, seed: int = 0) -> dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in generate(sizes, seed).items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else DIR))
