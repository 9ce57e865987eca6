"""One-digit arithmetic prompts for a verifiable-reward run on SmolLM2-135M-Instruct.

Writes ``train.jsonl`` and ``eval.jsonl`` (conversational prompts with an ``answer`` column) into the
folder given (default: this one).  Every sum and product of two digits 1-9 is a problem (162 in all);
a fixed, seeded third of them is held out, so the evaluation asks facts the training never showed.

    python examples/smollm2_arithmetic/make_data.py [folder]
"""

import json
import os
import random
import sys

QUESTION = "What is {a} {op} {b}? Answer with just the number."


def problems() -> list[dict]:
    out = []
    for op, fn in (("+", lambda a, b: a + b), ("*", lambda a, b: a * b)):
        for a in range(1, 10):
            for b in range(1, 10):
                out.append({"prompt": [{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}],
                            "answer": str(fn(a, b))})
    return out


def split(items: list[dict], held_out: float = 1 / 3, seed: int = 0) -> tuple[list[dict], list[dict]]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = round(len(items) * held_out)
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def main(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    train, evaluation = split(problems())
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with open(os.path.join(folder, name), "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(train)} training and {len(evaluation)} held-out problems in {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
