"""Labelled records for training and evaluating detectors: the shipped seed data and the public datasets.

Seed data: `<shipped SAE>/concepts/<concept>.jsonl` (chat records with `label` and `split`).
Public data: `<shared>/datasets/<name>.jsonl` (`text` records with `label` and `meta`); `<shared>` is
`$FEATUREWATCH_SHARED_DIR`, else `<repo>/../shared`. Files there are read-only and may be absent.

Splits of public data are deterministic and independent of file order: records are grouped (pair_id /
group_id / question_id, so both members of a CrowS-Pairs or StereoSet pair, a BBQ item's answers and a
TruthfulQA question's answers always land together), groups are stratified by the labels they hold, and
within each stratum the groups with the smallest sha256 of `<file>|<group>` form the test share.

Chat form (`chat=True`): a `text` record becomes a user prompt + assistant completion, so a detector
trained on completions reads it the way it is served. Q/A-shaped texts are split at the answer
(TruthfulQA "Q: …\\nA: …", BBQ "…\\nQuestion: …\\nAnswer: …", StereoSet context + sentence); other texts
go behind a fixed prompt ("Write a message." unless the suite gives one). The label then describes the
assistant turn only, which is what the detectors score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sae_assets.registry import ASSETS_DIR, DEFAULT_SAE
from sae_assets.text import read_jsonl

Split = Literal["train", "test"]
SEED_CONCEPTS: tuple[str, ...] = ("scam", "deception", "bias", "falsehood")
GROUP_KEYS: tuple[str, ...] = ("pair_id", "group_id", "question_id")
DEFAULT_PROMPT = "Write a message."
_QA = re.compile(r"^Q: (?P<q>.*?)\nA: (?P<a>.*)$", re.S)
_BBQ = re.compile(r"^(?P<q>.*\nQuestion: .*?)\nAnswer: (?P<a>.*)$", re.S)


class DatasetError(ValueError):
    """A dataset that cannot be found or read; the message names the file and what exists."""


# ---- locations -------------------------------------------------------------------------------------
def shared_dir() -> Path:
    raw = os.environ.get("FEATUREWATCH_SHARED_DIR")
    return Path(raw).expanduser() if raw else Path(__file__).resolve().parent.parent.parent / "shared"


def datasets_dir() -> Path:
    return shared_dir() / "datasets"


def seed_dir(sae: str | Path = DEFAULT_SAE) -> Path:
    """`concepts/` of an SAE folder (a path) or of a shipped SAE (a name; no weights needed)."""
    path = Path(sae)
    return (path if path.is_dir() else ASSETS_DIR / str(sae)) / "concepts"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    try:
        return [rec for _, rec in read_jsonl(path)]
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None


# ---- seed data -------------------------------------------------------------------------------------
def load_seed(
    concept: str, split: Split | None = None, *, sae: str | Path = DEFAULT_SAE
) -> list[dict[str, Any]]:
    """The hand-written records of `concept` (one split, or all of them), in file order."""
    folder = seed_dir(sae)
    path = folder / f"{concept}.jsonl"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in folder.glob("*.jsonl"))) or "none"
        raise DatasetError(f"no seed data for concept {concept!r} in {folder}; available: {have}")
    return [r for r in read_records(path) if split is None or r.get("split") == split]


# ---- deterministic grouping, splitting and sampling ----------------------------------------------------
def stable_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def group_key(rec: dict[str, Any]) -> str:
    """Records that must stay together: same pair/group/question, else the record alone."""
    meta = rec.get("meta") or {}
    for key in GROUP_KEYS:
        if meta.get(key) is not None:
            return f"{key}={meta[key]}"
    return f"id={rec.get('id')}"


def _groups(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[group_key(r)].append(r)
    return out


def split_records(
    records: Sequence[dict[str, Any]], split: Split, *, test_frac: float = 0.3, salt: str = ""
) -> list[dict[str, Any]]:
    """The `split` part of `records` (input order kept). Stratum = the sorted labels of a group, so
    single records stratify by label and pairs by their (0, 1) make-up; round(test_frac · n) groups of
    each stratum go to test."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    strata: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    groups = _groups(records)
    for key, members in groups.items():
        strata[tuple(sorted(str(m.get("label")) for m in members))].append(key)
    test: set[str] = set()
    for keys in strata.values():
        ranked = sorted(keys, key=lambda k: (stable_hash(salt, k), k))
        test.update(ranked[: round(test_frac * len(ranked))])
    return [r for r in records if (group_key(r) in test) == (split == "test")]


def subsample(records: Sequence[dict[str, Any]], max_n: int, *, salt: str = "") -> list[dict[str, Any]]:
    """At most `max_n` records, whole groups only, labels as balanced as the data allows (each label
    gets an equal share; a label with fewer records gives its unused share to the others). Groups are
    taken in sha256 order, so the sample is deterministic; input order is kept."""
    if len(records) <= max_n:
        return list(records)
    avail = Counter(r.get("label") for r in records)
    quota: dict[Any, int] = {}
    left, labels = max_n, sorted(avail, key=lambda lab: avail[lab])
    for i, lab in enumerate(labels):  # water-filling: smallest classes first
        quota[lab] = min(avail[lab], left // (len(labels) - i))
        left -= quota[lab]
    taken: Counter[Any] = Counter()
    keep: set[str] = set()
    groups = _groups(records)
    for key in sorted(groups, key=lambda k: (stable_hash(salt, "sample", k), k)):
        need = Counter(m.get("label") for m in groups[key])
        if all(taken[lab] + n <= quota[lab] for lab, n in need.items()):
            keep.add(key)
            taken.update(need)
    return [r for r in records if group_key(r) in keep]


def filter_meta(
    records: Iterable[dict[str, Any]], where: Mapping[str, Sequence[Any]]
) -> list[dict[str, Any]]:
    """Records whose meta[field] is one of the listed values, for every field in `where`."""
    return [r for r in records if all((r.get("meta") or {}).get(k) in vals for k, vals in where.items())]


# ---- chat form ---------------------------------------------------------------------------------------
def to_chat(rec: dict[str, Any], prompt: str | None = None) -> dict[str, Any]:
    """A `text` record as user prompt + assistant completion (see the module doc); others unchanged."""
    if "messages" in rec or not isinstance(rec.get("text"), str):
        return rec
    text, meta = rec["text"], rec.get("meta") or {}
    m = _QA.match(text) or _BBQ.match(text)
    if m and prompt is None:
        user, answer = m.group("q").removeprefix("Q: "), m.group("a")
    elif prompt is None and meta.get("context") and meta.get("sentence"):
        user, answer = f"Continue: {meta['context']}", str(meta["sentence"])
    else:
        user, answer = prompt or DEFAULT_PROMPT, text
    out = {k: v for k, v in rec.items() if k != "text"}
    out["messages"] = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


def monitored_text(rec: dict[str, Any]) -> str:
    """What a completion-scope detector reads: the last assistant turn, else the text (for baselines)."""
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
        return str(msgs[-1].get("content", ""))
    if isinstance(rec.get("text"), str):
        return str(rec["text"])
    return "\n".join(str(m.get("content", "")) for m in msgs or [])


def as_text(rec: dict[str, Any]) -> dict[str, Any]:
    """The record's monitored message alone, as a `text` record (id + "#text"): how a message arrives
    without its conversation (a pasted or forwarded mail), so a message detector trained on it cannot lean
    on a request that names the label ("Write a phishing email …")."""
    out = {k: v for k, v in rec.items() if k != "messages"}
    out["id"] = f"{rec.get('id')}#text"
    out["text"] = monitored_text(rec)
    return out


def truncate_records(
    records: Iterable[dict[str, Any]], tokenizer: Any, max_tokens: int
) -> list[dict[str, Any]]:
    """Cut the monitored part (last assistant turn, or `text`) to its first `max_tokens` tokens: long
    emails and reviews would otherwise dominate extraction time without changing the label."""
    out = []
    for rec in records:
        body = monitored_text(rec)
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            out.append(rec)
            continue
        cut = tokenizer.decode(ids[:max_tokens])
        if "messages" in rec:
            msgs = [*rec["messages"][:-1], {**rec["messages"][-1], "content": cut}]
            out.append({**rec, "messages": msgs})
        else:
            out.append({**rec, "text": cut})
    return out


# ---- public datasets and evaluation suites ----------------------------------------------------------
def resolve_public(path_or_name: str | Path) -> Path:
    """A file path, or a dataset name (`scam_sms_spam`, with or without .jsonl) under datasets_dir()."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    folder = datasets_dir()
    cand = folder / (path.name if path.suffix == ".jsonl" else f"{path.name}.jsonl")
    if cand.is_file():
        return cand
    have = ", ".join(sorted(p.stem for p in folder.glob("*.jsonl"))) if folder.is_dir() else "folder missing"
    raise DatasetError(
        f"dataset {str(path_or_name)!r} not found in {folder} ({have}); set FEATUREWATCH_SHARED_DIR"
    )


def load_public(
    path_or_name: str | Path,
    *,
    split: Split | None = None,
    where: Mapping[str, Sequence[Any]] | None = None,
    max_n: int | None = None,
    test_frac: float = 0.3,
    chat: bool = False,
    prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Records of a public dataset: the split (of the whole file), then the meta filter, then a balanced
    deterministic sample, then (with `chat`) the chat form. Salted by the file name, so every dataset
    splits independently."""
    path = resolve_public(path_or_name)
    recs = read_records(path)
    if split is not None:  # before filtering: a record's split must not depend on the slice asked for
        recs = split_records(recs, split, test_frac=test_frac, salt=path.stem)
    recs = filter_meta(recs, where or {})
    if max_n is not None:
        recs = subsample(recs, max_n, salt=path.stem)
    return [to_chat(r, prompt) for r in recs] if chat else recs


@dataclass(frozen=True)
class EvalSuite:
    name: str
    dataset: str  # file name under datasets_dir(), without .jsonl
    where: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    max_n: int = 400
    prompt: str | None = None  # chat prompt for plain texts; None: split Q/A texts, else DEFAULT_PROMPT
    note: str = ""

    def load(
        self, *, max_n: int | None = None, chat: bool = True, split: Split = "test"
    ) -> list[dict[str, Any]]:
        """The suite's records from one split of its dataset (the test split unless asked otherwise)."""
        n = self.max_n if max_n is None else min(max_n, self.max_n)
        recs = load_public(
            self.dataset, split=split, where=self.where, max_n=n, chat=chat, prompt=self.prompt
        )
        return [{**r, "suite": self.name} for r in recs]


_EMAIL, _SMS = "Write an email.", "Write a text message."
_GOT_OTHER = EvalSuite(
    "got-other",
    "deception_geometry_of_truth",
    {
        "subset": (
            "neg_cities",
            "sp_en_trans",
            "larger_than",
            "companies_true_false",
            "common_claim_true_false",
        )
    },
    400,
    "State a fact.",
)
# Public data per concept. scam: phishing and Enron spam are reported separately because Nazario phishing
# differs from Enron ham in style alone (case, tokenisation), while spam vs ham shares one source.
EVAL_SUITES: dict[str, list[EvalSuite]] = {
    "scam": [
        EvalSuite(
            "phishing-vs-ham",
            "scam_emails",
            {"kind": ("phishing", "ham")},
            400,
            _EMAIL,
            "Nazario phishing vs Enron ham: style-confounded (see the datasets README)",
        ),
        EvalSuite(
            "enron-spam-vs-ham",
            "scam_emails",
            {"kind": ("spam", "ham")},
            400,
            _EMAIL,
            "one source, no style confound; much spam is not a scam",
        ),
        EvalSuite("sms-spam", "scam_sms_spam", {}, 400, _SMS, "premium-rate/prize SMS spam vs personal SMS"),
    ],
    "deception": [
        EvalSuite(
            "got-cities",
            "deception_geometry_of_truth",
            {"subset": ("cities",)},
            300,
            "State a fact.",
            "false vs true templated statements (falsehood, not intent)",
        ),
        _GOT_OTHER,
        EvalSuite(
            "truthfulqa", "deception_truthfulqa", {}, 400, None, "imitative falsehoods, split by question"
        ),
        EvalSuite(
            "diplomacy",
            "deception_diplomacy",
            {},
            400,
            "Send a message to another player.",
            "real strategic lies, no game context",
        ),
        EvalSuite(
            "opinion-spam",
            "deception_opinion_spam",
            {},
            300,
            "Write a hotel review.",
            "fabricated vs genuine reviews",
        ),
    ],
    # falsehood: the statement's truth value, not intent (deception's suites include the same data, read
    # there as "does the intent-to-deceive detector see falsehood"). cities has 1,496 statements; its
    # train split (~700) is all used for training, since a truth probe is data-bound there (~0.93 AUROC).
    "falsehood": [
        EvalSuite(
            "got-cities",
            "deception_geometry_of_truth",
            {"subset": ("cities",)},
            800,
            "State a fact.",
            "false vs true templated statements",
        ),
        _GOT_OTHER,
        EvalSuite(
            "truthfulqa", "deception_truthfulqa", {}, 400, None, "imitative falsehoods, split by question"
        ),
    ],
    "bias": [
        EvalSuite(
            "crows-pairs",
            "bias_crows_pairs",
            {"stereo_antistereo": ("stereo",)},
            400,
            "Write a sentence.",
            "strict (stereo) pairs only",
        ),
        EvalSuite("stereoset-inter", "bias_stereoset_intersentence", {}, 400, None, "context → continuation"),
        EvalSuite("stereoset-intra", "bias_stereoset_intrasentence", {}, 400, "Write a sentence."),
        EvalSuite(
            "bbq-vs-unknown",
            "bias_bbq_ambiguous",
            {"answer_type": ("stereotype_consistent", "unknown")},
            300,
            None,
            "stereotyped pick vs 'cannot be determined' (the seed bbq_pick/bbq_unknown contrast)",
        ),
        EvalSuite(
            "bbq-minimal",
            "bias_bbq_ambiguous",
            {"answer_type": ("stereotype_consistent", "stereotype_inconsistent")},
            300,
            None,
            "stereotyped vs counter-stereotyped pick: both unjustified, minimal pair",
        ),
    ],
}


def public_train_records(
    concept: str,
    n_per_suite: int,
    *,
    suites: dict[str, list[EvalSuite]] | None = None,
    only: Sequence[str] | None = None,
    chat: bool = True,
) -> list[dict[str, Any]]:
    """Training records for `concept` from the public data: up to `n_per_suite` records (balanced,
    deterministic: load_public's subsample) from the TRAIN split of each of the concept's eval suites
    (`only`: just those whose names are listed). The split is the same per-file split the eval's test
    suites use, so no record here is ever in a test suite. Suites sharing a dataset (e.g. the two
    scam_emails slices share their ham) can pick the same record; it is kept once (first suite wins).
    `suite` is that first suite, `suites` every suite that drew the record (seed records have neither,
    so per-suite figures can count shared negatives in each suite). A suite's `max_n` caps its test
    records only: asking for more training records than that gets them (up to the train split's size).
    Missing files raise DatasetError: training on fewer suites than asked would be silent drift."""
    if n_per_suite <= 0:
        return []
    chosen = (suites if suites is not None else EVAL_SUITES).get(concept, [])
    if only is not None:
        chosen = [s for s in chosen if s.name in only]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for suite in chosen:
        uncapped = dataclasses.replace(suite, max_n=n_per_suite)  # the suite's cap sizes its test records
        for rec in uncapped.load(chat=chat, split="train"):
            kept = out.setdefault((suite.dataset, str(rec.get("id"))), {**rec, "suites": []})
            kept["suites"].append(suite.name)
    return list(out.values())


@dataclass(frozen=True)
class TrainingData:
    """What a detector was trained on, recorded in its spec (eval.train.data) so that `detectors eval` can
    rebuild the same records for the TF-IDF baseline. `extra_files` (`--train` files) are named only."""

    seed: bool = True
    public_per_suite: int = 0
    public_suites: tuple[str, ...] | None = None  # None: every eval suite of the concept
    max_tokens: int | None = None
    extra_files: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "public_per_suite": self.public_per_suite,
            "public_suites": None if self.public_suites is None else list(self.public_suites),
            "max_tokens": self.max_tokens,
            "extra_files": list(self.extra_files),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> TrainingData:
        """From a spec's eval.train.data; an older spec without it was trained on the seed split only."""
        raw = raw or {}
        suites = raw.get("public_suites")
        return cls(
            seed=bool(raw.get("seed", True)),
            public_per_suite=int(raw.get("public_per_suite") or 0),
            public_suites=None if suites is None else tuple(suites),
            max_tokens=raw.get("max_tokens"),
            extra_files=tuple(raw.get("extra_files") or ()),
        )

    def records(self, concept: str, *, sae: str | Path = DEFAULT_SAE) -> list[dict[str, Any]]:
        """Seed train split (if used) + the public train records, in that order (not the extra files)."""
        seed = load_seed(concept, "train", sae=sae) if self.seed else []
        public = public_train_records(concept, self.public_per_suite, only=self.public_suites)
        return seed + public
