"""MiniGrid-FourRooms-v0 as a pure-JAX environment, built on xland-minigrid.

The reference trains its navigation agent on
`ImgObsWrapper(gym.make('MiniGrid-FourRooms-v0', max_steps=max_environment_steps))`.
`FourRooms` reproduces that environment's observations, actions, rewards,
termination and truncation step for step, as jittable and vmappable functions
of a small pytree state, so a PPO trainer can roll out thousands of
environments on an accelerator.

xland-minigrid (`xminigrid`) supplies the layout generator (its FourRooms
problem, with JAX randomness), the grid/agent state and the moves; it also
renders frames. Everything the agent perceives is computed here, because
xminigrid's own observation differs from minigrid's: it is a (7, 7, 2)
row-major crop in xminigrid's tile/colour ids, with a transparent field of
view. `FourRooms` instead builds minigrid's `gen_obs()['image']`:

* the 7x7 egocentric view, rotated so the agent faces up and sits at view
  position (3, 6), indexed [column, row] like minigrid's `Grid.encode`;
* each cell encoded as (object, colour, state) with minigrid's OBJECT_TO_IDX /
  COLOR_TO_IDX / STATE_TO_IDX ids: empty (1, 0, 0), wall (2, 5, 0), goal
  (8, 1, 0), and cells outside the grid are walls, as minigrid's `Grid.slice`
  makes them;
* minigrid's occlusion (`see_through_walls=False`, `Grid.process_vis`),
  reimplemented in `visibility_mask` as a vectorised sweep; cells the agent
  cannot see are (0, 0, 0) ('unseen');
* the agent's own cell is always (1, 0, 0): minigrid blanks it (the agent
  carries nothing in FourRooms), even when the agent stands on the goal.

Dynamics, as minigrid's `MiniGridEnv.step`:

* actions 0 left, 1 right, 2 forward, 3 pickup, 4 drop, 5 toggle, 6 done.
  Left/right/forward are xminigrid's turns and move (its ids 2, 1, 0);
  pickup/drop/toggle go to xminigrid's (3, 4, 5), which, like minigrid's, do
  nothing in FourRooms (no pickable objects, empty hands, no doors); `done`
  changes nothing. Every action counts a step.
* terminated only when the action is `forward` and the cell in front of the
  agent is the goal (the agent then moves onto it). This is minigrid's rule,
  not xminigrid's: xminigrid also terminates on `forward` into a wall while
  standing on the goal.
* reward `1 - 0.9 * step_count / max_steps` (step_count after the increment)
  when terminated, else 0.
* truncated when `step_count >= max_steps` (xminigrid's `==` differs once an
  episode runs past its limit).
* no auto-reset: as in minigrid, stepping after the end goes on (the agent may
  step off the goal and back on, earning another reward).

Differences from minigrid (all else is identical, see
tests/minigrid_env_test.py):

* Layout randomness. A layout is a function of a JAX PRNG key through
  xminigrid's generator, so it cannot reproduce minigrid's NumPy stream seed
  for seed. The family and its distribution are the same: a 19x19 grid with
  border walls and full walls along column 9 and row 9; four door gaps, one
  in each wall segment, each uniform over the segment's 8 interior cells
  (row 9, columns 1-8 and 10-17; column 9, rows 1-8 and 10-17); agent and
  goal on a uniformly random ordered pair of distinct empty cells (door gaps
  included; minigrid rejection-samples the agent and then the goal, xminigrid
  takes a Gumbel top-2 without replacement: the same distribution); the
  agent's direction uniform over the four.
* Observation dtype int32 (minigrid: uint8), same values.
* Reward float32 (minigrid: Python float); they agree to float32 rounding.
* Truncation is a predicate of the state, `truncated(state)`, equal to the
  `truncated` flag minigrid returns from the step that produced the state.
* Actions outside 0..6 are no-ops that count a step (minigrid raises).
* `step` takes a key for interface uniformity; the dynamics are
  deterministic and ignore it.
* `render` draws with xminigrid's renderer (minigrid-like tiles; it
  highlights the whole 7x7 view box, minigrid only the visible cells).

Dimension glossary:
  G view side (7)   H, W grid height and width (19)   B environments (vmap)
Grids are xminigrid's layout, indexed [row y, column x]; views are
minigrid's, indexed [column, row].
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from xminigrid.core import actions as xm_actions
from xminigrid.core.constants import DIRECTIONS, NUM_COLORS, NUM_TILES, Colors, Tiles
from xminigrid.envs.minigrid import fourrooms as xm_fourrooms
from xminigrid.rendering import rgb_render
from xminigrid.types import AgentState

VIEW = 7

# minigrid's action ids (MiniGridEnv.Actions).
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)
NUM_ACTIONS = 7
# xminigrid's action for each of minigrid's; `done` has none (it is masked to
# a no-op in `step`, the placeholder is never applied).
_XM_ACTION = np.array([2, 1, 0, 3, 4, 5, 5], np.int32)

# minigrid's ids (minigrid.core.constants), spelled out so the module does not
# import minigrid.
_UNSEEN, _EMPTY, _WALL, _GOAL = 0, 1, 2, 8
_MINIGRID_COLOUR = {
    Colors.RED: 0, Colors.GREEN: 1, Colors.BLUE: 2,
    Colors.PURPLE: 3, Colors.YELLOW: 4, Colors.GREY: 5,
}
_WALL_CELL = (_WALL, _MINIGRID_COLOUR[Colors.GREY], 0)
_EMPTY_CELL = (_EMPTY, 0, 0)


def _encoding_table() -> np.ndarray:
  """minigrid's (object, colour, state) for each xminigrid (tile, colour): int32.

  Only FourRooms' tiles are mapped (black floor = minigrid's empty cell, walls,
  goals); any other tile would read as unseen, and never occurs.
  """
  table = np.zeros((NUM_TILES, NUM_COLORS, 3), np.int32)
  table[Tiles.FLOOR, Colors.BLACK] = _EMPTY_CELL
  for xm_colour, colour in _MINIGRID_COLOUR.items():
    table[Tiles.WALL, xm_colour] = (_WALL, colour, 0)
    table[Tiles.GOAL, xm_colour] = (_GOAL, colour, 0)
  return table


_ENCODING = _encoding_table()


def _spread_right(seeds_G: jax.Array, transparent_G: jax.Array) -> jax.Array:
  """Closure of `v[k] |= v[k - 1] & transparent[k - 1]`, swept left to right.

  A seed at m lights every k >= m until (and including) the first opaque cell
  at or after m: no opaque cell among [m, k - 1].
  """
  opaque_before_G = jnp.cumsum(~transparent_G) - ~transparent_G  # opaque cells in [0, k - 1]
  m, k = jnp.arange(seeds_G.shape[0])[:, None], jnp.arange(seeds_G.shape[0])[None, :]
  reach_GxG = (m <= k) & (opaque_before_G[:, None] == opaque_before_G[None, :])
  return jnp.any(seeds_G[:, None] & reach_GxG, axis=0)


def _spread_left(seeds_G: jax.Array, transparent_G: jax.Array) -> jax.Array:
  """Closure of `v[k] |= v[k + 1] & transparent[k + 1]`, swept right to left.

  A seed at m lights every k <= m with no opaque cell among [k + 1, m].
  """
  opaque_upto_G = jnp.cumsum(~transparent_G)  # opaque cells in [0, k]
  m, k = jnp.arange(seeds_G.shape[0])[:, None], jnp.arange(seeds_G.shape[0])[None, :]
  reach_GxG = (m >= k) & (opaque_upto_G[:, None] == opaque_upto_G[None, :])
  return jnp.any(seeds_G[:, None] & reach_GxG, axis=0)


def visibility_mask(transparent_GxG: jax.Array) -> jax.Array:
  """minigrid's occlusion (`Grid.process_vis`) of an up-facing view: bool [column, row].

  The agent sits at (G // 2, G - 1). Rows are swept from the agent's row away
  from it. Within a row, light spreads right then left through transparent
  cells; each lit transparent cell lights the cells ahead of it (same column
  and its sweep-direction neighbour) in the next row. minigrid's sweeps skip
  the edge column they would end on (the rightward sweep never reads the last
  column, the leftward one never reads column 0), so column 0 lights the next
  row only if the rightward sweep reached it, and the last column only through
  the leftward sweep; this asymmetry is reproduced.
  """
  size = transparent_GxG.shape[0]
  no_light = jnp.zeros((1,), bool)
  seeds_G = jnp.zeros((size,), bool).at[size // 2].set(True)
  rows = [None] * size
  for row in reversed(range(size)):
    transparent_G = transparent_GxG[:, row]
    after_right_G = _spread_right(seeds_G, transparent_G)
    lit_G = _spread_left(after_right_G, transparent_G)
    rows[row] = lit_G
    # Light passes on to the next row from the cells a sweep visited while lit and see-through.
    right_src_G = (after_right_G & transparent_G).at[-1].set(False)
    left_src_G = (lit_G & transparent_G).at[0].set(False)
    seeds_G = (right_src_G | left_src_G
               | jnp.concatenate([no_light, right_src_G[:-1]])
               | jnp.concatenate([left_src_G[1:], no_light]))
  return jnp.stack(rows, axis=1)


def minigrid_observation(grid_HxWx2: jax.Array, agent: AgentState) -> jax.Array:
  """minigrid's `gen_obs()['image']` of an xminigrid grid and agent: int32 (G, G, 3)."""
  height, width = grid_HxWx2.shape[:2]
  ahead_yx = DIRECTIONS[agent.direction]
  right_yx = DIRECTIONS[(agent.direction + 1) % 4]
  # View column i is i - G // 2 cells to the agent's right, row j is G - 1 - j ahead.
  lateral_G = jnp.arange(VIEW) - VIEW // 2
  distance_G = VIEW - 1 - jnp.arange(VIEW)
  cells_GxGx2 = (agent.position + lateral_G[:, None, None] * right_yx
                 + distance_G[None, :, None] * ahead_yx)
  y_GxG, x_GxG = cells_GxGx2[..., 0], cells_GxGx2[..., 1]
  inside_GxG = (y_GxG >= 0) & (y_GxG < height) & (x_GxG >= 0) & (x_GxG < width)
  tiles_GxGx2 = grid_HxWx2[jnp.clip(y_GxG, 0, height - 1), jnp.clip(x_GxG, 0, width - 1)]
  encoded_GxGx3 = jnp.asarray(_ENCODING)[tiles_GxGx2[..., 0], tiles_GxGx2[..., 1]]
  # minigrid's slice pads outside the grid with walls.
  encoded_GxGx3 = jnp.where(inside_GxG[..., None], encoded_GxGx3, jnp.array(_WALL_CELL))
  visible_GxG = visibility_mask(encoded_GxGx3[..., 0] != _WALL)
  obs_GxGx3 = jnp.where(visible_GxG[..., None], encoded_GxGx3, _UNSEEN)
  # minigrid blanks the agent's cell (it would show a carried object; FourRooms has none).
  return obs_GxGx3.at[VIEW // 2, VIEW - 1].set(jnp.array(_EMPTY_CELL))


class FourRoomsState(struct.PyTreeNode):
  """One environment: xminigrid's grid and agent, and minigrid's step count."""

  grid: jax.Array  # uint8 (H, W, 2): xminigrid (tile, colour), [row y, column x]
  agent: AgentState  # position (y, x), direction (xminigrid: 0 up, 1 right, 2 down, 3 left)
  step_count: jax.Array  # int32 (): steps since reset


class FourRooms:
  """MiniGrid-FourRooms-v0 behind ImgObsWrapper, as pure JAX functions of one environment.

  reset/step/truncated are jittable and vmappable; `render` is host-side.
  """

  num_actions: int = NUM_ACTIONS
  observation_shape = (VIEW, VIEW, 3)
  observation_dtype = jnp.int32
  backbone_type = 'navigation-backbone'
  action_names = ('left', 'right', 'forward', 'pickup', 'drop', 'toggle', 'done')
  # Episodes end at a goal: success rates are reported.
  goal = True

  def __init__(self, max_environment_steps: int):
    if max_environment_steps <= 0:
      raise ValueError(f'max_environment_steps must be positive, got {max_environment_steps}')
    self.max_environment_steps = int(max_environment_steps)
    self._xm_env = xm_fourrooms.FourRooms()
    self._xm_params = self._xm_env.default_params(max_steps=self.max_environment_steps)

  def reset(self, key: jax.Array) -> tuple[FourRoomsState, jax.Array]:
    """A fresh layout from `key`: (state, int32 (G, G, 3) observation)."""
    # xminigrid's reset also builds its own observation; jit drops it unused.
    xm_state = self._xm_env.reset(self._xm_params, key).state
    state = FourRoomsState(
        grid=xm_state.grid, agent=xm_state.agent, step_count=jnp.zeros((), jnp.int32))
    return state, self.observation(state)

  def step(
      self, key: jax.Array, state: FourRoomsState, action: jax.Array
  ) -> tuple[FourRoomsState, jax.Array, jax.Array, jax.Array]:
    """One minigrid step, no auto-reset: (state, obs, float32 reward, bool terminated)."""
    del key  # The dynamics are deterministic.
    action = jnp.asarray(action, jnp.int32)
    grid, agent = state.grid, state.agent
    front_yx = agent.position + DIRECTIONS[agent.direction]
    front_tile = grid[front_yx[0], front_yx[1], 0]

    moved_grid, moved_agent, _ = xm_actions.take_action(
        grid, agent, jnp.asarray(_XM_ACTION)[jnp.clip(action, 0, NUM_ACTIONS - 1)])
    acts = (action >= 0) & (action < NUM_ACTIONS) & (action != DONE)
    grid, agent = jax.tree.map(
        lambda new, old: jnp.where(acts, new, old), (moved_grid, moved_agent), (grid, agent))

    step_count = state.step_count + 1
    # minigrid ends the episode on walking into the goal, not on standing on it.
    terminated = (action == FORWARD) & (front_tile == Tiles.GOAL)
    progress = step_count.astype(jnp.float32) / self.max_environment_steps
    reward = jnp.where(terminated, 1.0 - 0.9 * progress, 0.0).astype(jnp.float32)
    state = FourRoomsState(grid=grid, agent=agent, step_count=step_count)
    return state, self.observation(state), reward, terminated

  def truncated(self, state: FourRoomsState) -> jax.Array:
    """minigrid's time limit: bool, True once step_count >= max_environment_steps."""
    return state.step_count >= self.max_environment_steps

  def observation(self, state: FourRoomsState) -> jax.Array:
    """minigrid's `gen_obs()['image']` of a state: int32 (G, G, 3)."""
    return minigrid_observation(state.grid, state.agent)

  def render(self, state: FourRoomsState) -> np.ndarray:
    """RGB uint8 (32 H, 32 W, 3) frame of one environment's whole grid and agent."""
    state = jax.device_get(state)
    agent = AgentState(
        position=np.asarray(state.agent.position), direction=int(state.agent.direction),
        pocket=np.asarray(state.agent.pocket))
    return np.asarray(rgb_render.render(np.asarray(state.grid), agent, VIEW), np.uint8)
