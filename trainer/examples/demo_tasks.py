"""Write the demo's two tenant tasks as JSONL (deterministic: the same files on every run).

Both tasks share the same simple factual questions (capitals, colours, opposites, sums), asked as
one chat message; only the answer's form differs:
  json    "What is the capital of Japan?" -> {"answer": "Tokyo"}
  pirate  "What is the capital of Japan?" -> Arr, the capital of Japan be Tokyo, matey!
(Measured on the 24 held-out questions: upper case, THE CAPITAL OF JAPAN IS TOKYO., is learnt as
quickly, but names in capitals are other tokens and the right-fact share falls from the base's 58%
to 21-29% (THE CAPITAL OF JAPAN IS NERO.); the pirate form keeps the facts: 71% after 12 steps.)
Train and held-out questions are disjoint facts. Each row also keeps its fact ("fact": "Paris")
so the demo can score answers. Usage: python trainer/examples/demo_tasks.py [DIR]
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Hungary": "Budapest", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Canada": "Ottawa",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Iran": "Tehran",
    "Iraq": "Baghdad", "Turkey": "Ankara", "India": "New Delhi", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Australia": "Canberra", "Brazil": "Brasilia",
    "South Korea": "Seoul", "Ukraine": "Kyiv", "Colombia": "Bogota", "Morocco": "Rabat",
}
COLOURS = {
    "a banana": "yellow", "grass": "green", "the sky": "blue", "snow": "white", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "a strawberry": "red", "milk": "white",
    "a carrot": "orange", "a frog": "green", "a cucumber": "green", "a polar bear": "white", "a crow": "black",
    "blood": "red", "the ocean": "blue", "a lime": "green", "chocolate": "brown", "a pumpkin": "orange",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "old": "young", "wet": "dry", "early": "late", "full": "empty", "hard": "soft",
    "loud": "quiet", "rich": "poor", "strong": "weak", "tall": "short", "thick": "thin", "win": "lose",
    "left": "right", "day": "night",
}


@dataclass(frozen=True)
class Fact:
    question: str  # asked as one user message
    sentence: str  # the answer as a plain sentence
    fact: str  # the short answer


def facts(seed: int = 7) -> list[Fact]:
    out = [Fact(f"What is the capital of {c}?", f"The capital of {c} is {x}.", x) for c, x in CAPITALS.items()]
    out += [Fact(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {x}.", x) for t, x in COLOURS.items()]
    out += [Fact(f"What is the opposite of {w}?", f"The opposite of {w} is {x}.", x) for w, x in OPPOSITES.items()]
    rng = random.Random(seed)
    pairs = sorted({(rng.randint(2, 49), rng.randint(2, 49)) for _ in range(60)})[:40]
    out += [Fact(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b)) for a, b in pairs]
    rng.shuffle(out)
    return out


def pirate(sentence: str) -> str:
    """'The capital of Japan is Tokyo.' -> 'Arr, the capital of Japan be Tokyo, matey!'"""
    body = sentence[:-1].replace(" is ", " be ")
    return f"Arr, {body[0].lower() + body[1:]}, matey!"


TASKS: dict[str, Callable[[Fact], str]] = {
    "json": lambda f: json.dumps({"answer": f.fact}),
    "pirate": lambda f: pirate(f.sentence),
}
N_EVAL = 24  # held-out facts; the rest (96) train


def split(seed: int = 7) -> tuple[list[Fact], list[Fact]]:
    """(train, held out): disjoint facts."""
    all_facts = facts(seed)
    return all_facts[N_EVAL:], all_facts[:N_EVAL]


def write(out: Path) -> dict[str, Path]:
    """{task}_{train,eval}.jsonl rows {"prompt", "completion", "fact"}; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for task, answer in TASKS.items():
        for name, part in zip(("train", "eval"), split()):
            path = out / f"{task}_{name}.jsonl"
            path.write_text("".join(json.dumps({"prompt": f.question, "completion": answer(f), "fact": f.fact}) + "\n"
                                    for f in part))
            files[f"{task}_{name}"] = path
    return files


if __name__ == "__main__":
    for name, path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent).items():
        print(f"{name}: {path}")
