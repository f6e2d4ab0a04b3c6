"""book/_ext/interview_index.py: every chapter question lands on the drill page once, with its answer, a
topic from the small fixed set, and a link back to its section."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("interview_index", ROOT / "book" / "_ext" / "interview_index.py")
ii = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ii)


def test_every_question_has_a_drill_topic_answer_and_back_link():
    questions = ii.collect()
    assert len(questions) >= 60
    assert {q["drill_topic"] for q in questions} <= set(ii.TOPICS) and 8 <= len(ii.TOPICS) <= 10
    text = ii.render(questions)
    items = re.findall(r"^::::\{dropdown\}[^\n]*\n:class-container: iq-item iq-level-(\w+) iq-topic-(\w+) "
                       r"iq-chapter-(\w+)\n\n((?s:.+?))\n\n\*[^\n]*\]\((iq-[\w-]+)\)\n::::$", text, re.M)
    assert [(lv, t, label) for lv, t, _, _, label in items] == [
        (q["level"], q["drill_topic"], q["label"]) for q in questions]
    for (_, _, _, answer, _), q in zip(items, questions):
        assert answer.strip() and answer.strip() == q["answer"].strip() and ":::" not in answer


def test_a_tag_outside_the_map_in_an_unknown_chapter_is_an_error(tmp_path, monkeypatch):
    page = tmp_path / "x.md"
    page.write_text("# 9. New chapter\n\n(iq-x)=\n:::{dropdown} [easy · whimsy] Why?\nBecause.\n:::\n")
    monkeypatch.setattr(ii, "chapters", lambda: [page])
    with pytest.raises(ValueError, match="maps to no topic"):
        ii.collect()
    monkeypatch.setitem(ii.CHAPTER_TOPIC, "9", "storage")     # the chapter's subject is the fallback
    assert ii.collect()[0]["drill_topic"] == "storage" and ii.collect()[0]["answer"] == "Because.\n"
