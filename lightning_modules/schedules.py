"""Learning-rate schedules as plain functions of the iteration (multipliers of each group's lr)."""
from __future__ import annotations


def poly_factor(iteration: int, total_iterations: int, power: float = 0.9) -> float:
    """MiB's and WILSON's step-0 schedule, per iteration: (1 - it / max_it) ** power."""
    return max(0.0, 1.0 - iteration / max(1, total_iterations)) ** power


def warmup_poly_factor(iteration: int, total_iterations: int, warmup_iterations: int, power: float = 0.9) -> float:
    """WILSON's `warmup` schedule at steps >= 1: the lr is constant for the first
    `warmup_iterations`, then follows the poly curve with the iteration counted from the start of
    training, so the lr drops at once from 1 to (1 - warmup/max_it) ** power when the warm-up
    ends (x0.887 for 5 of 40 epochs). That jump is in the official code; it is kept."""
    if iteration < warmup_iterations:
        return 1.0
    return poly_factor(iteration, total_iterations, power)
