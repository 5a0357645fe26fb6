"""AceReason's sampling recipe (arXiv 2505.16400): staged length limits and overlong filtering."""

import pytest
import torch

from poise.rl import aggregate, length_stage, overlong_filter, truncated_rows, validate_stages


def test_stages_split_the_steps_equally():
    assert [length_stage(n, 6, [2, 3, 5]) for n in range(1, 7)] == [2, 2, 3, 3, 5, 5]
    # 7 steps, 3 stages: floor((n-1)*3/7) = 0,0,0,1,1,2,2
    assert [length_stage(n, 7, [8, 16, 24]) for n in range(1, 8)] == [8, 8, 8, 16, 16, 24, 24]
    assert [length_stage(n, 3, [4]) for n in (1, 2, 3)] == [4, 4, 4]


@pytest.mark.parametrize("stages, message", [([3, 2], r"does not shrink \(3 then 2\)"), ([0], r"stages\[0\]=0"),
                                             ([2, 2.5], r"stages\[1\]=2.5")])
def test_bad_stages_name_the_value(stages, message):
    with pytest.raises(ValueError, match=message):
        validate_stages(stages)


def test_step_out_of_range():
    with pytest.raises(ValueError, match="step=0 must be in 1..steps=4"):
        length_stage(0, 4, [2])


def test_truncated_rows_look_for_eos():
    eos = 11
    comps = [torch.tensor([1, 2, eos]), torch.tensor([1, 2, 3]), torch.tensor([eos]), torch.tensor([4, eos, 5])]
    assert truncated_rows(comps, eos).tolist() == [False, True, False, False]


def test_filtered_rows_leave_the_loss_and_its_denominator():
    values = torch.tensor([[1.0, 2.0, 0.0], [10.0, 20.0, 30.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kept = overlong_filter(mask, torch.tensor([False, True, False]))
    assert kept.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    # token mean over the 3 kept tokens: (1 + 2 + 4) / 3; the truncated row's 60 is gone
    assert float(aggregate(values, kept, "token_mean")) == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match=r"truncated has shape \(2,\); expected \(3,\)"):
        overlong_filter(mask, torch.tensor([True, False]))
