"""Data for ``models/stdlib-llama-18m``, the small Llama the project trains and ships.

One module serves the training script (``tools/train_tiny_llama.py``), the quality
harness (``benchmarks/quality.py``) and the CPU tests, so that all of them build text,
tokens and retrieval prompts in exactly the same way:

- the corpus: the ``*.py`` files of a Python standard library, a held-out split chosen
  by a hash of each file's path relative to the library root (identical on every
  machine and Python version);
- the tokenizer: a byte-level BPE from the ``tokenizers`` library with every digit a
  token of its own (a 5-digit pass key is always 5 tokens);
- the retrieval tasks: a pass key, or key/value pairs, buried in real code at a chosen
  depth, with the question at the end.

Nothing here imports torch or vLLM; ``tokenizers`` and ``numpy`` are imported lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import string
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from tokenizers import Tokenizer

MODEL_NAME = "stdlib-llama-18m"
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "models" / MODEL_NAME
HELDOUT_RELPATH = Path("eval") / "heldout.txt"

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 8192
MAX_CONTEXT = 8192

# Held-out split: a file is held out when the first 8 bytes of sha256(relative path)
# taken modulo 1000 fall below this. Its text never enters training or the tokenizer.
HELDOUT_PER_MILLE = 50
# Documents of heldout.txt are separated by ASCII "record separator" (no stdlib source
# file used here contains it; files that do are skipped).
DOC_SEP = "\x1e"
HELDOUT_MAX_BYTES = 2_000_000
HELDOUT_MAX_FILE_BYTES = 150_000

# ---- corpus -------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    """Whether a stdlib file (path relative to the library root, '/'-separated) is held out."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 1000 < HELDOUT_PER_MILLE


def stdlib_sources(root: str | Path | None = None) -> list[tuple[str, str]]:
    """All ``*.py`` files of a standard library as (relative path, text), sorted by path.

    Skips site-packages, __pycache__, files that are not valid UTF-8 and files that
    contain :data:`DOC_SEP`.
    """
    root = Path(root) if root is not None else stdlib_root()
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if DOC_SEP in text or not text.strip():
                continue
            out.append((rel, text))
    out.sort()
    return out


def split_sources(
    sources: Sequence[tuple[str, str]],
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) by :func:`is_heldout`."""
    train = [s for s in sources if not is_heldout(s[0])]
    held = [s for s in sources if is_heldout(s[0])]
    return train, held


def build_heldout_text(
    sources: Sequence[tuple[str, str]],
    other_roots: Iterable[str | Path] = (),
    max_bytes: int = HELDOUT_MAX_BYTES,
) -> tuple[str, list[str]]:
    """The held-out evaluation text and the files it holds.

    Held-out files that also exist (same relative path) under every one of
    ``other_roots`` (other Python versions' libraries), at most
    :data:`HELDOUT_MAX_FILE_BYTES` each, in path order until ``max_bytes``; joined by
    :data:`DOC_SEP`.
    """
    others = [Path(r) for r in other_roots]
    docs: list[str] = []
    names: list[str] = []
    total = 0
    for rel, text in sources:
        if not is_heldout(rel):
            continue
        size = len(text.encode("utf-8"))
        if size > HELDOUT_MAX_FILE_BYTES:
            continue
        if not all((o / rel).is_file() for o in others):
            continue
        if total + size + 1 > max_bytes:
            break
        docs.append(text)
        names.append(rel)
        total += size + 1
    return DOC_SEP.join(docs), names


# Held-out files whose text is mostly in the training split under other paths (the codec
# tables share their mapping lines with the other codecs'), found by
# :func:`near_duplicate_share` over the 3.11.7 library the model was trained on (more
# than half of their lines of 16 characters or more): the model has seen them, and their
# perplexity windows score 1.03-1.13 in bf16. Listed so that the harness can leave them
# out without that library (tests/cpu/test_shipped_model.py recomputes it where present).
HELDOUT_NEAR_DUPLICATES = (
    "encodings/big5.py", "encodings/cp1125.py", "encodings/cp1252.py",
    "encodings/euc_jis_2004.py", "encodings/iso8859_4.py", "encodings/quopri_codec.py",
    "idlelib/idle_test/test_zoomheight.py",
)
NEAR_DUPLICATE_LINE_CHARS = 16  # lines this long or longer are compared
NEAR_DUPLICATE_SHARE = 0.5


def compared_lines(text: str) -> list[str]:
    """``text``'s lines that the near-duplicate test compares: stripped, at least
    NEAR_DUPLICATE_LINE_CHARS long."""
    return [s for s in (line.strip() for line in text.splitlines())
            if len(s) >= NEAR_DUPLICATE_LINE_CHARS]


def near_duplicate_share(doc: str, train_lines: set[str]) -> float:
    """The share of ``doc``'s :func:`compared_lines` that also occur in the training
    split (``train_lines``: the compared lines of its files)."""
    lines = compared_lines(doc)
    return sum(s in train_lines for s in lines) / max(len(lines), 1)


def heldout_files(model_dir: str | Path = MODEL_DIR) -> list[str]:
    """The held-out documents' library paths, in the order of :func:`read_heldout_docs`."""
    import json

    return json.loads((Path(model_dir) / "eval" / "heldout_files.json").read_text())["files"]


def near_duplicate_spans(model_dir: str | Path = MODEL_DIR,
                         tok: Tokenizer | None = None) -> list[tuple[int, int]]:
    """``[begin, end)`` token ranges of :func:`heldout_tokens` that hold the
    :data:`HELDOUT_NEAR_DUPLICATES` (with their EOS)."""
    tok = tok or load_tokenizer(model_dir)
    spans, pos = [], 0
    for name, doc in zip(heldout_files(model_dir), read_heldout_docs(model_dir), strict=True):
        n = len(encode_documents(tok, [doc]))
        if name in HELDOUT_NEAR_DUPLICATES:
            spans.append((pos, pos + n))
        pos += n
    return spans


def clean_windows(num_windows: int, length: int,
                  spans: Sequence[tuple[int, int]]) -> list[int]:
    """The indices of :func:`ppl_windows`' windows (``length`` tokens: BOS and ``length
    - 1`` of the stream) that hold no token of ``spans``."""
    step = length - 1
    return [i for i in range(num_windows)
            if not any(a < (i + 1) * step and i * step < b for a, b in spans)]


def read_heldout_docs(model_dir: str | Path = MODEL_DIR) -> list[str]:
    """The held-out documents shipped with the model."""
    text = (Path(model_dir) / HELDOUT_RELPATH).read_text(encoding="utf-8")
    return [d for d in text.split(DOC_SEP) if d]


# ---- tokenizer ----------------------------------------------------------------------------


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with one token per digit and BOS added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train :func:`new_tokenizer` on ``texts``."""
    from tokenizers import pre_tokenizers, trainers

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def save_tokenizer(tok: Tokenizer, model_dir: str | Path) -> None:
    """tokenizer.json plus the transformers-side files (PreTrainedTokenizerFast)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=1))
    (model_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_CONTEXT,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def load_tokenizer(model_dir: str | Path = MODEL_DIR) -> Tokenizer:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS."""
    return tok.encode(text, add_special_tokens=False).ids


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """All documents as one uint16 stream, each followed by EOS."""
    import numpy as np

    parts = []
    batch = 256
    for i in range(0, len(docs), batch):
        for enc in tok.encode_batch(list(docs[i:i + batch]), add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.uint16))
            parts.append(np.asarray([EOS_ID], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def heldout_tokens(model_dir: str | Path = MODEL_DIR, tok: Tokenizer | None = None) -> np.ndarray:
    """The shipped held-out text as one token stream (documents separated by EOS)."""
    tok = tok or load_tokenizer(model_dir)
    return encode_documents(tok, read_heldout_docs(model_dir))


def ppl_windows(stream: Sequence[int], length: int, max_tokens: int) -> list[list[int]]:
    """Back-to-back windows of ``length`` tokens (BOS + ``length - 1`` text tokens) until
    ``max_tokens`` text tokens are covered: the perplexity windows of training, harness
    and simulation alike."""
    out: list[list[int]] = []
    step = length - 1
    for s in range(0, len(stream) - step + 1, step):
        if len(out) * step >= max_tokens:
            break
        out.append([BOS_ID] + [int(t) for t in stream[s:s + step]])
    return out


# ---- retrieval tasks ----------------------------------------------------------------------

PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
# Training needles vary the words between the two mentions of the key, so that the
# second mention cannot be copied from a fixed distance back: the model has to find the
# key by what precedes it, as it must for the question. Evaluation uses PASSKEY_NEEDLE
# (the first filler).
PASSKEY_TRAIN_NEEDLE = "\nThe pass key is {key}.{filler} {key} is the pass key.\n"
PASSKEY_FILLERS = (" Remember it.", "", " Remember it well.", " Keep it in mind.",
                   " Do not forget it, please.", " Once more:", " It matters. Write it down.",
                   " Remember it. I repeat it here for you:")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
KV_NEEDLE = "\nThe value of key {key} is {value}.\n"
KV_QUESTION = "\nWhat is the value of key {key}? The value of key {key} is"
ANSWER = " {value}.\n"
TASKS = ("passkey", "kv")
# Pairs in an evaluation key/value prompt: the asked one plus distractors.
KV_EVAL_PAIRS = 8
# Tokens to generate to read an answer back: space, 5 digits, '.', newline.
ANSWER_MAX_TOKENS = 8


@dataclasses.dataclass
class Example:
    """One retrieval prompt. ``tokens`` = prompt (BOS first) + answer tokens."""

    tokens: list[int]
    prompt_len: int
    answer: str
    """The digits the model must produce."""
    depth: float
    task: str

    @property
    def prompt(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def answer_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def answer_correct(generated_text: str, answer: str) -> bool:
    """True when the first run of digits in the generated text is exactly the answer."""
    digits = ""
    for ch in generated_text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits == answer


class RetrievalTasks:
    """Builds pass-key and key/value prompts from a haystack token stream."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        vocab_size = tok.get_vocab_size()
        # tokens that begin with a line break (byte-level BPE merges a line break with
        # the next line's indentation, so few tokens end with one)
        self._starts_line = [
            tok.decode([i], skip_special_tokens=False).startswith("\n") for i in range(vocab_size)
        ]
        self.vocab_size = vocab_size
        self._passkey_question = encode(tok, PASSKEY_QUESTION)
        self._cache: dict[str, list[int]] = {}

    def enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = encode(self.tok, text)
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    # -- pieces
    @staticmethod
    def random_value(rng: random.Random) -> str:
        return str(rng.randrange(10000, 100000))

    @staticmethod
    def random_keys(rng: random.Random, n: int) -> list[str]:
        keys: list[str] = []
        while len(keys) < n:
            k = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
            if k not in keys:
                keys.append(k)
        return keys

    def answer_ids(self, value: str) -> list[int]:
        return self.enc(ANSWER.format(value=value))

    def snap(self, hay: Sequence[int], pos: int, window: int = 48) -> int:
        """Nearest insertion point within ``window`` at the end of a line (before a token
        that starts with a line break); ``pos`` itself if there is none."""
        n = len(hay)
        if pos <= 0 or pos >= n:
            return max(0, min(pos, n))
        for d in range(window + 1):
            for p in (pos - d, pos + d):
                if 0 < p < n and self._starts_line[hay[p]]:
                    return p
        return pos

    @staticmethod
    def _splice(hay: Sequence[int], inserts: list[tuple[int, list[int]]],
                starts: list[int] | None = None) -> list[int]:
        """``hay`` with each insert's tokens placed before hay[pos]; with ``starts``, that
        list receives where each insert begins in the result (in the order given)."""
        out: list[int] = []
        prev = 0
        order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
        where = [0] * len(inserts)
        for i in order:
            pos, ids = inserts[i]
            out.extend(hay[prev:pos])
            where[i] = len(out)
            out.extend(ids)
            prev = pos
        out.extend(hay[prev:])
        if starts is not None:
            starts[:] = where
        return out

    @staticmethod
    def _second_occurrence(seq: Sequence[int], sub: Sequence[int]) -> int:
        """Start of the second occurrence of ``sub`` in ``seq``, or -1."""
        seen = 0
        for i in range(len(seq) - len(sub) + 1):
            if list(seq[i:i + len(sub)]) == list(sub):
                seen += 1
                if seen == 2:
                    return i
        return -1

    @staticmethod
    def window(rng: random.Random, stream: Sequence[int], n: int) -> list[int]:
        """A random contiguous window of ``n`` tokens of the stream (repeated if short)."""
        if n <= 0:
            return []
        total = len(stream)
        if total >= n:
            start = rng.randrange(0, total - n + 1)
            part = stream[start:start + n]
            return part.tolist() if hasattr(part, "tolist") else [int(t) for t in part]
        whole = stream.tolist() if hasattr(stream, "tolist") else [int(t) for t in stream]
        return (whole * (n // total + 1))[:n]

    # -- evaluation prompts: exactly prompt_len tokens, question at the end
    def eval_example(self, task: str, rng: random.Random, stream: Sequence[int],
                     prompt_len: int, depth: float) -> Example:
        if task == "passkey":
            value = self.random_value(rng)
            needles = [(depth, self.enc(PASSKEY_NEEDLE.format(key=value)))]
            question = self._passkey_question
        elif task == "kv":
            keys = self.random_keys(rng, KV_EVAL_PAIRS)
            values = [self.random_value(rng) for _ in keys]
            needles = [(depth, self.enc(KV_NEEDLE.format(key=keys[0], value=values[0])))]
            needles += [(rng.random(), self.enc(KV_NEEDLE.format(key=k, value=v)))
                        for k, v in zip(keys[1:], values[1:], strict=True)]
            question = self.enc(KV_QUESTION.format(key=keys[0]))
            value = values[0]
        else:
            raise ValueError(f"unknown task {task!r}")
        hay_len = prompt_len - 1 - len(question) - sum(len(ids) for _, ids in needles)
        if hay_len < 0:
            raise ValueError(f"prompt_len {prompt_len} too short for task {task}")
        hay = self.window(rng, stream, hay_len)
        inserts = [(self.snap(hay, round(d * hay_len)), ids) for d, ids in needles]
        prompt = [BOS_ID] + self._splice(hay, inserts) + question
        assert len(prompt) == prompt_len
        return Example(prompt + self.answer_ids(value), prompt_len, value, depth, task)

    # -- training sequences: exactly length + 1 tokens (inputs + shifted targets)
    def training_sequence(self, kind: str, rng: random.Random, stream: Sequence[int],
                          length: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokens (length + 1) and the [start, end) token ranges to weight as answers.

        ``kind``: "lm" (plain text), "repeat" (plain text with a span of it repeated
        later), "passkey" (one needle, question + answer at the end) or "kv" (1-16 pairs
        anywhere, questions + answers for up to 8 of them at the end).
        Besides the answers, the ranges hold the short-distance copies inside a needle
        or question (the pass key's second mention in its needle, the key's second mention
        in a key/value question), which teach copying before long-distance retrieval.
        """
        n = length + 1
        if kind == "lm":
            return [BOS_ID] + self.window(rng, stream, n - 1), []
        if kind == "induction":
            # random tokens, one block repeated to the end: nothing predicts the block's
            # first occurrence and copying predicts all the rest, the plainest signal
            # there is for induction heads (attend to what followed this token before)
            block = rng.randint(8, max(8, min(256, length // 4)))
            ids = [rng.randrange(len(SPECIAL_TOKENS), self.vocab_size) for _ in range(block)]
            return [BOS_ID] + (ids * (n // block + 1))[: n - 1], []
        if kind == "repeat":
            # a span of the text appears again further on: plain language modelling that
            # pays for copying from far back (induction), with no marked tokens
            span = rng.randint(min(32, length // 8), max(32, min(512, length // 4)))
            hay = self.window(rng, stream, n - 1 - span)
            src = rng.randint(0, len(hay) - span)
            dst = self.snap(hay, rng.randint(src + span, len(hay)))
            dst = max(dst, src + span)
            return [BOS_ID] + self._splice(hay, [(dst, hay[src:src + span])]), []
        copies: list[tuple[int, list[int]]] = []  # (needle index, repeated tokens)
        if kind == "passkey":
            value = self.random_value(rng)
            filler = rng.choice(PASSKEY_FILLERS)
            needles = [self.enc(PASSKEY_TRAIN_NEEDLE.format(key=value, filler=filler))]
            copies.append((0, self.enc(value)))
            qa = [(self._passkey_question, self.answer_ids(value), [])]
        elif kind == "kv":
            # about 20 tokens per pair and 30 per question: keep them under half the length
            n_pairs = min(rng.randint(1, 16), max(1, length // 100))
            keys = self.random_keys(rng, n_pairs)
            values = [self.random_value(rng) for _ in keys]
            needles = [self.enc(KV_NEEDLE.format(key=k, value=v))
                       for k, v in zip(keys, values, strict=True)]
            asked = rng.sample(range(n_pairs), min(n_pairs, rng.randint(1, 8)))
            qa = [(self.enc(KV_QUESTION.format(key=keys[i])), self.answer_ids(values[i]),
                   self.enc(" " + keys[i])) for i in asked]
        else:
            raise ValueError(f"unknown kind {kind!r}")
        tail_len = sum(len(q) + len(a) for q, a, _ in qa)
        hay_len = n - 1 - tail_len - sum(len(x) for x in needles)
        if hay_len < 0:
            raise ValueError(f"length {length} too short for {kind}")
        hay = self.window(rng, stream, hay_len)
        inserts = [(self.snap(hay, rng.randint(0, hay_len)), ids) for ids in needles]
        starts: list[int] = []
        tokens = [BOS_ID] + self._splice(hay, inserts, starts)
        spans = []
        for i, sub in copies:
            at = self._second_occurrence(needles[i], sub)
            if at >= 0:
                spans.append((1 + starts[i] + at, 1 + starts[i] + at + len(sub)))
        for q, a, key in qa:
            at = self._second_occurrence(q, key) if key else -1
            if at >= 0:
                spans.append((len(tokens) + at, len(tokens) + at + len(key)))
            tokens += q
            spans.append((len(tokens), len(tokens) + len(a)))
            tokens += a
        assert len(tokens) == n, (len(tokens), n)
        return tokens, spans


def eval_grid(tasks: RetrievalTasks, stream: Sequence[int], task: str,
              contexts: Sequence[int], depths: Sequence[float], trials: int,
              seed: int = 1234, max_new_tokens: int = ANSWER_MAX_TOKENS) -> list[Example]:
    """``trials`` examples for every (context, depth); prompt length = context - max_new_tokens.

    Deterministic in (seed, task, context, depth, trial index).
    """
    out: list[Example] = []
    for ctx in contexts:
        for depth in depths:
            rng = random.Random(f"{seed}/{task}/{ctx}/{depth:.4f}")
            for _ in range(trials):
                out.append(tasks.eval_example(task, rng, stream, ctx - max_new_tokens, depth))
    return out


def passkey_prompts(seed: int, depths: Sequence[float], context: int = 6000,
                    model_dir: str | Path = MODEL_DIR) -> tuple[list[list[int]], list[str]]:
    """One pass-key prompt of ``context`` tokens of held-out text per needle depth, drawn
    in order from ``random.Random(seed)``, and the keys: the GPU tests' retrieval probes."""
    tok = load_tokenizer(model_dir)
    held = heldout_tokens(model_dir, tok)
    tasks = RetrievalTasks(tok)
    rng = random.Random(seed)
    prompts, answers = [], []
    for depth in depths:
        ex = tasks.eval_example("passkey", rng, held, context, depth)
        prompts.append(list(ex.prompt))
        answers.append(ex.answer)
    return prompts, answers


def count_right(tokens: Sequence[Sequence[int]], answers: Sequence[str],
                model_dir: str | Path = MODEL_DIR) -> int:
    """How many generations (token ids) start their first run of digits with the key."""
    tok = load_tokenizer(model_dir)
    return sum(answer_correct(tok.decode(list(t)), a)
               for t, a in zip(tokens, answers, strict=True))
