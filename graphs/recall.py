"""Associative recall across segments: the synthetic task the shipped demo model is trained on.

Key-value pairs are scattered over the first S-1 segments; the last segment asks for every key. A
key's value can only come from the memory: the query segment holds no value token at all.

    vocabulary (64 ids)   0 PAD   1 QUERY   2..15 filler   16..47 keys (32)   48..63 values (16)

    context segment       . . k3 v9 . . . . . k17 v2 . . . . .     at most 2 pairs, never across a boundary
    filler segment        . . . . . . . . . . . . . . . . .        (a context segment with no pair)
    query segment         ? k17 ? k3 . . . . . . . . . . . .       one "? key" per pair, in random order

Scoring is exact: a query is right when the argmax over the whole vocabulary of the logits at the
key's place (the token after "?") is the pair's value. Chance is 1/16 = 6.25% for a model that
only knows the answer is a value.

`make_batch` is deterministic given its numpy Generator; `score` counts right answers.

`recall_words(task)` names every id with a word, so the task reads as text (the shipped model's
word-level tokenizer, models/armt-recall/tokenizer.json, is built from it by
scripts/make_recall_tokenizer.py):

    0 <pad>   1 ?   filler: the a of and ...   keys: apple bear cake ...   values: red blue green ...

    context   "... of apple red the so in jar blue a ..."      question   "? jar"   answer   "blue"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from graphs.errors import InputError

PAD, QUERY = 0, 1


@dataclass(frozen=True)
class RecallTask:
    """The task's vocabulary and segment geometry (`recall_task.json` in the model directory)."""

    segment_size: int = 16
    n_filler: int = 14
    n_keys: int = 32
    n_values: int = 16
    pairs_per_segment: int = 2

    def __post_init__(self) -> None:
        if self.segment_size < 4 or self.segment_size % 2:
            raise InputError(f"segment_size must be even and >= 4, got {self.segment_size}")
        if 2 * self.pairs_per_segment > self.segment_size:
            raise InputError("pairs_per_segment does not fit into a segment")
        for name in ("n_filler", "n_keys", "n_values", "pairs_per_segment"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1")

    # token id ranges
    @property
    def filler_lo(self) -> int:
        return 2

    @property
    def key_lo(self) -> int:
        return self.filler_lo + self.n_filler

    @property
    def value_lo(self) -> int:
        return self.key_lo + self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.value_lo + self.n_values

    @property
    def max_queries(self) -> int:
        return self.segment_size // 2

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def max_pairs(self, n_segments: int) -> int:
        """How many pairs fit: capacity of the context segments and of the query segment."""
        return min((n_segments - 1) * self.pairs_per_segment, self.max_queries, self.n_keys)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RecallTask":
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) - known:
            raise InputError(f"recall task settings must be an object with keys from {sorted(known)}")
        return cls(**data)


PAD_WORD, QUERY_WORD = "<pad>", "?"
FILLER_WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "on", "at", "by", "so", "as", "or")
KEY_WORDS = ("apple", "bear", "cake", "door", "eagle", "fish", "goat", "hat", "ink", "jar", "kite", "lamp",
             "moon", "nest", "owl", "pen", "queen", "rope", "sock", "tent", "vase", "wolf", "yak", "zebra",
             "anchor", "bell", "coin", "drum", "egg", "flag", "gate", "harp")
VALUE_WORDS = ("red", "blue", "green", "yellow", "black", "white", "pink", "gray", "brown", "orange",
               "purple", "gold", "silver", "cyan", "teal", "navy")


def recall_words(task: RecallTask) -> list[str]:
    """The word of every token id of the task (index = id), for its word-level tokenizer."""
    groups = ((FILLER_WORDS, task.n_filler, "filler"), (KEY_WORDS, task.n_keys, "key"),
              (VALUE_WORDS, task.n_values, "value"))
    words = [PAD_WORD, QUERY_WORD]
    for names, n, what in groups:  # the shipped task's sizes have names; other sizes get numbered words
        words += list(names[:n]) if n <= len(names) else [f"{what}{i}" for i in range(n)]
    if len(set(words)) != len(words) or len(words) != task.vocab_size:
        raise InputError("the recall task's words are not distinct")  # a bug in the tables above
    return words


@dataclass
class RecallBatch:
    input_ids: np.ndarray  # (B, S*T) int64
    query_pos: np.ndarray  # (B, Q) int64: place of each queried key (its logits give the answer)
    answers: np.ndarray  # (B, Q) int64: the value token
    query_valid: np.ndarray  # (B, Q) bool: rows with fewer pairs leave trailing queries unused
    n_segments: int
    segment_size: int

    @property
    def n_queries(self) -> int:
        return int(self.query_valid.sum())

    def last_segment(self) -> "RecallBatch":
        """Only the query segment (for the memory-zeroed control): positions shift by (S-1)*T."""
        off = (self.n_segments - 1) * self.segment_size
        pos = np.where(self.query_valid, self.query_pos - off, 0)
        return RecallBatch(self.input_ids[:, off:].copy(), pos, self.answers.copy(),
                           self.query_valid.copy(), 1, self.segment_size)


def make_batch(task: RecallTask, batch: int, n_segments: int, n_pairs: int | tuple[int, int],
               rng: np.random.Generator) -> RecallBatch:
    """`batch` rows of `n_segments` segments; `n_pairs` fixed or a (lo, hi) range sampled per row.

    Pairs go into context segments drawn uniformly (at most `pairs_per_segment` each), at random
    non-overlapping even places; keys are distinct within a row, values drawn with replacement.
    Queries sit at random distinct even places of the last segment. Vectorised over rows.
    """
    T, P, Q = task.segment_size, task.pairs_per_segment, task.max_queries
    S = n_segments
    if S < 2:
        raise InputError(f"the recall task needs at least 2 segments (context + query), got {S}")
    lo, hi = (n_pairs, n_pairs) if isinstance(n_pairs, int) else n_pairs
    cap = task.max_pairs(S)
    if not 1 <= lo <= hi <= cap:
        raise InputError(f"n_pairs {n_pairs} out of range 1..{cap} for {S} segments")
    B = batch
    rows = np.broadcast_to(np.arange(B)[:, None], (B, hi))  # (B, hi)
    n = rng.integers(lo, hi + 1, size=B)  # (B,) pairs of each row
    valid = np.arange(hi)[None, :] < n[:, None]  # (B, hi)
    keys = task.key_lo + np.argsort(rng.random((B, task.n_keys)), axis=1)[:, :hi]  # distinct per row
    values = task.value_lo + rng.integers(0, task.n_values, size=(B, hi))
    # pair i takes "pair slot" slot[i] (distinct) of the (S-1) * P slots: segment slot // P, and
    # within that segment the (slot % P)-th entry of a random order of its T/2 even places
    slot = np.argsort(rng.random((B, (S - 1) * P)), axis=1)[:, :hi]  # (B, hi)
    seg = slot // P
    place = np.argsort(rng.random((B, S - 1, T // 2)), axis=2)  # (B, S-1, T/2)
    key_at = seg * T + 2 * place[rows, seg, slot % P]  # (B, hi)
    q_at = (S - 1) * T + 2 * np.argsort(rng.random((B, Q)), axis=1)[:, :hi]  # (B, hi) the "?" places

    ids = rng.integers(task.filler_lo, task.key_lo, size=(B, S * T))  # filler everywhere
    r, v = rows[valid], valid
    ids[r, key_at[v]] = keys[v]
    ids[r, key_at[v] + 1] = values[v]
    ids[r, q_at[v]] = QUERY
    ids[r, q_at[v] + 1] = keys[v]
    query_pos = np.zeros((B, Q), dtype=np.int64)
    answers = np.zeros((B, Q), dtype=np.int64)
    query_valid = np.zeros((B, Q), dtype=bool)
    query_pos[:, :hi] = np.where(valid, q_at + 1, 0)
    answers[:, :hi] = np.where(valid, values, 0)
    query_valid[:, :hi] = valid
    return RecallBatch(ids.astype(np.int64), query_pos, answers, query_valid, S, T)


def predictions(logits, batch: RecallBatch) -> np.ndarray:
    """Argmax token at every query place: logits (B, N, V) (numpy or torch) -> (B, Q) int64."""
    lg = logits.detach().float().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
    if lg.ndim != 3 or lg.shape[:2] != batch.input_ids.shape:
        raise InputError(f"logits of shape {lg.shape} do not match the batch {batch.input_ids.shape}")
    if not np.isfinite(lg).all():
        raise InputError("logits hold NaN or Inf")
    rows = np.arange(lg.shape[0])[:, None]
    return lg[rows, batch.query_pos].argmax(-1).astype(np.int64)  # (B, Q)


def score(logits, batch: RecallBatch) -> tuple[int, int]:
    """(right answers, queries)."""
    pred = predictions(logits, batch)
    return int(((pred == batch.answers) & batch.query_valid).sum()), batch.n_queries


def accuracy(logits, batch: RecallBatch) -> float:
    right, total = score(logits, batch)
    return right / max(total, 1)
