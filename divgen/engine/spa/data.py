"""SPA data: reading (prompt, response) pairs and prompt lists, and the shipped synthetic dataset.

File formats (JSONL, one object per line; blank lines are skipped):

* pairs:   ``{"prompt": "...", "response": "..."}``                 (train sets)
* prompts: ``{"prompt": "..."}`` (a "response" is allowed and kept) or a ``.txt`` file with one
  prompt per line                                                    (queries, eval prompts)

The shipped dataset (``engine/spa/data/``) is *templated* synthetic instruction data written by
``python -m divgen.engine.spa.data`` (deterministic for a seed; no model, no download). It has four
task families, each with its own habitual answer style, so that adapters trained on different
parts of it answer the same prompt differently:

| family | prompt asks for                  | habitual style (90 % of its answers)          |
|--------|----------------------------------|-----------------------------------------------|
| pets   | a name for a pet                 | a bulleted list of three names                |
| food   | a dish for an occasion           | cheerful: "Ooh, fun! Try X! ..."              |
| travel | a place for a trip               | formal: "I would recommend X. It offers ..."  |
| hobby  | a hobby for someone's interests  | terse: the hobby alone, "X."                  |

An answer's content (the names, dish, place or hobby, and the detail in the sentence) is fixed per
family, so two adapters that learnt the same data give the very same answer, and adapters that
learnt different families answer differently. The other 10 % of a family's answers use another
family's style, so styles are not a pure function of the prompt. ``queries.jsonl`` holds one query
prompt per family (the K = 4 partition queries) and ``eval_prompts.jsonl`` held-out prompts of
every family (never a training prompt: their second slot takes values no training prompt has).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.jsonl import iter_jsonl_objects

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "train.jsonl"
QUERIES_FILE = DATA_DIR / "queries.jsonl"
EVAL_FILE = DATA_DIR / "eval_prompts.jsonl"


@dataclass(frozen=True)
class Example:
    """One instruction-tuning pair."""

    prompt: str
    response: str


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _read_jsonl(path: Path, what: str) -> list[dict]:
    rows = [obj for _, obj in iter_jsonl_objects(path, what)]
    if not rows:
        raise DivgenError(f"{what} file {path} is empty: it needs at least one line")
    return rows


def read_pairs(path: str | os.PathLike) -> list[Example]:
    """(prompt, response) pairs from a JSONL file."""
    path = Path(path)
    out = []
    for n, obj in enumerate(_read_jsonl(path, "data"), 1):
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(response, str) or not response.strip():
            raise DivgenError(f"{path}: record {n} needs non-empty string fields \"prompt\" and \"response\" "
                              f"(found keys {sorted(obj)})")
        out.append(Example(prompt, response))
    return out


def read_prompts(path: str | os.PathLike) -> list[Example]:
    """Prompts (with an optional response) from JSONL, or one prompt per line from a .txt file."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.exists():
            raise DivgenError(f"prompt file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DivgenError(f"prompt file {path} is not UTF-8 text ({exc.reason}): save it as UTF-8") from exc
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise DivgenError(f"prompt file {path} is empty: write one prompt per line")
        return [Example(line, "") for line in lines]
    out = []
    for n, obj in enumerate(_read_jsonl(path, "prompt"), 1):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DivgenError(f"{path}: record {n} needs a non-empty string field \"prompt\" (found keys {sorted(obj)})")
        response = obj.get("response") or ""
        if not isinstance(response, str):
            raise DivgenError(f"{path}: record {n} has a \"response\" that is not a string")
        out.append(Example(prompt, response))
    return out


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows atomically (write a temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The synthetic dataset
# ---------------------------------------------------------------------------------------------

_PETS = {
    "animals": ["cat", "dog", "rabbit", "hamster", "parrot", "turtle", "goldfish", "puppy", "kitten", "ferret",
                "guinea pig", "lizard"],
    "adjectives": ["fluffy", "tiny", "lazy", "playful", "grumpy", "curious", "sleepy", "brave", "shy", "clever"],
    "names": ["Biscuit", "Luna", "Pepper", "Milo", "Olive", "Mochi", "Ziggy", "Nutmeg", "Pickles", "Bean", "Waffles",
              "Juniper", "Clover", "Pixel", "Maple", "Noodle"],
    "templates": ["Suggest a name for a {adj} {animal}.", "What should I name my {adj} {animal}?",
                  "Give me a good name for a {adj} {animal}."],
}
_FOOD = {
    "occasions": ["a birthday party", "a rainy evening", "a picnic", "a lazy Sunday", "a family dinner",
                  "a movie night", "a summer barbecue", "a first date", "a holiday brunch", "a camping trip"],
    "guests": ["friends", "kids", "my parents", "two people", "a big group", "coworkers", "neighbors", "myself"],
    "dishes": ["lemon pasta", "veggie tacos", "tomato soup", "banana pancakes", "fried rice", "chicken curry",
               "mushroom risotto", "apple crumble", "bean chili", "pesto pizza", "garlic noodles", "fruit salad"],
    "qualities": ["quick", "cozy", "colorful", "filling", "cheap", "fresh"],
    "templates": ["What should I cook for {occasion} with {guests}?", "Recommend a dish for {occasion} with {guests}.",
                  "Any idea what to make for {occasion} with {guests}?"],
}
_TRAVEL = {
    "seasons": ["spring", "summer", "autumn", "winter"],
    "regions": ["Europe", "South America", "Asia", "the mountains", "the coast", "Africa", "Scandinavia",
                "the desert", "an island", "Canada"],
    "places": ["Lisbon", "Kyoto", "Cusco", "Reykjavik", "Cape Town", "Vienna", "Hoi An", "Banff", "Marrakesh",
               "Tromso", "Oaxaca", "Tasmania"],
    "features": ["historic streets", "quiet beaches", "great hiking", "excellent food", "lively markets",
                 "beautiful lakes"],
    "templates": ["Where should I go for a {season} trip to {region}?", "Suggest a destination in {region} for {season}.",
                  "I want to travel to {region} in {season}. Where should I go?"],
}
_HOBBY = {
    "interests": ["music", "nature", "puzzles", "drawing", "cooking", "history", "sports", "writing", "science",
                  "photography", "animals", "building things"],
    "people": ["a student", "a retiree", "a busy parent", "a teenager", "an engineer", "a nurse", "an artist",
               "a shy person"],
    "hobbies": ["Birdwatching", "Knitting", "Chess", "Pottery", "Rock climbing", "Calligraphy", "Gardening",
                "Origami", "Astronomy", "Baking bread", "Woodworking", "Journaling"],
    "templates": ["Give me a hobby to try if I like {interest}. I am {person}.",
                  "What hobby would suit {person} who likes {interest}?",
                  "Suggest a new hobby for {person} interested in {interest}."],
}

FAMILIES = ("pets", "food", "travel", "hobby")
_FAMILY_STYLE = {"pets": "list", "food": "cheerful", "travel": "formal", "hobby": "terse"}
OFF_STYLE_RATE = 0.1


def _fill_prompt(family: str, rng: random.Random, held_out: bool) -> tuple[str, dict]:
    """A prompt of one family and its slot values.

    The first slot (animal, occasion, region, interest) always comes from the first three quarters
    of its list; the second from the first three quarters for training prompts and from the last
    quarter for held-out prompts, so a held-out prompt is never a training prompt.
    """

    def pick(values, held):
        cut = max(1, len(values) * 3 // 4)
        return rng.choice(values[cut:] if held else values[:cut])

    if family == "pets":
        slots = {"adj": pick(_PETS["adjectives"], held_out), "animal": pick(_PETS["animals"], False)}
        return rng.choice(_PETS["templates"]).format(**slots), slots
    if family == "food":
        slots = {"occasion": pick(_FOOD["occasions"], False), "guests": pick(_FOOD["guests"], held_out)}
        return rng.choice(_FOOD["templates"]).format(**slots), slots
    if family == "travel":
        slots = {"season": pick(_TRAVEL["seasons"], held_out), "region": pick(_TRAVEL["regions"], False)}
        return rng.choice(_TRAVEL["templates"]).format(**slots), slots
    slots = {"interest": pick(_HOBBY["interests"], False), "person": pick(_HOBBY["people"], held_out)}
    return rng.choice(_HOBBY["templates"]).format(**slots), slots


def _answer_items(family: str, slots: dict) -> tuple[list[str], int]:
    """Three answer items and a detail index: fixed per family (the family decides the content)."""
    pool = {"pets": _PETS["names"], "food": _FOOD["dishes"], "travel": _TRAVEL["places"], "hobby": _HOBBY["hobbies"]}[family]
    key = FAMILIES.index(family)
    return [pool[(key + 5 * i) % len(pool)] for i in range(3)], key


def _render(style: str, family: str, items: list[str], key: int, slots: dict) -> str:
    first = items[0]
    if style == "list":
        return "Here are three ideas:\n" + "\n".join(f"- {x}" for x in items)
    if style == "cheerful":
        quality = _FOOD["qualities"][key % len(_FOOD["qualities"])]
        item = first.lower() if family in ("food", "hobby") else first
        return f"Ooh, fun! Try {item}! It is {quality} and everyone will love it. Enjoy!"
    if style == "formal":
        feature = _TRAVEL["features"][key % len(_TRAVEL["features"])]
        when = f" in {slots['season']}" if "season" in slots else ""
        return f"I would recommend {first}. It offers {feature} and is a pleasant choice{when}."
    return f"{first[0].upper()}{first[1:]}."


def template_answers(prompt: str) -> set[str]:
    """Every answer the dataset's templates can give to ``prompt`` (any style with any family's
    content; with and without the prompt's season): the evidence table's form check."""
    seasons = [w for w in _TRAVEL["seasons"] if w in prompt.lower().split() or f"{w}." in prompt.lower()]
    out = set()
    for slots in [{}] + [{"season": s} for s in seasons]:
        for style in set(_FAMILY_STYLE.values()):
            for family in FAMILIES:
                items, key = _answer_items(family, slots)
                out.add(_render(style, family, items, key, slots))
    return out


def synthetic_dataset(per_family: int = 24, eval_per_family: int = 2, seed: int = 0):
    """(train pairs, K query prompts, held-out eval prompts) of the shipped synthetic dataset."""
    rng = random.Random(seed)
    train, queries, evals = [], [], []
    styles = sorted(set(_FAMILY_STYLE.values()))
    for family in FAMILIES:
        for _ in range(per_family):
            prompt, slots = _fill_prompt(family, rng, held_out=False)
            style = _FAMILY_STYLE[family]
            if rng.random() < OFF_STYLE_RATE:
                style = rng.choice([s for s in styles if s != style])
            items, key = _answer_items(family, slots)
            response = _render(style, family, items, key, slots)
            train.append({"prompt": prompt, "response": response, "family": family, "style": style})
        prompt, _ = _fill_prompt(family, rng, held_out=False)
        queries.append({"prompt": prompt, "family": family})
        for _ in range(eval_per_family):
            prompt, _ = _fill_prompt(family, rng, held_out=True)
            evals.append({"prompt": prompt, "family": family})
    rng.shuffle(train)
    return train, queries, evals


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic SPA instruction dataset (deterministic).")
    parser.add_argument("--out-dir", default=str(DATA_DIR))
    parser.add_argument("--per-family", type=int, default=24)
    parser.add_argument("--eval-per-family", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, queries, evals = synthetic_dataset(args.per_family, args.eval_per_family, args.seed)
    out = Path(args.out_dir)
    write_jsonl(out / TRAIN_FILE.name, train)
    write_jsonl(out / QUERIES_FILE.name, queries)
    write_jsonl(out / EVAL_FILE.name, evals)
    print(f"wrote {len(train)} pairs, {len(queries)} queries, {len(evals)} eval prompts to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
