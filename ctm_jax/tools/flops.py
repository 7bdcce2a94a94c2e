"""FLOPs of a program with a tick loop, from XLA's cost analysis.

XLA counts a while loop's body once whatever its trip count, so the raw
`cost_analysis()['flops']` of a T-tick step holds one tick. The count is
scaled from 1- and 2-tick variants of the same step, each fully unrolled so
that XLA sees every tick:
  F(T) = F(1) + (T - 1) * (F(2) - F(1)).
"""

from typing import Any, Callable


def cost_flops(stage) -> float | None:
  """XLA's FLOP count of a `Lowered` or `Compiled` stage; None where unsupported."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def lowered_flops(lowered) -> float | None:
  """FLOPs of a lowered program; the analysis before compilation exists on CPU only."""
  flops = cost_flops(lowered)
  return flops if flops is not None else cost_flops(lowered.compile())


def tick_scaled_flops(lower: Callable[[int, int], Any], ticks: int) -> float | None:
  """FLOPs of `ticks` ticks; `lower(ticks, unroll)` lowers the step with that many ticks."""
  one = lowered_flops(lower(1, 1))
  two = lowered_flops(lower(2, 2))
  if one is None or two is None:
    return None
  return one + (ticks - 1) * (two - one)
