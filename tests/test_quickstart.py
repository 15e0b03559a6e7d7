"""The quickstart's overall ETA and its story without the overhead stage."""

from __future__ import annotations

from ess import quickstart


def test_the_eta_scales_the_remaining_stages_by_this_machines_speed():
    clock = quickstart._Clock()
    reference = quickstart.STAGE_SECONDS
    assert clock._eta(1).endswith(f"about {round(sum(reference) / 60)} min left")
    clock.finished = [2 * reference[0], 2 * reference[1]]  # this machine runs at half the speed
    assert clock._eta(3).endswith(f"about {round(2 * sum(reference[2:]) / 60)} min left")
    clock.finished = [1.0]  # a stage that reused its finished work: no scaling
    assert clock._eta(2).endswith(f"about {round(sum(reference[1:]) / 60)} min left")


def test_without_the_overhead_stage_the_eta_and_the_story_leave_it_out():
    clock = quickstart._Clock(quickstart.STAGE_SECONDS[:3])
    assert clock._eta(1).endswith(f"about {round(sum(quickstart.STAGE_SECONDS[:3]) / 60)} min left")
    split = {"harmful": "h", "benign": "b", "harmful_flagged": 0.9, "benign_flagged": 0.1, "auroc": 0.95, "n": [3, 4]}
    story = quickstart._story(quickstart.QuickstartConfig(bench=False), {"models": {}}, None, split)
    assert "AUROC 0.950" in story and "Overhead" not in story
