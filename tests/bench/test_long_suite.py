"""The long-context suite (bench/long_suite.py): prompts of the asked lengths from held-out documents, one per
task, and a report that keeps time to first token apart from decode speed. A tiny model, a character tokenizer and
lengths of a few hundred characters stand in for SmolLM2 and 2k-8k."""
import re
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from hasten.bench import long_suite
from hasten.cli import main
from hasten.engine import Engine
from hasten.models.loading import LoadedModel
from hasten.sparsity.corpus import load as load_corpus
from tests.conftest import tiny_hf_config, tiny_model


class CharTokenizer:
    """One token per character (ids 2..127; 1 = EOS), with a chat template."""
    eos_token_id = 1
    chat_template = "<user>…<assistant>"

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(c) if 2 <= ord(c) < 128 else ord("?") for c in text])

    def decode(self, ids, **kw):
        return "".join(chr(i) for i in ids if i >= 2)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __len__(self):
        return 128


MODULES = ["json", "csv", "zipfile", "pathlib", "shutil", "tarfile"]


def document(d: int) -> str:
    return "".join(f"Document {d} sentence {i} explains how the {MODULES[i % 6]} module handles its input files. "
                   for i in range(14))


@pytest.fixture(scope="module")
def engine():
    model = tiny_model(5, vocab_size=128, max_position_embeddings=2048)
    loaded = LoadedModel(model, CharTokenizer(), tiny_hf_config(vocab_size=128, max_position_embeddings=2048), "tiny", "tiny", "tiny-long", "fp32")
    return Engine(loaded)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")  # a quarter of the files (by path hash) are held out
    for d in range(80):
        (root / f"doc{d}.txt").write_text(document(d))
    return str(root)


def test_prompts_have_the_asked_lengths_one_per_task_from_held_out_text(engine, corpus):
    prompts = long_suite.build_prompts(engine, (800, 1600), max_new_tokens=4, corpus=corpus)
    assert [(p.length, p.task) for p in prompts] == [(n, t) for n in (800, 1600) for t in long_suite.TASKS]
    heldout = "\n\n".join(load_corpus(corpus).texts("heldout"))
    docs = {}
    for p in prompts:
        text = engine.tokenizer.decode(p.ids)
        assert p.length - 64 <= len(p.ids) <= p.length
        if p.task == "continue":
            assert text in heldout  # held-out documents themselves
        else:
            assert text.startswith("<user>") and text.endswith("<assistant>")
        docs[p.prompt_id] = set(re.findall(r"Document (\d+) ", text))
        assert docs[p.prompt_id] and all(f"Document {d} sentence 0 " in heldout for d in docs[p.prompt_id])
    question = engine.tokenizer.decode(prompts[1].ids)
    phrase = question.split('begins "')[1].split('"')[0]
    assert phrase in question.split("In the document above")[0]  # the answer sits in the document
    short = set().union(*(docs[f"800/{t}"] for t in long_suite.TASKS))
    assert not short & set().union(*(docs[f"1600/{t}"] for t in long_suite.TASKS))  # other documents per length


def test_run_reports_time_to_first_token_apart_from_decode_speed(engine, corpus):
    prompts = long_suite.build_prompts(engine, (600, 1200), max_new_tokens=6, corpus=corpus)
    records = long_suite.run(engine, prompts, ("baseline", "prompt-lookup"), rounds=1, max_new_tokens=6,
                             progress=False)
    assert len(records) == 2 * len(prompts)
    assert all(0 < r["first_token_seconds"] <= r["seconds"] and r["tokens"] == 6 for r in records)
    summary = long_suite.summarize(records, "baseline")
    assert summary["lengths"] == ["600", "1200"]
    for g in ("600", "1200"):
        e = summary["methods"]["prompt-lookup"][g]
        assert e["identical"] == [3, 3]  # lossless: baseline's tokens
        assert e["decode_tokens_per_s"] > 0 and e["first_token_seconds"] > 0
    assert "TTFT" in long_suite.terminal(summary)


def test_summary_math_keeps_the_first_token_out_of_decode_speed():
    def rec(method, qid, rnd, seconds, first, tokens=11):
        return {"method": method, "question_id": qid, "category": "4096", "round": rnd, "prompt_tokens": 4000,
                "tokens": tokens, "seconds": seconds, "first_token_seconds": first, "token_ids": [tokens]}
    records = [rec("baseline", "a", 0, 3.0, 2.0), rec("baseline", "b", 0, 5.0, 3.0),
               rec("fast", "a", 0, 2.5, 2.0), rec("fast", "b", 0, 3.5, 2.5, tokens=9)]
    s = long_suite.summarize(records, "baseline")["methods"]
    assert s["baseline"]["4096"]["decode_tokens_per_s"] == pytest.approx(20 / 3.0)  # 10 + 10 tokens after the first
    assert s["fast"]["4096"]["decode_tokens_per_s"] == pytest.approx(18 / 1.5)
    assert s["fast"]["4096"]["decode_speedup"] == pytest.approx((18 / 1.5) / (20 / 3.0))
    assert s["fast"]["4096"]["first_token_seconds"] == pytest.approx(2.25)  # the median
    assert s["fast"]["4096"]["tokens_per_s"] == pytest.approx(20 / 6.0)
    assert s["fast"]["4096"]["end_to_end_speedup"] == pytest.approx((20 / 6.0) / (22 / 8.0))  # prefill included
    assert s["fast"]["4096"]["identical"] == [1, 2]


@pytest.mark.parametrize("args,needle", [(["--lengths", "abc"], "--lengths"), (["--lengths", "4"], "≥ 16"),
                                         (["--questions", "q.jsonl"], "drop --questions")])
def test_bad_long_suite_options_are_one_line(args, needle):
    result = CliRunner().invoke(main, ["bench", "--suite", "long", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output and needle in result.output
