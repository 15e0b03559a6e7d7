"""The quickstart's overall ETA."""

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
