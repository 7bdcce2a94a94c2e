"""ctm_jax.data.minigrid.FourRooms against the `minigrid` package's MiniGrid-FourRooms-v0.

The parity rollouts copy each JAX layout into a minigrid environment built as
the reference builds it (`ImgObsWrapper(gym.make('MiniGrid-FourRooms-v0',
max_steps=N))`), step both with the same actions and compare every output.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# gymnasium's MiniGrid (the test extra) and ours on xland-minigrid (the rl extra).
gym = pytest.importorskip('gymnasium')
pytest.importorskip('minigrid')  # registers the MiniGrid-* environments
pytest.importorskip('xminigrid')
from minigrid.core.constants import DIR_TO_VEC, OBJECT_TO_IDX  # pylint: disable=g-import-not-at-top,g-bad-import-order
from minigrid.core.grid import Grid  # pylint: disable=g-import-not-at-top,g-bad-import-order
from minigrid.core.world_object import Goal, Wall  # pylint: disable=g-import-not-at-top,g-bad-import-order
from minigrid.wrappers import ImgObsWrapper  # pylint: disable=g-import-not-at-top,g-bad-import-order

from ctm_jax.data import minigrid as fourrooms  # pylint: disable=g-import-not-at-top,g-bad-import-order

SIZE = 19
WALL, EMPTY, GOAL = 2, 1, 6  # xminigrid tile ids


@functools.cache
def _reset_states():
  """512 reset (state, obs) pairs, compiled and drawn once: resets do not depend on max_steps."""
  return jax.jit(jax.vmap(fourrooms.FourRooms(1).reset))(jax.random.split(jax.random.key(0), 512))


def _some_resets(start: int, stop: int):
  return jax.tree.map(lambda x: x[start:stop], _reset_states())


def _minigrid_env(max_steps: int, state, index: int | None = None):
  """ImgObsWrapper(gym.make(...)) whose state is the JAX `state` (of env `index` if batched)."""
  state = jax.device_get(state)
  if index is not None:
    state = jax.tree.map(lambda x: x[index], state)
  env = ImgObsWrapper(gym.make('MiniGrid-FourRooms-v0', max_steps=max_steps))
  env.reset(seed=0)  # Arms gymnasium's order checks; the layout is overwritten below.
  base = env.unwrapped
  base.grid = _minigrid_grid(np.asarray(state.grid[..., 0]))
  y, x = np.asarray(state.agent.position)
  base.agent_pos = (int(x), int(y))
  # xminigrid turns clockwise from up; minigrid from right.
  base.agent_dir = (int(state.agent.direction) - 1) % 4
  base.step_count = int(state.step_count)
  return env


def _minigrid_grid(tiles_HxW: np.ndarray) -> Grid:
  grid = Grid(tiles_HxW.shape[1], tiles_HxW.shape[0])
  for y, x in zip(*np.nonzero(tiles_HxW == WALL)):
    grid.set(int(x), int(y), Wall())
  for y, x in zip(*np.nonzero(tiles_HxW == GOAL)):
    grid.set(int(x), int(y), Goal())
  return grid


def _steered_action(base, rng, steer: float) -> int:
  """With probability `steer`, a step along a shortest path to the goal; else any action."""
  if rng.random() >= steer:
    return int(rng.integers(0, fourrooms.NUM_ACTIONS))
  encoded = base.grid.encode()[..., 0]  # [x, y]
  goal = tuple(np.argwhere(encoded == OBJECT_TO_IDX['goal'])[0])
  distance = np.full(encoded.shape, np.inf)
  distance[goal] = 0
  queue = collections.deque([goal])
  while queue:
    cell = queue.popleft()
    for step in DIR_TO_VEC:
      nxt = (cell[0] + step[0], cell[1] + step[1])
      if encoded[nxt] != OBJECT_TO_IDX['wall'] and distance[nxt] == np.inf:
        distance[nxt] = distance[cell] + 1
        queue.append(nxt)
  pos = np.asarray(base.agent_pos)
  if distance[tuple(pos)] == 0:  # On the goal: wander off again.
    return int(rng.integers(0, fourrooms.NUM_ACTIONS))
  ahead = lambda d: distance[tuple(pos + DIR_TO_VEC[d % 4])]
  if ahead(base.agent_dir) < distance[tuple(pos)]:
    return fourrooms.FORWARD
  return fourrooms.RIGHT if ahead(base.agent_dir + 1) < distance[tuple(pos)] else fourrooms.LEFT


@pytest.mark.parametrize(
    'max_steps, num_steps, first_env, steer',
    [
        # Goals, then truncation.
        (100, 106, 0, (0.0, 0.0, 0.3, 0.6, 0.6, 0.8, 0.8, 0.9, 0.9, 0.9)),
        (12, 15, 10, (0.0, 0.0, 0.5, 0.5)),  # Early truncation.
    ],
)
def test_rollouts_match_minigrid_step_for_step(max_steps, num_steps, first_env, steer):
  env = fourrooms.FourRooms(max_steps)
  num_envs = len(steer)
  states, obs0_Bx7x7x3 = _some_resets(first_env, first_env + num_envs)
  obs0_Bx7x7x3 = np.asarray(obs0_Bx7x7x3)

  # minigrid first, choosing the actions (steering reads minigrid's state).
  rng = np.random.default_rng(max_steps)
  actions_BxT = np.zeros((num_envs, num_steps), np.int32)
  expected = collections.defaultdict(list)
  wall_bumps = 0
  for b in range(num_envs):
    env_mg = _minigrid_env(max_steps, states, b)
    np.testing.assert_array_equal(
        obs0_Bx7x7x3[b], env_mg.unwrapped.gen_obs()['image'], err_msg=f'reset obs, env {b}')
    for t in range(num_steps):
      actions_BxT[b, t] = _steered_action(env_mg.unwrapped, rng, steer[b])
      before = tuple(env_mg.unwrapped.agent_pos)
      obs, reward, terminated, truncated, _ = env_mg.step(actions_BxT[b, t])
      wall_bumps += (actions_BxT[b, t] == fourrooms.FORWARD
                     and tuple(env_mg.unwrapped.agent_pos) == before)
      for name, value in zip(('obs', 'reward', 'terminated', 'truncated'),
                             (obs, reward, terminated, truncated)):
        expected[name].append(value)
  expected = {k: np.stack(v).reshape(num_envs, num_steps, *np.shape(v[0]))
              for k, v in expected.items()}

  def rollout(state, actions_T):
    def body(state, action):
      state, obs, reward, terminated = env.step(jax.random.key(0), state, action)
      return state, (obs, reward, terminated, env.truncated(state))
    return jax.lax.scan(body, state, actions_T)[1]

  obs, reward, terminated, truncated = jax.device_get(
      jax.jit(jax.vmap(rollout))(states, actions_BxT))

  assert obs.dtype == jnp.int32 and reward.dtype == jnp.float32
  assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
  for b in range(num_envs):
    for t in range(num_steps):
      np.testing.assert_array_equal(
          obs[b, t], expected['obs'][b, t], err_msg=f'obs, env {b}, step {t + 1}')
  np.testing.assert_array_equal(terminated, expected['terminated'])
  np.testing.assert_array_equal(truncated, expected['truncated'])
  np.testing.assert_allclose(reward, expected['reward'], rtol=0, atol=1e-6)

  # The rollouts exercise what they claim to: every action, walking into walls,
  # truncation (and steps past it), and, for the long episodes, reaching the goal.
  assert set(np.unique(actions_BxT)) == set(range(fourrooms.NUM_ACTIONS))
  assert wall_bumps > 0
  assert expected['truncated'][:, -1].all() and not expected['truncated'][:, 0].any()
  if max_steps == 100:
    assert expected['terminated'].sum() >= 3
    assert (expected['reward'] > 0).sum() == expected['terminated'].sum()


def test_visibility_matches_process_vis_on_random_views():
  rng = np.random.default_rng(0)
  walls_Nx7x7 = rng.random((300, 7, 7)) < rng.uniform(0.05, 0.7, (300, 1, 1))
  visible = np.asarray(jax.jit(jax.vmap(fourrooms.visibility_mask))(~walls_Nx7x7))
  for walls_7x7, visible_7x7 in zip(walls_Nx7x7, visible):
    grid = Grid(7, 7)
    for i, j in zip(*np.nonzero(walls_7x7)):
      grid.set(int(i), int(j), Wall())
    np.testing.assert_array_equal(visible_7x7, grid.process_vis((3, 6)))


def test_cells_outside_the_grid_are_walls_as_in_minigrid():
  # FourRooms' border hides everything outside the grid, so open the border to
  # see minigrid's out-of-grid walls.
  env = fourrooms.FourRooms(100)
  states, _ = _some_resets(20, 24)
  grid = np.array(states.grid)
  grid[:, (0, -1), :] = grid[:, :, (0, -1)] = (EMPTY, 7)  # xminigrid's black floor
  edge_cells = [(y, x) for y in (0, 1, 2, 16, 17, 18) for x in (0, 1, 5, 17, 18)]
  cases = [(b, yx, d) for b in range(4) for yx in edge_cells for d in range(4)
           if grid[b, yx[0], yx[1], 0] == EMPTY]
  case_states = fourrooms.FourRoomsState(
      grid=grid[np.array([b for b, _, _ in cases])],
      agent=states.agent.replace(
          position=jnp.array([yx for _, yx, _ in cases], jnp.int32),
          direction=jnp.array([d for _, _, d in cases], jnp.int32),
          pocket=jnp.zeros((len(cases), 2), jnp.uint8)),
      step_count=jnp.zeros(len(cases), jnp.int32))
  obs = np.asarray(jax.jit(jax.vmap(env.observation))(case_states))
  facing_out = 0
  for n, (_, (y, x), d) in enumerate(cases):
    expected = _minigrid_env(100, case_states, n).unwrapped.gen_obs()['image']
    np.testing.assert_array_equal(obs[n], expected, err_msg=f'case {cases[n]}')
    ahead_y, ahead_x = np.array((y, x)) + ((-1, 0), (0, 1), (1, 0), (0, -1))[d]
    if not (0 <= ahead_y < SIZE and 0 <= ahead_x < SIZE):
      facing_out += 1
      np.testing.assert_array_equal(expected[3, 5], (OBJECT_TO_IDX['wall'], 5, 0))
  assert facing_out >= 10


# The four door segments: (row, column) index of each wall segment a door opens in.
_SEGMENTS = {'west': (9, slice(1, 9)), 'east': (9, slice(10, 18)),
             'north': (slice(1, 9), 9), 'south': (slice(10, 18), 9)}


def _layout_summary(walls_NxHxW, agents_Nx2, goals_Nx2, skeleton_HxW):
  """Checks one family's invariants; returns (door offsets (N, 4), same-room flags (N,))."""
  n = len(walls_NxHxW)
  # Walls plus door gaps are the fixed skeleton; one gap per segment.
  np.testing.assert_array_equal(
      walls_NxHxW | skeleton_HxW, np.broadcast_to(skeleton_HxW, walls_NxHxW.shape))
  gaps_NxSxK = np.stack([~walls_NxHxW[:, r, c] for r, c in _SEGMENTS.values()], 1)
  assert (gaps_NxSxK.sum(-1) == 1).all()
  doors_NxS = np.argmax(gaps_NxSxK, -1)
  assert all(set(doors_NxS[:, d]) == set(range(8)) for d in range(4))
  # Agent and goal on distinct free cells (door gaps included), in every room.
  assert not walls_NxHxW[np.arange(n), agents_Nx2[:, 0], agents_Nx2[:, 1]].any()
  assert not walls_NxHxW[np.arange(n), goals_Nx2[:, 0], goals_Nx2[:, 1]].any()
  assert (agents_Nx2 != goals_Nx2).any(-1).all()
  room = lambda yx: np.where((yx == 9).any(-1), -1, (yx[:, 0] > 9) * 2 + (yx[:, 1] > 9))
  assert set(room(agents_Nx2)) == {-1, 0, 1, 2, 3}  # -1: a door gap
  return doors_NxS, (room(agents_Nx2) == room(goals_Nx2)) & (room(agents_Nx2) >= 0)


def test_layouts_are_minigrids_family():
  states, _ = _reset_states()
  tiles_NxHxW = np.asarray(states.grid[..., 0])
  num = len(tiles_NxHxW)

  # The same number of minigrid layouts, in xminigrid's [row, column] layout.
  base = gym.make('MiniGrid-FourRooms-v0').unwrapped
  mg_walls, mg_agents, mg_goals, mg_dirs = [], [], [], []
  for seed in range(num):
    base.reset(seed=seed)
    objects_HxW = base.grid.encode()[..., 0].T
    mg_walls.append(objects_HxW == OBJECT_TO_IDX['wall'])
    mg_goals.append(np.argwhere(objects_HxW == OBJECT_TO_IDX['goal'])[0])
    mg_agents.append(tuple(base.agent_pos)[::-1])
    mg_dirs.append(base.agent_dir)
  skeleton_HxW = mg_walls[0].copy()
  for rows, cols in _SEGMENTS.values():
    skeleton_HxW[rows, cols] = True

  goals = np.argwhere(tiles_NxHxW == GOAL)
  assert len(goals) == num and (goals[:, 0] == np.arange(num)).all()
  doors, same_room = _layout_summary(
      tiles_NxHxW == WALL, np.asarray(states.agent.position), goals[:, 1:], skeleton_HxW)
  mg_doors, mg_same_room = _layout_summary(
      np.stack(mg_walls), np.array(mg_agents), np.stack(mg_goals), skeleton_HxW)
  # Both match the family's distribution (uniform doors, agent and goal on a
  # uniform pair of distinct free cells, uniform direction) within ~4 standard
  # errors of 512 draws.
  free_cells = 4 * 8 * 8 + 4
  p_same_room = 4 * 64 * 63 / (free_cells * (free_cells - 1))
  directions = (np.asarray(states.agent.direction) - 1) % 4  # minigrid's convention
  for doors_NxS, same_room_N, dirs_N in ((doors, same_room, directions),
                                         (mg_doors, mg_same_room, np.array(mg_dirs))):
    np.testing.assert_allclose(
        np.stack([np.bincount(d, minlength=8) for d in doors_NxS.T]) / num, 1 / 8, atol=0.06)
    assert abs(same_room_N.mean() - p_same_room) < 0.07
    np.testing.assert_allclose(np.bincount(dirs_N, minlength=4) / num, 1 / 4, atol=0.08)


@pytest.mark.slow  # compiles reset and step over 8 sharded environments
def test_jit_vmap_sharded_batch_and_render():
  env = fourrooms.FourRooms(1)  # The first step truncates.
  assert env.num_actions == 7 and env.observation_shape == (7, 7, 3)
  assert env.observation_dtype == jnp.int32
  # The trainer shards environments over devices (Auto axes, as ctm_jax.sharding).
  mesh = jax.make_mesh(
      (jax.device_count(),), ('envs',), axis_types=(jax.sharding.AxisType.Auto,))
  keys = jax.device_put(
      jax.random.split(jax.random.key(7), 8), jax.NamedSharding(mesh, jax.P('envs')))
  states, obs = jax.jit(jax.vmap(env.reset))(keys)
  assert obs.shape == (8, 7, 7, 3) and obs.dtype == jnp.int32
  truncated = jax.jit(jax.vmap(env.truncated))
  assert not truncated(states).any()
  actions = jnp.arange(8) % 7
  states, obs, reward, terminated = jax.jit(jax.vmap(env.step))(keys, states, actions)
  assert obs.shape == (8, 7, 7, 3) and obs.dtype == jnp.int32
  assert reward.shape == (8,) and reward.dtype == jnp.float32
  assert terminated.shape == (8,) and terminated.dtype == jnp.bool_
  assert truncated(states).shape == (8,) and truncated(states).all()
  np.testing.assert_array_equal(states.step_count, 1)

  frame = env.render(jax.tree.map(lambda x: x[0], states))
  assert frame.shape == (SIZE * 32, SIZE * 32, 3) and frame.dtype == np.uint8
  y, x = np.asarray(states.agent.position[0]) * 32
  agent_tile = frame[y:y + 32, x:x + 32].reshape(-1, 3).astype(int)
  # The agent's red triangle and the green goal (both possibly lightened by the
  # view highlight).
  assert ((agent_tile[:, 0] > 200) & (agent_tile[:, 1:] < 100).all(-1)).any()
  goal_y, goal_x = np.argwhere(np.asarray(states.grid[0, ..., 0]) == GOAL)[0] * 32
  goal_tile = frame[goal_y:goal_y + 32, goal_x:goal_x + 32].reshape(-1, 3).astype(int)
  assert ((goal_tile[:, 1] > 200) & (goal_tile[:, (0, 2)] < 100).all(-1)).any()
