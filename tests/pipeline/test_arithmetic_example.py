"""The SmolLM2 arithmetic example's data and verifiable reward (examples/smollm2_arithmetic): the split
holds out facts the training never shows, and the reward reads the completion's last number."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER = os.path.join(ROOT, "examples", "smollm2_arithmetic")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"arith_{name}", os.path.join(FOLDER, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_is_every_digit_sum_and_product_with_a_disjoint_held_out_third(tmp_path):
    make_data = _load("make_data")
    make_data.main(str(tmp_path))
    rows = {}
    for name in ("train", "eval"):
        with open(tmp_path / f"{name}.jsonl") as fh:
            rows[name] = [json.loads(line) for line in fh]
    assert (len(rows["train"]), len(rows["eval"])) == (108, 54)
    questions = {name: {r["prompt"][0]["content"] for r in rs} for name, rs in rows.items()}
    assert not questions["train"] & questions["eval"]
    assert len(questions["train"] | questions["eval"]) == 162
    for r in rows["train"] + rows["eval"]:
        a, op, b = r["prompt"][0]["content"].split("?")[0].split()[-3:]
        assert r["answer"] == str(int(a) + int(b) if op == "+" else int(a) * int(b))
        assert r["prompt"][0]["role"] == "user"


def test_exact_number_reads_the_last_number():
    rewards = _load("rewards")
    completions = ["The answer is 42.", "6 * 7 = 42", "42, or maybe 41", "forty-two", "1,024",
                   [{"role": "assistant", "content": "It is 42"}]]
    answers = ["42", "42", "42", "42", "1024", "42"]
    assert rewards.exact_number(None, completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
