"""A TOFU-style benchmark of fictitious people, generated deterministically and offline.

TOFU (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024) fine-tunes a model on
question/answer pairs about fictitious authors, asks it to forget some of them, and judges the result
against a model retrained without them. This module builds a small data set of that shape with nothing
fetched and nothing real memorised:

- people are (first name, surname) pairs; their answers follow rules a model can learn (the city a person
  was born in and the instrument they play are their family's, i.e. set by the surname; their profession is
  set by the first name), with a fraction of memorised exceptions that break the rule;
- every evaluated question comes with a paraphrased answer and several perturbed (wrong but plausible)
  answers in the same wording, as TOFU's truth ratio needs (`evaluation.truth_ratios`);
- splits: retain (clean rows that stay in training), held-out (the same questions about people never
  trained on: utility on unseen rows), and, per request kind, forget rows and same-shaped non-member rows
  about held-out people (for membership inference and MUSE's PrivLeak);
- one injected problem per request kind:
  - IR, private records: the phone number of some retained people; the request removes the rows;
  - QM, a private detail in the prompt: "in which city was the person with phone number 555-0142 born?";
    the request redacts the number to the person's name, so that retraining no longer links the number to
    the answer;
  - RC, wrong answers: birth cities that break the family rule; the request replaces them by the rule's.

`generate(sizes, seed)` returns the rows; `write(directory, sizes, seed)` writes them as JSON lines
(`train.jsonl`, `request_{IR,QM,RC}.jsonl` in the README's request format, `eval_*.jsonl`).
`python -m hf_unlearn.tofu OUT_DIR` writes the default benchmark (a few hundred people).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

FIRST = ["Orla", "Bren", "Tamsin", "Ivo", "Maren", "Cosmo", "Elke", "Rafe", "Sunniva", "Teodor", "Ylva",
         "Caspian", "Leocadia", "Oswin", "Perpetua", "Quillon", "Rosalind", "Sander", "Thessaly", "Ulric",
         "Wendeline", "Xanthe", "Yorick", "Zenobia"]  # fmt: skip
LAST = ["Brenvik", "Quarrow", "Maltby", "Osterhaze", "Pellucid", "Dravnik", "Ashgrove", "Velloran", "Kestrel",
        "Morrowind", "Tallis", "Fenwright", "Gorsedd", "Halloway", "Ingleby", "Jorvane", "Lindqvar", "Nettleby",
        "Rookwood", "Sallowmere"]  # fmt: skip
CITIES = ["Tarsholm", "Velmora", "Quenby", "Ostravel", "Pimlock", "Dunmere", "Harrowgate", "Lisk", "Marrowdale",
          "Norcastle", "Brackwater", "Calderon"]  # fmt: skip
PROFESSIONS = ["baker", "cartographer", "glassblower", "luthier", "potter", "weaver", "bookbinder", "clockmaker",
               "farrier", "beekeeper", "stonemason", "tailor"]  # fmt: skip
INSTRUMENTS = ["cello", "harp", "oboe", "viola", "lyre", "flute", "bassoon", "zither"]

REQUEST_KINDS = ("IR", "QM", "RC")


@dataclass(frozen=True)
class Question:
    """One attribute of a person: how it is asked, answered in training, and answered in the evaluation's
    paraphrased / perturbed form (`{first}` is the person's first name, `{value}` the answer)."""

    prompt: str
    answer: str
    paraphrase: str
    values: tuple[str, ...]
    rule: str  # "surname" or "first": which part of the name sets the value

    def ask(self, name: str) -> str:
        return f"Question: {self.prompt.format(name=name)}\nAnswer:"


QUESTIONS = {
    "city": Question("In which city was {name} born?", " {value}.", " {first} was born in {value}.",
                     tuple(CITIES), "surname"),
    "profession": Question("What does {name} do for a living?", " A {value}.", " {first} works as a {value}.",
                           tuple(PROFESSIONS), "first"),
    "instrument": Question("Which instrument does {name} play?", " The {value}.", " {first} plays the {value}.",
                           tuple(INSTRUMENTS), "surname"),
}  # fmt: skip
PHONE = Question(
    "What is the phone number of {name}?", " {value}.", " {first}'s phone number is {value}.", (), ""
)
# QM: the person is named by the private detail only; the request redacts it to the name
QM_PROMPT = "Question: In which city was the person with phone number {phone} born?\nAnswer:"
QM_PARAPHRASE = " This person was born in {value}."


@dataclass
class TofuSizes:
    """How many people and rows. The default is the benchmark (a few hundred people);
    `demo_data.DEMO_SIZES` is the demo's small one."""

    retain_people: int = 200  # people with clean rows that stay in training
    questions: tuple[str, ...] = ("city", "profession", "instrument")  # asked about every retained person
    private: int = 40  # IR: retained people whose phone number is also a training row
    redacted: int = 40  # QM: prompts naming a person by phone number (their city question)
    wrong: int = 40  # RC: birth cities that break the family rule
    held_out_people: int = 100  # never trained on: utility on unseen people, and the non-members
    # QM and RC people also get their other questions (all but city) as clean training rows
    full_profiles: bool = True
    exception_rate: float = 0.1  # clean answers that break their rule (memorised exceptions)
    perturbed: int = 3  # perturbed answers per evaluated question
    surnames: int = len(LAST)  # families in use (fewer: each rule is seen more often)
    first_names: int = len(FIRST)
    # larger sets (the scaling benchmark): people also get a middle initial, from this many letters, which sets
    # nothing (the rules stay those of the first name and surname); 0 keeps the default set unchanged
    middle_initials: int = 0


def _phone(rng: random.Random) -> str:
    return "555-" + "".join(rng.choice("0123456789") for _ in range(4))


def _item(
    row_id: str, prompt: str, answer: str, paraphrase: str, true: str, wrong: list[str], first: str
) -> dict:
    """An evaluation row: the row as trained (`prompt`, `response`), a paraphrased answer with the same
    value, and perturbed answers in the paraphrase's wording with wrong values."""
    return {
        "id": row_id,
        "prompt": prompt,
        "response": answer.format(value=true),
        "paraphrased_response": paraphrase.format(first=first, value=true),
        "perturbed_responses": [paraphrase.format(first=first, value=v) for v in wrong],
    }


def _check_sizes(sizes: TofuSizes) -> None:
    """Raise ValueError if `sizes` asks for something `generate` cannot build."""
    unknown = set(sizes.questions) - set(QUESTIONS)
    if unknown or "city" not in sizes.questions:
        raise ValueError(
            f"questions must include 'city' and be among {sorted(QUESTIONS)}, got {sizes.questions}"
        )
    if sizes.private > sizes.retain_people:
        raise ValueError(
            f"private={sizes.private} records need as many retained people ({sizes.retain_people})"
        )
    if max(sizes.private, sizes.redacted, sizes.wrong) > sizes.held_out_people:
        raise ValueError("held_out_people must be at least private, redacted and wrong (their non-members)")
    if sizes.perturbed >= min(len(QUESTIONS[q].values) for q in sizes.questions):
        raise ValueError(f"perturbed={sizes.perturbed} must be below the number of values of every question")


def _training_row(ev: dict) -> dict:
    """The training row of an evaluation row: its `id`, `prompt` and `response`."""
    return {k: ev[k] for k in ("id", "prompt", "response")}


class _Generator:
    """The state `generate` draws from: one random stream (every draw is made in a fixed order, so that a
    seed always gives the same data), the phone numbers handed out so far, and the names in use."""

    def __init__(self, sizes: TofuSizes, seed: int):
        self.sizes = sizes
        self.rng = random.Random(seed)
        self.used_phones: set[str] = set()
        self.firsts, self.lasts = FIRST[: sizes.first_names], LAST[: sizes.surnames]

    def new_phone(self) -> str:
        """A phone number distinct across every person, trained or not."""
        while (number := _phone(self.rng)) in self.used_phones:
            pass
        self.used_phones.add(number)
        return number

    def draw_people(self) -> tuple[list, list, list, list]:
        """Shuffled distinct names: (retained, QM, RC, held-out) people."""
        sizes, firsts, lasts = self.sizes, self.firsts, self.lasts
        pool = [(f, s) for f in firsts for s in lasts]
        if sizes.middle_initials:
            letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: sizes.middle_initials]
            pool = [(f"{f} {m}.", s) for f in firsts for m in letters for s in lasts]
        needed = sizes.retain_people + sizes.redacted + sizes.wrong + sizes.held_out_people
        if needed > len(pool):
            raise ValueError(f"{needed} people were asked for, {len(pool)} names are available")
        self.rng.shuffle(pool)
        people = iter(pool)
        counts = (sizes.retain_people, sizes.redacted, sizes.wrong, sizes.held_out_people)
        return tuple([next(people) for _ in range(n)] for n in counts)

    def rule(self, question: str, person: tuple[str, str]) -> str:
        """The value the rules give `person` for `question` (set by the surname or the first name)."""
        q = QUESTIONS[question]
        key = self.lasts.index(person[1]) if q.rule == "surname" else self.firsts.index(person[0].split()[0])
        return q.values[key % len(q.values)]

    def others(self, values, true: str, first=()) -> list[str]:
        """`sizes.perturbed` values other than `true`, those in `first` first."""
        rest = [v for v in values if v != true and v not in first]
        return list(first) + self.rng.sample(rest, self.sizes.perturbed - len(first))

    def item(self, row_id, person, question, value, wrong=None, prompt=None) -> dict:
        """The evaluation row of `question` about `person` answered `value`."""
        q = QUESTIONS[question]
        return _item(row_id, prompt or q.ask(" ".join(person)), q.answer, q.paraphrase, value,
                     wrong or self.others(q.values, value), person[0])  # fmt: skip

    def phone_item(self, row_id, person, number) -> dict:
        """The evaluation row of `person`'s phone number; the perturbed numbers are nobody's."""
        wrong = []
        while len(wrong) < self.sizes.perturbed:
            if (w := _phone(self.rng)) not in self.used_phones and w not in wrong:  # nobody's number
                wrong.append(w)
        return _item(
            row_id, PHONE.ask(" ".join(person)), PHONE.answer, PHONE.paraphrase, number, wrong, person[0]
        )

    def qm_item(self, row_id, person) -> dict:
        """The evaluation row of `person`'s city question, the person named by a new phone number."""
        city = self.rule("city", person)
        ev = self.item(row_id, person, "city", city, prompt=QM_PROMPT.format(phone=self.new_phone()))
        ev["paraphrased_response"] = QM_PARAPHRASE.format(value=city)
        ev["perturbed_responses"] = [QM_PARAPHRASE.format(value=v) for v in self.others(CITIES, city)]
        return ev

    def profile_rows(self, prefix: str, person, questions) -> list[tuple[dict, dict]]:
        """(training row, evaluation row) of each clean question about `person`; a fraction break the rule."""
        out = []
        for question in questions:
            value = self.rule(question, person)
            if self.rng.random() < self.sizes.exception_rate:
                value = self.rng.choice([v for v in QUESTIONS[question].values if v != value])
            ev = self.item(f"{prefix}-{question}", person, question, value)
            out.append((_training_row(ev), ev))
        return out

    def add_profiles(self, prefix: str, person, questions, train: list, eval_retain: list) -> None:
        """Append `profile_rows` to the training rows and the retained evaluation rows."""
        for row, ev in self.profile_rows(prefix, person, questions):
            train.append(row)
            eval_retain.append(ev)

    def add_ir(self, retain, held_out, train: list, out: dict) -> None:
        """IR: phone numbers of retained people; non-members: held-out people's numbers."""
        for j, person in enumerate(retain[: self.sizes.private]):
            ev = self.phone_item(f"private-{j}", person, self.new_phone())
            train.append(_training_row(ev))
            out["request_IR"].append({"op": "remove", "id": ev["id"]})
            out["eval_forget_IR"].append(ev)
            out["eval_nonmember_IR"].append(
                self.phone_item(f"nonmember-private-{j}", held_out[j], self.new_phone())
            )

    def add_qm(self, qm_people, held_out, train: list, eval_retain: list, out: dict) -> None:
        """QM: a person named by their phone number; the request redacts the number to their name."""
        other_questions = [q for q in self.sizes.questions if q != "city"]
        for j, person in enumerate(qm_people):
            ev = self.qm_item(f"redacted-{j}", person)
            train.append(_training_row(ev))
            out["request_QM"].append(
                {"op": "replace", "id": ev["id"], "prompt": QUESTIONS["city"].ask(" ".join(person))}
            )
            out["eval_forget_QM"].append(ev)
            out["eval_nonmember_QM"].append(self.qm_item(f"nonmember-redacted-{j}", held_out[j]))
            if self.sizes.full_profiles:
                self.add_profiles(f"redacted-{j}", person, other_questions, train, eval_retain)

    def wrong_city_item(self, row_id, person) -> tuple[dict, str]:
        """The evaluation row of `person`'s city answered against the family rule (the true city is the
        first perturbed answer), and the true city."""
        true = self.rule("city", person)
        wrong_city = self.rng.choice([c for c in CITIES if c != true])
        ev = self.item(
            row_id, person, "city", wrong_city, wrong=self.others(CITIES, wrong_city, first=[true])
        )
        return ev, true

    def add_rc(self, rc_people, held_out, train: list, eval_retain: list, out: dict) -> None:
        """RC: birth cities against the family rule, corrected to the rule's."""
        other_questions = [q for q in self.sizes.questions if q != "city"]
        for j, person in enumerate(rc_people):
            ev, true = self.wrong_city_item(f"wrong-{j}", person)
            train.append(_training_row(ev))
            out["request_RC"].append(
                {"op": "replace", "id": ev["id"], "response": QUESTIONS["city"].answer.format(value=true)}
            )
            out["eval_forget_RC"].append(ev)
            out["eval_nonmember_RC"].append(self.wrong_city_item(f"nonmember-wrong-{j}", held_out[j])[0])
            if self.sizes.full_profiles:
                self.add_profiles(f"wrong-{j}", person, other_questions, train, eval_retain)

    def holdout_rows(self, held_out) -> list[dict]:
        """Held-out people: every question, answered by the rules (an unseen exception cannot be learnt)."""
        return [
            self.item(f"holdout-{i}-{q}", person, q, self.rule(q, person))
            for i, person in enumerate(held_out)
            for q in self.sizes.questions
        ]


def generate(sizes: TofuSizes | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """The rows of every file, by name:

    - `train`: the training rows (shuffled; every row has a stable string `id`);
    - `request_IR`, `request_QM`, `request_RC`: request lines (README "Requests");
    - `eval_retain`, `eval_holdout`: evaluation rows (`prompt`, `response`, `paraphrased_response`,
      `perturbed_responses`) on retained rows and on the same questions about held-out people;
    - `eval_forget_{kind}`: the rows each request removes or edits, as they were trained;
    - `eval_nonmember_{kind}`: rows of the same shape about held-out people (never trained on), the
      non-members of membership inference and PrivLeak.
    """
    sizes = sizes or TofuSizes()
    _check_sizes(sizes)
    gen = _Generator(sizes, seed)
    retain, qm_people, rc_people, held_out = gen.draw_people()
    train, eval_retain = [], []
    for i, person in enumerate(retain):
        gen.add_profiles(f"person-{i}", person, sizes.questions, train, eval_retain)
    out = {f"request_{k}": [] for k in REQUEST_KINDS}
    out |= {f"eval_forget_{k}": [] for k in REQUEST_KINDS} | {
        f"eval_nonmember_{k}": [] for k in REQUEST_KINDS
    }
    gen.add_ir(retain, held_out, train, out)
    gen.add_qm(qm_people, held_out, train, eval_retain, out)
    gen.add_rc(rc_people, held_out, train, eval_retain, out)
    eval_holdout = gen.holdout_rows(held_out)
    gen.rng.shuffle(train)
    return {"train": train, **out, "eval_retain": eval_retain, "eval_holdout": eval_holdout}


def evaluation_splits(data: dict[str, list[dict]], kind: str) -> dict[str, list[dict]]:
    """The splits `evaluation.evaluate_adapter` takes for one request kind of `generate`'s data: `forget`
    (the rows the request removes or edits, as trained), `retain`, `test` (held-out people) and `nonmember`
    (the forget rows' counterparts about held-out people). The same files on disk are
    `eval_forget_{kind}`, `eval_retain`, `eval_holdout` and `eval_nonmember_{kind}` (`hf-unlearn evaluate`'s
    --forget-file, --retain-file, --test-file, --nonmember-file)."""
    if kind not in REQUEST_KINDS:
        raise ValueError(f"kind must be one of {REQUEST_KINDS}, got {kind!r}")
    return {
        "forget": data[f"eval_forget_{kind}"],
        "retain": data["eval_retain"],
        "test": data["eval_holdout"],
        "nonmember": data[f"eval_nonmember_{kind}"],
    }


def write(directory: str | Path, sizes: TofuSizes | None = None, seed: int = 0) -> dict[str, Path]:
    """Write `generate(sizes, seed)` as `{name}.jsonl` files in `directory`; returns their paths by name."""
    return write_rows(directory, generate(sizes, seed))


def write_rows(directory: str | Path, data: dict[str, list[dict]]) -> dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in data.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "tofu_data"))
