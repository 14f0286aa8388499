"""Conversations for the chat model, from the folder scripts/fetch_chat_sources.sh unpacks.

A conversation is a list of {"role", "content"} messages (system?, user, assistant, user, ...).
Every source yields (train, held-out) lists; the held-out share is picked by a hash of a stable key
(conversation id, headword, title, problem), so it does not move when other sources change.

| source | what becomes a conversation |
|---|---|
| chitchat | one chitchat-dataset conversation (cut into pieces of at most MAX_TURNS turns); its two
  participants become user and assistant |
| chatterbot | one chatterbot-corpus English exchange, plus the generated identity/greeting turns |
| wordnet | "what does X mean?" -> the first WordNet sense's gloss, naming the headword |
| wiki | "who/what is X?" -> the first sentences of the Wikipedia lead |
| arithmetic | "what is a + b?" -> "a + b = c." (+, -, x on small numbers) |
The single-turn sources are grouped 1-3 exchanges to a conversation, so that follow-up turns occur.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

MAX_TURNS = 16  # turns of one chitchat piece
MAX_MESSAGES_PER_TURN = 4  # a participant's consecutive messages kept per turn (some write monologues)
HELDOUT_PER_MILLE = 10
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer briefly.",
    "You are a helpful, concise assistant.",
)
SYSTEM_FRAC = 0.15
IDENTITY = (
    (("Who are you?", "What are you?", "Hello! Who are you?", "Hi, who am I talking to?", "Tell me about yourself."),
     ("I am a small language model: a Gated DeltaNet with Memory Caching, served by mcserve.",
      "I'm a small chat model running on mcserve. I can chat, explain words and do simple arithmetic.",
      "I am a tiny recurrent language model. I remember earlier parts of our chat through cached memory states.")),
    (("What is your name?", "What's your name?", "Do you have a name?"),
     ("I am the default model of mcserve.", "People call me the mcserve default model.")),
    (("Hello!", "Hi!", "Hello", "Hi there!", "Hey!", "Good morning!", "Good evening!"),
     ("Hello! How can I help you today?", "Hi! What would you like to talk about?", "Hello! Nice to meet you.")),
    (("Thank you!", "Thanks!", "Thanks a lot.", "Thank you very much."),
     ("You're welcome!", "Glad I could help.", "Any time!")),
    (("Goodbye!", "Bye!", "See you later.", "Good night!"),
     ("Goodbye! Have a nice day.", "Bye! Talk to you soon.", "See you!")),
    (("What can you do?", "How can you help me?"),
     ("I can chat with you, tell you what a word means, say a little about well-known people and things, "
      "and do simple arithmetic.",)),
)
OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}
ARITH_QUESTIONS = ("What is {a} {op} {b}?", "What's {a} {word} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?",
                   "How much is {a} {word} {b}?", "What is {a} {word} {b}?")
DEFINE_QUESTIONS = ("What does {w} mean?", "What is the meaning of {w}?", "Define {w}.",
                    'What does the word "{w}" mean?', "What is {w}?", "Explain the word {w}.")
DEFINE_ANSWERS = ('"{w}" means {d}.', "{W} means {d}.", 'The word "{w}" means {d}.', "{W}: {d}.")
WHO_WORDS = re.compile(r"\b(born|actor|actress|singer|writer|poet|painter|philosopher|politician|scientist|"
                       r"physicist|chemist|king|queen|emperor|president|composer|novelist|leader|mathematician|"
                       r"explorer|inventor|musician|artist|saint|pope|general|author|economist|biologist|"
                       r"astronomer|engineer|director|playwright|dramatist|sculptor|architect)\b|\d{3,4}\s*[–-]\s*\d{2,4}",
                       re.I)


def stable_share(key: str) -> int:
    """0..999, from a hash of `key`."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "little") % 1000


def split(items: list, key: Callable[[object], str]) -> tuple[list, list]:
    train, held = [], []
    for it in items:
        (held if stable_share(key(it)) < HELDOUT_PER_MILLE else train).append(it)
    return train, held


def chitchat(root: Path) -> tuple[list, list]:
    data = json.loads((root / "chitchat" / "dataset.json").read_text(encoding="utf-8"))
    convs = []
    for cid, conv in sorted(data.items()):
        turns = [" ".join(m["text"].strip() for m in turn[:MAX_MESSAGES_PER_TURN]) for turn in conv["messages"]]
        turns = [t for t in turns if t]
        for i in range(0, len(turns) - 1, MAX_TURNS):
            piece = turns[i:i + MAX_TURNS]
            if len(piece) >= 2:
                msgs = [dict(role="user" if j % 2 == 0 else "assistant", content=t) for j, t in enumerate(piece)]
                convs.append((f"{cid}/{i}", msgs))
    train, held = split(convs, key=lambda c: c[0].split("/")[0])
    return [m for _, m in train], [m for _, m in held]


def chatterbot(root: Path) -> list[tuple[str, list[dict]]]:
    """(key, exchange) pairs of the English yml files; a yml 'conversation' alternates user/assistant."""
    import yaml

    out = []
    for f in sorted((root / "chatterbot" / "english").glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for i, conv in enumerate(doc.get("conversations") or []):
            texts = [str(t).strip() for t in conv if str(t).strip()]
            if len(texts) >= 2:
                out.append((f"{f.stem}/{i}", [dict(role="user" if j % 2 == 0 else "assistant", content=t)
                                               for j, t in enumerate(texts)]))
    return out


def identity(rng: random.Random, copies: int) -> list[tuple[str, list[dict]]]:
    out = []
    for g, (questions, answers) in enumerate(IDENTITY):
        for q in questions:
            for c in range(copies):
                out.append((f"identity/{g}/{q}/{c}", [dict(role="user", content=q),
                                                      dict(role="assistant", content=rng.choice(answers))]))
    return out


def wordnet(root: Path, rng: random.Random, max_words: int) -> list[tuple[str, list[dict]]]:
    """First sense of each single-word lower-case lemma (the index lists senses by frequency)."""
    glosses: dict[tuple[str, str], str] = {}
    words: list[tuple[str, str, str]] = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / "wordnet" / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line and not line.startswith(" ") and "|" in line:
                glosses[(pos, line.split(" ", 1)[0])] = line.split("|", 1)[1].strip()
        for line in (root / "wordnet" / f"index.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line or line.startswith(" "):
                continue
            parts = line.split()
            lemma, n_senses = parts[0], int(parts[2])
            if not re.fullmatch(r"[a-z]{3,}", lemma):
                continue
            words.append((lemma, pos, parts[-n_senses]))  # the synset offsets close the line, most frequent first
    rng.shuffle(words)
    out, seen = [], set()
    for lemma, pos, off in words:
        if lemma in seen or (pos, off) not in glosses:
            continue
        seen.add(lemma)
        gloss = glosses[(pos, off)]
        definition = gloss.split(";")[0].strip().rstrip(".")
        examples = re.findall(r'"([^"]+)"', gloss)
        if not definition or definition.startswith('"'):
            continue
        if pos == "verb":
            definition = "to " + definition
        ans = rng.choice(DEFINE_ANSWERS).format(w=lemma, W=lemma.capitalize(), d=definition)
        if examples and rng.random() < 0.4:
            ans += f' For example: "{examples[0]}".'
        out.append((f"wordnet/{lemma}", [dict(role="user", content=rng.choice(DEFINE_QUESTIONS).format(w=lemma)),
                                          dict(role="assistant", content=ans)]))
        if len(out) >= max_words:
            break
    return out


def first_sentences(text: str, max_chars: int) -> str:
    """Whole sentences from the start of `text`, at least one, at most `max_chars` where possible."""
    sents = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip())
    out = sents[0]
    for s in sents[1:]:
        if len(out) + 1 + len(s) > max_chars:
            break
        out += " " + s
    return out


def wiki(root: Path, rng: random.Random) -> list[tuple[str, list[dict]]]:
    data = json.loads((root / "wiki" / "summaries_en-us.json").read_text(encoding="utf-8"))
    out = []
    for key, art in sorted(data.items()):
        title, extract = art.get("title") or key, (art.get("extract") or "").strip()
        if len(extract) < 40:
            continue
        person = bool(WHO_WORDS.search(art.get("description") or ""))
        q = rng.choice(("Who was {t}?", "Who is {t}?", "Tell me about {t}.") if person else
                       ("What is {t}?", "Tell me about {t}.", "What do you know about {t}?")).format(t=title)
        out.append((f"wiki/{title}", [dict(role="user", content=q),
                                      dict(role="assistant", content=first_sentences(extract, 400))]))
    return out


def arithmetic_problem(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice("++--*")
    if op == "*":
        return rng.randint(0, 12), op, rng.randint(0, 12)
    hi = 20 if rng.random() < 0.6 else 99
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def arithmetic_turn(a: int, op: str, b: int, rng: random.Random) -> list[dict]:
    word, fn = OPS[op]
    q = rng.choice(ARITH_QUESTIONS).format(a=a, b=b, op="x" if op == "*" and rng.random() < 0.5 else op, word=word)
    return [dict(role="user", content=q), dict(role="assistant", content=f"{a} {op} {b} = {fn(a, b)}.")]


def arithmetic(rng: random.Random, n: int) -> list[tuple[str, list[dict]]]:
    return [(f"arith/{a}{op}{b}", arithmetic_turn(a, op, b, rng))
            for a, op, b in (arithmetic_problem(rng) for _ in range(n))]


def group(exchanges: list[list[dict]], rng: random.Random) -> list[list[dict]]:
    """Shuffle single exchanges and join 1-3 of them into one conversation; some get a system prompt."""
    items = list(exchanges)
    rng.shuffle(items)
    out, i = [], 0
    while i < len(items):
        k = rng.choice((1, 1, 2, 3))
        conv = [m for ex in items[i:i + k] for m in ex]
        if rng.random() < SYSTEM_FRAC:
            conv = [dict(role="system", content=rng.choice(SYSTEM_PROMPTS))] + conv
        out.append(conv)
        i += k
    return out


def build(root: str | Path, seed: int = 0, max_words: int = 60000, n_arith: int = 60000,
          repeats: dict[str, int] | None = None) -> dict[str, tuple[list, list]]:
    """{source: (train conversations, held-out conversations)}. `repeats` multiplies a source's
    training conversations (chatterbot and identity are small)."""
    root = Path(root)
    rng = random.Random(seed)
    reps = dict(chatterbot=3, **(repeats or {}))
    out = {"chitchat": chitchat(root)}
    singles = dict(chatterbot=chatterbot(root) + identity(rng, 4), wordnet=wordnet(root, rng, max_words),
                   wiki=wiki(root, rng), arithmetic=arithmetic(rng, n_arith))
    for name, items in singles.items():
        train, held = split(items, key=lambda it: it[0])  # by key: a held-out problem or word is never trained on
        out[name] = (group([ex for _, ex in train] * reps.get(name, 1), rng), group([ex for _, ex in held], rng))
    return out
