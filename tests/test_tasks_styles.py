"""The style targets of task sequences: verbosity, shouting and listing."""

from __future__ import annotations

from esft.tasks import get_task


def test_style_tasks_share_the_conciseness_questions_with_their_own_instruction_and_reward() -> None:
    concise, verbose, shout = get_task("conciseness"), get_task("verbosity"), get_task("shouting")
    listing = get_task("listing")
    for task in (verbose, shout, listing):
        assert len(task.load("train")) == 48 and len(task.load("test")) == 128
        assert [e["prompt"] for e in task.load("test")] == [e["prompt"] for e in concise.load("test")]
        assert task.primary_metric == "reward" and task.version == "1"
    ex = verbose.load("test")[0]
    assert verbose.messages(ex)[0]["content"].endswith("Answer in detail.")
    assert shout.messages(ex)[0]["content"].endswith("Answer in capital letters.")
    assert verbose.reward("  Paris is the capital.  ", ex) == len("Paris is the capital.")
    assert verbose.reward("x" * 10_000, ex) == 400, "capped, and bounded work on hostile output"
    assert shout.reward("PARIS is Big", ex) == 6.0 and shout.reward(None, ex) == 0.0
    assert listing.messages(ex)[0]["content"].endswith("Answer as a list, one item per line.")
    assert listing.reward("- Paris\n\n- Lyon\n  \n- Nice\n", ex) == 2.0, "breaks between lines of text only"
    assert listing.reward("Paris.", ex) == 0.0 and listing.reward(None, ex) == 0.0
    assert listing.reward("a\n" * 10_000, ex) == 199.0, "bounded: only the first 400 characters are read"
    assert not verbose.is_correct("anything", ex)
