"""What the chat model is asked in its evaluation: 20 fixed prompts, arithmetic problems, MC probes.

Each fixed prompt has the words an on-topic answer contains (any one of them, case-insensitive);
the evaluation reports them so that tests/server/model/test_default_model.py's thresholds can be
set from what the shipped model does.
"""

from __future__ import annotations

import random
import re

from mctrain.chat_sources import HELDOUT_PER_MILLE, OPS, stable_share

# (prompt, words of which an on-topic answer contains at least one)
PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Hello! Who are you?", ("model", "mcserve", "assistant", "I am", "I'm")),
    ("What is 2 + 3?", ("5",)),
    ("What is 7 + 8?", ("15",)),
    ("What is 9 - 4?", ("5",)),
    ("What is 6 x 7?", ("42",)),
    ("What does happiness mean?", ("happiness", "happy")),
    ('What does the word "river" mean?', ("river", "water", "stream")),
    ("Define courage.", ("courage", "fear", "brave")),
    ("What is the meaning of ocean?", ("ocean", "sea", "water")),
    ("Who was Albert Einstein?", ("Einstein", "physicist", "relativity")),
    ("Tell me about William Shakespeare.", ("Shakespeare", "playwright", "poet", "English")),
    ("What is Paris?", ("Paris", "France", "city", "capital")),
    ("Tell me about the Moon.", ("Moon", "Earth", "satellite")),
    ("How are you today?", ("good", "fine", "well", "great", "okay", "I")),
    ("What is your name?", ("name", "model", "mcserve", "I")),
    ("Do you have any pets?", ("dog", "cat", "pet", "no", "yes")),
    ("What is your favorite movie?", ("movie", "film", "like", "love", "favorite")),
    ("What can you do?", ("can", "chat", "help", "words", "arithmetic")),
    ("Thank you!", ("welcome", "glad", "pleasure", "help")),
    ("Goodbye!", ("bye", "goodbye", "see you", "day", "soon")),
)


def on_topic(answer: str, words: tuple[str, ...]) -> bool:
    """Whether `answer` contains one of `words` as a whole word (digits: as a whole number)."""
    return any(re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", answer, re.I) for w in words)


def arithmetic_problems(held_out: bool, n: int, max_operand: int = 99, seed: int = 0) -> list[tuple[str, int]]:
    """(question, answer) for up to `n` distinct problems of the training problem space
    (mctrain.chat_sources.arithmetic_problem: +, - up to 99, x up to 12) with operands <= max_operand,
    all held out of training or all trained on."""
    problems = []
    for op in ("+", "-", "*"):
        hi = min(12 if op == "*" else 99, max_operand)
        for a in range(hi + 1):
            for b in range(hi + 1):
                if op == "-" and b > a:
                    continue
                held = stable_share(f"arith/{a}{op}{b}") < HELDOUT_PER_MILLE
                if held == held_out:
                    problems.append((a, op, b))
    rng = random.Random(seed)
    rng.shuffle(problems)
    return [(f"What is {a} {op} {b}?", OPS[op][1](a, b)) for a, op, b in problems[:n]]


def answer_number(reply: str) -> int | None:
    """The number an arithmetic reply gives: the first integer after the first "=", else the last
    integer in the reply, else None."""
    after = reply.split("=", 1)[1] if "=" in reply else None
    found = re.findall(r"-?\d+", after) if after is not None else []
    found = found or re.findall(r"-?\d+", reply)
    return int(found[0] if after is not None and found else found[-1]) if found else None
