"""The step plan of a training phase: which batch each step trains on (the seeded data order,
length grouping, replay steps) and the learning-rate factor of each step."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

GROUP_STEPS = 50
"""Steps whose sequences `group_by_length` sorts together (as transformers' length-grouped sampler)."""


def data_order(n_items: int, n_needed: int, seed: int) -> list[int]:
    """Item indices for every step of a phase: one seeded permutation per epoch, concatenated."""
    order: list[int] = []
    epoch = 0
    while len(order) < n_needed:
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order += torch.randperm(n_items, generator=generator).tolist()
        epoch += 1
    return order


def grouped_by_length(order: list[int], lengths: list[int], per_step: int, seed: int) -> list[int]:
    """`order` with the items of every `GROUP_STEPS` steps sorted by length into batches of
    `per_step`, the batches of each group in a seeded random order: the same items per group, so
    the data seen by each point of the run hardly changes, with little padding per batch."""
    grouped: list[int] = []
    size = GROUP_STEPS * per_step
    for number, start in enumerate(range(0, len(order), size)):
        group = sorted(order[start : start + size], key=lambda i: lengths[i])
        batches = [group[i : i + per_step] for i in range(0, len(group), per_step)]
        generator = torch.Generator().manual_seed(seed * 1000 + 500 + number)
        grouped += [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
    return grouped


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over `warmup_ratio` of the steps, then linear decay to 0."""
    warmup = max(1, int(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class Schedule:
    """Which batch each step of a phase trains on: the phase's items, with (alignment phase) one
    replay step after every `every` of them. A function of the step alone, so a resumed run
    sees exactly the batches the stopped one would have."""

    def __init__(
        self,
        lengths: list[int],
        replay_lengths: list[int],
        per_step: int,
        config: TrainConfig,
        epochs: float,
        seed: int,
        grouped: bool = False,
    ):
        n_items, n_replay = len(lengths), len(replay_lengths)
        self.every = config.replay_every if n_replay else 0
        if config.max_steps:
            self.total = config.max_steps
            replay_steps = self.total // (self.every + 1) if self.every else 0
            self.main_steps = self.total - replay_steps
        else:
            self.main_steps = max(1, math.ceil(epochs * n_items / per_step))
            replay_steps = self.main_steps // self.every if self.every else 0
            self.total = self.main_steps + replay_steps
        self.per_step = per_step
        self.order = data_order(n_items, self.main_steps * per_step, seed)
        self.replay_order = data_order(n_replay, replay_steps * per_step, seed + 7919) if replay_steps else []
        if grouped:  # only what is trained: a group never crosses the end of the phase
            self.order = grouped_by_length(self.order[: self.main_steps * per_step], lengths, per_step, seed)
            self.replay_order = grouped_by_length(
                self.replay_order[: replay_steps * per_step], replay_lengths, per_step, seed + 7919
            )

    def rows(self, step: int, rank: int, batch_size: int) -> tuple[bool, list[int]]:
        """(is a replay step, item indices of this process's batch)."""
        cycle = self.every + 1
        replay = bool(self.every) and step % cycle == self.every
        index = step // cycle if replay else step - (step // cycle if self.every else 0)
        order = self.replay_order if replay else self.order
        start = index * self.per_step + rank * batch_size
        return replay, order[start : start + batch_size]
