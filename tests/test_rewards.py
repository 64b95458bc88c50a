import numpy as np
import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from srpo_rl.models.vjepa2 import VideoEmbedder, write_tiny_vjepa2_checkpoint
from srpo_rl.objectives import EmbodiedSampler
from srpo_rl.rewards import BackgroundEmbedder, SRPOProgressReward, srpo_progress_scores, trajectory_videos

T, K, H = 4, 2, 32  # decisions, frames per decision, frame side


# ------------------------------------------------------------------ plain numpy reference pieces
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_failure_scores(dist):
    """0.6 * sigmoid(10 * (0.5 - d_hat)), d_hat min-max over the failures (0.5 if the range < 1e-6)."""
    lo, hi = min(dist), max(dist)
    d_hat = [0.5 if hi - lo < 1e-6 else (d - lo) / (hi - lo) for d in dist]
    return np.array([0.6 * sigmoid(10 * (0.5 - d)) for d in d_hat])


def nearest(fail, centres):
    return np.array([min(np.sqrt(((f - c) ** 2).sum()) for c in centres) for f in fail])


def grpo_advantages(reward, group):
    """(r - mean_g) / (std_g + 1e-6), unbiased std, per group."""
    adv = np.zeros(len(reward))
    for g in set(group.tolist()):
        rows = np.flatnonzero(group == g)
        r = reward[rows].astype(np.float64)
        std = r.std(ddof=1) if len(r) > 1 else 1.0
        adv[rows] = (r - r.mean()) / (std + 1e-6)
    return adv


# ------------------------------------------------------------------ the score function
def test_clusters_of_near_duplicate_successes_are_the_references():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 16)) * 3
    tiny = rng.normal(size=(2, 16)) * 1e-3
    succ = np.stack([a, a + tiny[0], b, b + tiny[1], c])  # two tight pairs and one lone success
    # precondition: in standardised space only the pairs lie within eps = 0.5
    z = (succ - succ.mean(0)) / succ.std(0)
    pair = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    close = pair < 0.5
    assert close.sum() == 5 + 4 and close[0, 1] and close[2, 3]  # the diagonal and the two pairs only

    fail = rng.normal(size=(4, 16)) * 3
    emb = np.concatenate([succ, fail]).astype(np.float32)
    scores = srpo_progress_scores(emb, [True] * 5 + [False] * 4, task=["t"] * 9)

    centres = [(a + a + tiny[0]) / 2, (b + b + tiny[1]) / 2]  # the lone success c is DBSCAN noise
    expected = reference_failure_scores(nearest(fail, centres))
    np.testing.assert_allclose(scores[:5], 1.0)
    np.testing.assert_allclose(scores[5:], expected, rtol=1e-5)


def test_mean_fallback_and_per_task_references():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(9, 8)).astype(np.float32)
    success = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    task = [("libero_goal", 0)] * 6 + [("libero_goal", 1)] * 3
    scores = srpo_progress_scores(emb, success, task)
    # task 0: successes far apart -> no cluster -> the mean success is the reference
    exp0 = reference_failure_scores(nearest(emb[3:6].astype(np.float64), [emb[:3].astype(np.float64).mean(0)]))
    # task 1: one success -> it is the reference; its own failures only
    exp1 = reference_failure_scores(nearest(emb[7:].astype(np.float64), [emb[6].astype(np.float64)]))
    np.testing.assert_allclose(scores, [1, 1, 1, *exp0, 1, *exp1], rtol=1e-5)
    assert scores[3:6].max() == pytest.approx(0.6 * sigmoid(5)) and scores[3:6].min() == pytest.approx(0.6 * sigmoid(-5))


def test_paper_formula_rewards_the_closest_failure_most():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(6, 8))
    success = np.array([1, 0, 0, 1, 0, 0], dtype=bool)
    scores = srpo_progress_scores(emb, success, [0] * 6, formula="paper", alpha=0.8)
    d = nearest(emb[~success], [emb[success].mean(0)])
    expected = 0.8 * sigmoid(-(d - d.mean()) / d.std())
    np.testing.assert_allclose(scores[~success], expected, rtol=1e-6)
    assert np.argmax(scores[~success]) == np.argmin(d)
    # equal distances: 0 inside the sigmoid (the success is not all-zero: that would make it invalid)
    two = np.array([[5.0, 5.0], [6.0, 5.0], [4.0, 5.0]])
    np.testing.assert_allclose(srpo_progress_scores(two, [1, 0, 0], [0] * 3, formula="paper"), [1, 0.4, 0.4])


@pytest.mark.parametrize(
    "success, expected",
    [
        ([1, 1, 1], [1.0, 1.0, 1.0]),  # all succeed: nothing to shape
        ([0, 0, 0], [0.0, 0.0, 0.0]),  # none succeed: failures stay 0 (plain binary)
        ([1, 0, 1], [1.0, 0.3, 1.0]),  # one failure: zero range -> d_hat 0.5 -> 0.6 * sigmoid(0)
    ],
)
def test_edge_cases(success, expected):
    emb = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    np.testing.assert_allclose(srpo_progress_scores(emb, success, [7] * 3), expected, rtol=1e-6)


def test_invalid_rows_score_zero_and_are_no_reference():
    emb = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    success = [True, True, False, False]  # row 0: a success with no frames (all-zero embedding)
    scores = srpo_progress_scores(emb, success, [0] * 4)
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.6 * sigmoid(5), 0.6 * sigmoid(-5)], rtol=1e-6)
    explicit = srpo_progress_scores(emb, success, [0] * 4, valid=[True, True, True, False])
    np.testing.assert_allclose(explicit, [1.0, 1.0, 0.3, 0.0], rtol=1e-6)


def test_scores_are_deterministic_and_order_free():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(16, 32)).astype(np.float32)
    emb[5] = emb[4] + 1e-4  # a cluster
    success = rng.random(16) < 0.5
    success[[4, 5]] = True
    task = rng.integers(0, 2, 16).tolist()
    first = srpo_progress_scores(emb, success, task)
    np.testing.assert_array_equal(first, srpo_progress_scores(emb.copy(), success.copy(), list(task)))
    perm = rng.permutation(16)
    permuted = srpo_progress_scores(emb[perm], success[perm], [task[i] for i in perm])
    np.testing.assert_allclose(permuted, first[perm], rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown formula 'papr'; choose one of reference, paper"):
        srpo_progress_scores(np.zeros((2, 3)), [1, 0], [0, 0], formula="papr")
    with pytest.raises(ValueError, match="same N trajectories"):
        srpo_progress_scores(np.zeros((2, 3)), [1, 0, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="unknown video_key_by 'prompt'; choose one of rollout, group"):
        SRPOProgressReward(binary=True, video_key_by="prompt")
    with pytest.raises(ValueError, match="needs an embedder"):
        SRPOProgressReward(None)
    with pytest.raises(ValueError, match="unknown key name 'sucess'"):
        SRPOProgressReward(binary=True).set_keys(sucess="done")


# ------------------------------------------------------------------ the transform on trajectory batches
@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vjepa2") / "tiny.pt"
    write_tiny_vjepa2_checkpoint(path, seed=1)
    return VideoEmbedder(path, img_size=32, num_frames=16, enable_fp16=False, device="cpu", batch_size=4)


class CountingEmbedder:
    """The real embedder, counting the videos it is asked to embed."""

    def __init__(self, embedder):
        self.embedder, self.num_frames, self.calls = embedder, embedder.num_frames, []

    def __call__(self, videos):
        self.calls.append(len(videos))
        return self.embedder(videos)


def make_batch(success, group_id, task_id, decisions, last_frames, seed=0):
    """A trajectory batch in the layout of collect_rollouts; frames drift with the step (progress)."""
    n = len(success)
    gen = torch.Generator().manual_seed(seed)
    initial = torch.randint(0, 256, (n, 3, H, H), dtype=torch.uint8, generator=gen)
    drift = torch.randint(0, 256, (n, 1, 1, 3, 1, 1), generator=gen)
    step = torch.arange(T * K).view(1, T, K, 1, 1, 1)
    frames = ((initial.view(n, 1, 1, 3, H, H).int() + (step + 1) * drift) % 256).to(torch.uint8)
    mask = torch.arange(T).expand(n, T) < torch.tensor(decisions).unsqueeze(-1)
    frames_mask = mask.unsqueeze(-1).expand(n, T, K).clone()
    for i, d in enumerate(decisions):
        if d:
            frames_mask[i, d - 1, last_frames[i]:] = False  # the episode ended inside its last chunk
    chunk_steps = frames_mask.sum(-1) * 4
    return TensorDict(
        rollout_id=torch.arange(n), group_id=torch.tensor(group_id), task_id=torch.tensor(task_id),
        init_state_id=torch.tensor(group_id), success=torch.tensor(success, dtype=torch.bool),
        truncated=~torch.tensor(success, dtype=torch.bool), failed=torch.zeros(n, dtype=torch.bool),
        num_steps=chunk_steps.sum(-1), num_chunks=mask.sum(-1), initial_frame=initial,
        steps=TensorDict(
            action_tokens=torch.zeros(n, T, 8, 7, dtype=torch.long),
            action_log_prob=torch.zeros(n, T, 8, 7),
            action=torch.zeros(n, T, 8, 7),
            mask=mask,
            next=TensorDict(frames=frames, frames_mask=frames_mask, chunk_steps=chunk_steps, batch_size=[n, T]),
            batch_size=[n, T],
        ),
        batch_size=[n],
    )


# 3 groups of 4: groups 0 and 1 share task 0 (references are per task); row 9 never acted (one frame)
SUCCESS = [1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0]
GROUP = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
TASK = [0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3]
DECISIONS = [2, 4, 3, 1, 3, 2, 4, 4, 2, 0, 1, 3]
LAST = [1, 2, 2, 1, 2, 1, 2, 1, 2, 0, 1, 2]


@pytest.fixture()
def batch():
    return make_batch(SUCCESS, GROUP, TASK, DECISIONS, LAST)


def manual_video(batch, rows):
    """Plain loops: initial frames, then step by step, each row's valid frames of that step."""
    frames, fmask, mask = batch["steps", "next", "frames"], batch["steps", "next", "frames_mask"], batch["steps", "mask"]
    out = [batch["initial_frame"][r] for r in rows]
    for t in range(T):
        for r in rows:
            if mask[r, t]:
                out += [frames[r, t, k] for k in range(K) if fmask[r, t, k]]
    return torch.stack(out)


def test_trajectory_videos_follow_the_contract_layout(batch):
    rows = [[0], [9], [3], [4, 5, 6, 7]]
    videos = trajectory_videos(batch, rows)
    for got, r in zip(videos, rows, strict=True):
        torch.testing.assert_close(got, manual_video(batch, r))
    assert videos[1].shape[0] == 1  # never acted: its initial frame only
    assert videos[0].shape[0] == 1 + 2 + 1  # initial, two frames of step 0, one of step 1


def test_full_path_with_the_tiny_encoder(batch, embedder):
    out = SRPOProgressReward(embedder)(batch.clone())
    emb = embedder([manual_video(batch, [i]) for i in range(len(SUCCESS))])
    expected = srpo_progress_scores(emb, SUCCESS, TASK)
    assert out["reward"].dtype == torch.float32 and out["reward"].shape == (12,)
    np.testing.assert_allclose(out["progress"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["reward"].numpy(), 5.0 * expected, rtol=1e-5, atol=1e-6)
    failures = out["progress"][~out["success"]]
    assert (failures > 0).all() and (failures < 0.6).all() and out["progress"][out["success"]].eq(1).all()
    for task in set(TASK):  # per-rollout videos: distinct progress within a task
        fails = out["progress"][(torch.tensor(TASK) == task) & ~out["success"]].tolist()
        assert len(set(fails)) == len(fails)


def test_padding_and_masked_frames_are_ignored(batch, embedder):
    reward = SRPOProgressReward(embedder)
    noisy = batch.clone()
    valid = noisy["steps", "next", "frames_mask"] & noisy["steps", "mask"].unsqueeze(-1)
    noise = torch.randint(0, 256, noisy["steps", "next", "frames"].shape, dtype=torch.uint8)
    noisy["steps", "next", "frames"] = torch.where(valid[..., None, None, None], noisy["steps", "next", "frames"], noise)
    torch.testing.assert_close(reward(noisy)["reward"], reward(batch.clone())["reward"])


def test_deterministic(batch, embedder):
    reward = SRPOProgressReward(embedder)
    torch.testing.assert_close(reward(batch.clone())["reward"], reward(batch.clone())["reward"], rtol=0, atol=0)


def test_only_kept_groups_are_embedded(batch, embedder):
    counting = CountingEmbedder(embedder)
    keep = torch.tensor(GROUP) != 1
    out = SRPOProgressReward(counting)(batch.clone().set("keep", keep))
    assert counting.calls == [8]
    sub = SRPOProgressReward(embedder)(batch[keep].clone())
    torch.testing.assert_close(out["reward"][keep], sub["reward"])
    torch.testing.assert_close(out["progress"][~keep], batch["success"][~keep].float())  # not kept: binary
    # the argument overrides the key
    counting.calls.clear()
    SRPOProgressReward(counting)(batch.clone(), keep=torch.tensor(GROUP) == 2)
    assert counting.calls == [4]


def test_binary_is_one_switch_away(batch):
    out = SRPOProgressReward(binary=True, reward_coef=5.0)(batch.clone())
    torch.testing.assert_close(out["reward"], 5.0 * batch["success"].float())


def test_empty_frame_list_scores_zero(batch, embedder):
    # no initial frame and a success that never acted: no frames, zero embedding, invalid -> 0
    no_initial = batch.clone().exclude("initial_frame")
    out = SRPOProgressReward(embedder)(no_initial)
    assert out["progress"][9] == 0 and SUCCESS[9] == 1
    assert out["progress"][10] == 1


def test_suite_separates_tasks(batch, embedder):
    alone = SRPOProgressReward(embedder)(batch[:4].clone())
    ids = batch.clone().set("suite", torch.tensor([0] * 4 + [1] * 8))  # group 0 alone in suite 0
    names = batch.clone().set("suite", NonTensorStack(*(["libero_goal"] * 4 + ["libero_10"] * 8)))
    for both in (ids, names):
        out = SRPOProgressReward(embedder)(both)
        torch.testing.assert_close(out["progress"][:4], alone["progress"])


def test_set_keys(batch, embedder):
    renamed = batch.clone().rename_key_("success", "is_success")
    out = SRPOProgressReward(embedder).set_keys(success="is_success", reward="shaped")(renamed)
    torch.testing.assert_close(out["shaped"], SRPOProgressReward(embedder)(batch.clone())["reward"])
    with pytest.raises(KeyError, match=r"set_keys\(success=...\)"):
        SRPOProgressReward(embedder)(renamed)


def test_group_videos_cancel_in_the_advantage_and_ours_do_not(batch, embedder):
    group, binary = np.array(GROUP), 5.0 * np.array(SUCCESS, dtype=np.float64)
    ref = SRPOProgressReward(embedder, video_key_by="group")(batch.clone())
    ours = SRPOProgressReward(embedder, video_key_by="rollout")(batch.clone())

    # the reference: every rollout of a group embeds the group's merged video
    counting = CountingEmbedder(embedder)
    SRPOProgressReward(counting, video_key_by="group")(batch.clone())
    assert counting.calls == [3]
    merged = embedder([manual_video(batch, [r for r in range(12) if GROUP[r] == g]) for g in range(3)])
    expected = srpo_progress_scores(merged[GROUP], SUCCESS, TASK)
    np.testing.assert_allclose(ref["progress"].numpy(), expected, rtol=1e-5, atol=1e-6)

    for g in range(3):  # shaped failures of a group all get the same reward...
        fails = ref["progress"][(torch.tensor(GROUP) == g) & ~batch["success"]]
        assert torch.allclose(fails, fails[0])
    assert ref["reward"].ne(torch.tensor(binary, dtype=torch.float32)).any()  # ...which is shaped
    # ...so the group advantage equals the binary reward's: the shaping cancels
    np.testing.assert_allclose(grpo_advantages(ref["reward"].double().numpy(), group), grpo_advantages(binary, group),
                               atol=1e-4)
    # per-rollout videos: the advantages carry the progress
    diff = np.abs(grpo_advantages(ours["reward"].double().numpy(), group) - grpo_advantages(binary, group))
    assert diff.max() > 0.1


def test_as_a_replay_buffer_transform(batch, embedder):
    from torchrl.data import LazyTensorStorage, ReplayBuffer
    from torchrl.data.replay_buffers import SamplerWithoutReplacement

    rb = ReplayBuffer(storage=LazyTensorStorage(12), sampler=SamplerWithoutReplacement(shuffle=False),
                      batch_size=12, transform=SRPOProgressReward(embedder))
    rb.extend(batch.clone())
    sample = rb.sample()
    direct = SRPOProgressReward(embedder)(batch.clone())
    torch.testing.assert_close(sample["reward"], direct["reward"][sample["rollout_id"]])


def _rows_of(batch):
    """The batch as collect_rollouts hands its rows to on_finished: each trimmed to its own decisions."""
    rows = []
    for i in range(batch.batch_size[0]):
        row = batch[i].clone(recurse=False)
        rows.append(row.set("steps", row["steps"][: max(1, int(row["num_chunks"]))]))
    return rows


def test_background_embeddings_equal_the_rewards_own(batch, embedder):
    counting = CountingEmbedder(embedder)
    counting.batch_size = embedder.batch_size  # videos per background batch
    background = BackgroundEmbedder(counting)
    for row in reversed(_rows_of(batch)):  # any order of episode ends
        background(row)
    ids = batch["rollout_id"]
    given = background.pop(ids)
    background.close()
    # independently: the reward's own embedding of the padded batch, video by video
    expected = embedder([manual_video(batch, [i]) for i in range(len(SUCCESS))])
    torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-5)
    assert sum(counting.calls) == len(SUCCESS) and max(counting.calls) <= embedder.batch_size
    # the reward scores with the given embeddings and embeds nothing again
    again = CountingEmbedder(embedder)
    out = SRPOProgressReward(again)(batch.clone().set("video_embedding", given))
    assert again.calls == []
    np.testing.assert_allclose(out["progress"].numpy(), srpo_progress_scores(expected, SUCCESS, TASK),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match=r"rollouts \[0\] were never queued"):
        BackgroundEmbedder(counting).pop([0])  # each embedding is handed out once: a new one knows none


def test_background_embedding_errors_reach_the_caller(batch):
    def broken(videos):
        raise RuntimeError("out of memory")

    background = BackgroundEmbedder(broken)
    background(_rows_of(batch)[0])
    with pytest.raises(RuntimeError, match="embedding a finished trajectory failed") as info:
        background.pop([0])
    assert "out of memory" in str(info.value.__cause__)
    background.close()
    with pytest.raises(RuntimeError, match="closed"):
        background(_rows_of(batch)[1])


def test_background_thread_outlives_an_exit_raised_in_the_embedder_and_refuses_rows_without_ids(batch, embedder):
    # a BaseException (SystemExit) in the embedder used to end the thread, and pop() then waited forever
    class ExitsOnce(CountingEmbedder):
        def __call__(self, videos):
            if not self.calls:
                self.calls.append(len(videos))
                raise SystemExit("embedder exited")
            return super().__call__(videos)

    background = BackgroundEmbedder(ExitsOnce(embedder))
    rows = _rows_of(batch)
    background(rows[0])
    with pytest.raises(RuntimeError, match="embedding a finished trajectory failed") as info:
        background.pop([0])
    assert isinstance(info.value.__cause__, SystemExit)
    background(rows[1])  # the thread is still there
    torch.testing.assert_close(background.pop([1]), embedder([manual_video(batch, [1])]), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match=r"the trajectory has no \['rollout_id'\]"):
        background(rows[2].exclude("rollout_id"))
    background.close()


def test_background_embeds_only_the_groups_the_sampler_keeps(batch, embedder):
    # group 0 succeeds 1 of 4 times: below a lower bound of 0.3 the sampler drops it; groups 1 and 2 pass
    sampler = EmbodiedSampler(2, accuracy_lower_bound=0.3)
    counting = CountingEmbedder(embedder)
    counting.batch_size = embedder.batch_size
    background = BackgroundEmbedder(counting, keep_group=sampler.keeps, group_size=4)
    for row in reversed(_rows_of(batch)):  # groups complete in any order
        background(row)
    given = background.pop(batch["rollout_id"])
    background.close()
    assert sum(counting.calls) == 8 and background.dropped == 4  # group 0's videos were never embedded
    assert given[:4].isnan().all() and not given[4:].isnan().any()
    expected = embedder([manual_video(batch, [i]) for i in range(4, 12)])
    torch.testing.assert_close(given[4:], expected, rtol=1e-5, atol=1e-5)
    # the sampler drops the NaN rows with their group; the reward of what it keeps is the reward of embedding
    # the kept groups after the rollout
    sampler.add(batch.clone().set("video_embedding", given))
    kept = sampler.pop()
    assert kept["group_id"].tolist() == GROUP[4:]
    out = SRPOProgressReward(CountingEmbedder(embedder))(kept)
    np.testing.assert_allclose(out["progress"].numpy(), srpo_progress_scores(expected, SUCCESS[4:], TASK[4:]),
                               rtol=1e-5, atol=1e-6)


def test_background_embeds_a_group_left_incomplete_when_popped(batch, embedder):
    background = BackgroundEmbedder(embedder, keep_group=lambda group: False, group_size=4)
    rows = _rows_of(batch)
    for row in rows[:6]:  # group 0 complete (and dropped), group 1 half done
        background(row)
    given = background.pop([4, 5])  # a batch that ends inside group 1: embedded, unjudged
    background.close()
    torch.testing.assert_close(given, embedder([manual_video(batch, [4]), manual_video(batch, [5])]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep_group needs group_size"):
        BackgroundEmbedder(embedder, keep_group=lambda group: True)


# ------------------------------------------------------------------ frames sampled in time
CHUNK, SIDE = 8, 32  # env steps per decision, frame side (the tiny encoder's)


def label(row: int, step: int) -> np.ndarray:
    """A frame whose pixels name its trajectory and the episode step it shows."""
    return np.broadcast_to(np.array([row, step // 256, step % 256], np.uint8), (SIDE, SIDE, 3)).copy()


def read_labels(video: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(f[0, 0, 0]), int(f[1, 0, 0]) * 256 + int(f[2, 0, 0])) for f in video]


def timed_batch(lengths, stride, success=None):
    """Trajectories of ``lengths`` env steps, their reward frames rendered every ``stride`` steps by the
    env's chunk runner (:func:`srpo_rl.envs.chunk.run_chunk`), with the env's ``frames_step`` (start of the
    chunk + the sub-step each frame follows) and ``chunk_steps``, in the layout of collect_rollouts."""
    from srpo_rl.envs.chunk import run_chunk

    per_row = []
    for r, length in enumerate(lengths):
        t, chunks = 0, []
        while t < length:
            start = t

            def step(action, want_frame, last, r=r, length=length):
                nonlocal t
                t += 1
                return t == length, {}, label(r, t) if want_frame else None  # the episode ends at `length`

            res = run_chunk(step, lambda r=r: label(r, t), np.zeros((CHUNK, 7)), frame_stride=stride,
                            steps_left=10**6, frame_shape=(SIDE, SIDE, 3))
            chunks.append((res, start))
        per_row.append(chunks)
    n, decisions, k = len(lengths), max(len(c) for c in per_row), -(-CHUNK // stride)
    frames = torch.zeros(n, decisions, k, 3, SIDE, SIDE, dtype=torch.uint8)
    frames_mask = torch.zeros(n, decisions, k, dtype=torch.bool)
    frames_step = torch.zeros(n, decisions, k, dtype=torch.int64)
    chunk_steps = torch.zeros(n, decisions, dtype=torch.int64)
    for r, chunks in enumerate(per_row):
        for d, (res, start) in enumerate(chunks):
            frames[r, d] = torch.from_numpy(res.frames).permute(0, 3, 1, 2)
            frames_mask[r, d] = torch.from_numpy(res.frames_mask)
            frames_step[r, d] = torch.from_numpy(np.where(res.frames_mask, start + res.frames_step, 0))
            chunk_steps[r, d] = res.steps
    mask = torch.arange(decisions).expand(n, decisions) < torch.tensor([len(c) for c in per_row]).unsqueeze(-1)
    success = torch.ones(n, dtype=torch.bool) if success is None else torch.tensor(success)
    return TensorDict(
        rollout_id=torch.arange(n), group_id=torch.zeros(n, dtype=torch.long), task_id=torch.zeros(n, dtype=torch.long),
        success=success, num_chunks=mask.sum(-1),
        initial_frame=torch.stack([torch.from_numpy(label(r, 0)).permute(2, 0, 1) for r in range(n)]),
        steps=TensorDict(mask=mask, next=TensorDict(frames=frames, frames_mask=frames_mask, frames_step=frames_step,
                                                    chunk_steps=chunk_steps, batch_size=[n, decisions]),
                         batch_size=[n, decisions]),
        batch_size=[n],
    )


def reference_sample(num_available: int, num_frames: int) -> np.ndarray:
    """srpo_algorithm.md: ``linspace(0, T-1, 64, dtype=int)`` over T frames, ``np.resize`` when T < 64."""
    if num_available >= num_frames:
        return np.linspace(0, num_available - 1, num_frames, dtype=int)
    return np.resize(np.arange(num_available), num_frames)


def nearest_recorded(full: list, recorded: set, targets: np.ndarray) -> list:
    """For each target index into ``full``, the recorded entry nearest to it in ``full`` (the earlier at a tie)."""
    at = [i for i, entry in enumerate(full) if entry in recorded]
    return [full[min(at, key=lambda i: (abs(i - t), i))] for t in targets]


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_frames_are_sampled_in_time_as_the_reference_samples_every_step(stride):
    lengths = [5, 37, 63, 150, 203, 300, 512]  # a success at step 150 has 20 frames at one a chunk
    batch = timed_batch(lengths, stride)
    videos = trajectory_videos(batch, [[r] for r in range(len(lengths))], num_frames=64)
    for r, length in enumerate(lengths):
        full = [(r, t) for t in range(length + 1)]  # the reference's video: a frame after every env step
        targets = reference_sample(len(full), 64)
        valid = batch["steps", "next", "frames_mask"][r] & batch["steps", "mask"][r].unsqueeze(-1)
        recorded = {(r, 0)} | {(r, int(t)) for t in batch["steps", "next", "frames_step"][r][valid]}
        got = read_labels(videos[r])
        assert got == nearest_recorded(full, recorded, targets)
        if stride == 1:
            assert got == [full[t] for t in targets]  # every step recorded: the reference's frames exactly
        if length + 1 >= 64:  # in order, never looping back to the start as sampling the recorded frames would
            assert all(a[1] <= b[1] for a, b in zip(got, got[1:]))
            assert max(abs(g[1] - t) for g, t in zip(got, targets)) <= stride // 2


@pytest.mark.parametrize("stride", [1, 8])
def test_merged_group_videos_are_sampled_in_time(stride):
    lengths = [13, 30, 21]
    batch = timed_batch(lengths, stride)
    # the reference's merged video: initial frames, then chunk step by chunk step, each member's every step
    full = [(m, 0) for m in range(3)]
    for d in range(max(-(-n // CHUNK) for n in lengths)):
        for m, n in enumerate(lengths):
            full += [(m, t) for t in range(d * CHUNK + 1, min((d + 1) * CHUNK, n) + 1)]
    valid = batch["steps", "next", "frames_mask"] & batch["steps", "mask"].unsqueeze(-1)
    recorded = {(m, 0) for m in range(3)} | {
        (m, int(t)) for m in range(3) for t in batch["steps", "next", "frames_step"][m][valid[m]]}
    for num_frames in (16, 64, 128):  # 128 > 67 frames: the reference loops
        got = read_labels(trajectory_videos(batch, [[0, 1, 2]], num_frames=num_frames)[0])
        assert got == nearest_recorded(full, recorded, reference_sample(len(full), num_frames))
    # without sampling: the recorded frames in the reference's order
    assert read_labels(trajectory_videos(batch, [[0, 1, 2]])[0]) == [e for e in full if e in recorded]


def test_the_reward_embeds_the_frames_sampled_in_time(embedder):
    lengths, success = [150, 512, 203, 512], [True, False, True, False]
    batch = timed_batch(lengths, CHUNK, success)
    videos = []
    for r, length in enumerate(lengths):  # independently: the frame of the nearest recorded step, every target
        recorded = [0] + batch["steps", "next", "frames_step"][r][batch["steps", "next", "frames_mask"][r]].tolist()
        picked = [min(recorded, key=lambda s: (abs(s - t), s)) for t in reference_sample(length + 1, 16)]
        videos.append(torch.stack([torch.from_numpy(label(r, s)).permute(2, 0, 1) for s in picked]))
    expected_embeddings = embedder(videos)
    out = SRPOProgressReward(embedder)(batch.clone())
    expected = srpo_progress_scores(expected_embeddings, success, [0] * 4)
    np.testing.assert_allclose(out["progress"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # the background embedder, handed each trajectory as collect_rollouts does, embeds the same videos
    background = BackgroundEmbedder(embedder)
    for row in _rows_of(batch):
        background(row)
    given = background.pop(batch["rollout_id"])
    background.close()
    torch.testing.assert_close(given, expected_embeddings, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="chunk_steps"):  # frames_step without the steps that place them
        SRPOProgressReward(embedder)(batch.exclude(("steps", "next", "chunk_steps")))
