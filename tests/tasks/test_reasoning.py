import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.tasks.reasoning import ArithmeticTask, CountdownTask, parse_expression


def test_arithmetic_rewards():
    t = ArithmeticTask(level=2, ops="+*", seed=0)
    probs = t.sample(50)
    assert all(t.reward(p, t.demonstration(p)) == 1.0 for p in probs)
    p = probs[0]
    assert t.reward(p, p.answer + "\nmore text") == 1.0
    assert t.reward(p, p.answer + "1\n") == 0.0
    assert t.reward(p, "") == 0.0 and t.reward(p, "\x00garbage") == 0.0
    with pytest.raises(ValueError, match="level=7 is out of range; valid: 1..4"):
        ArithmeticTask(level=7)


def test_countdown_rewards_and_number_use():
    t = CountdownTask(level=3, seed=1)
    for p in t.sample(30):
        assert t.reward(p, t.demonstration(p)) == 1.0
        assert 0 <= p.target
    from poise.tasks.reasoning import Problem

    p = Problem("3 4 5 -> 17:", "3*4+5", (3, 4, 5), 17)
    assert t.reward(p, "5+4*3\n") == 1.0
    assert t.reward(p, "4*4+1") == 0.0  # 4 used twice, 1 not given
    assert t.reward(p, "3*4+5+0") == 0.0  # 0 not given
    assert t.reward(p, "__import__('os')") == 0.0  # never evaluated as Python
    assert t.reward(p, "(3*4+5") == 0.0 and t.reward(p, "3/0") == 0.0


def test_parse_expression():
    v, used = parse_expression("(1+2)*3 - 4/2")
    assert v == 7 and used == [1, 2, 3, 4, 2]
    for bad in ("", "1+", "2**3", "1 2", "a"):
        with pytest.raises(ValueError):
            parse_expression(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+-*/() x", max_size=20))
def test_reward_never_raises_on_any_text(text):
    t = CountdownTask(level=2)
    p = t.sample(1)[0]
    assert t.reward(p, text) in (0.0, 1.0)
