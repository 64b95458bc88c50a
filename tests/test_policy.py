"""OpenVLAOFTPolicy: preprocessing, token <-> bin <-> action, temperature log-probs, ratio 1 on recompute, errors."""

import copy
import io
import json
import math
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensordict import NonTensorStack, TensorDict
from torchrl.data.vla import VocabTailActionTokenizer
from torchrl.envs.utils import ExplorationType, set_exploration_type

from srpo_rl.models.openvla_oft import write_tiny_checkpoint
from srpo_rl.policy import OpenVLAOFTPolicy, preprocess_images, prompt_for, resolve_unnorm_key

INSTRUCTIONS = ("open the top drawer of the cabinet", "Put the bowl on the plate")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: extra intra-op threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_policy")
    write_tiny_checkpoint(path, seed=5)
    return path


@pytest.fixture(scope="module")
def policy(path):
    return OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.float32)


@pytest.fixture(scope="module")
def stats(path):
    return json.loads((path / "dataset_statistics.json").read_text())["libero_10_no_noops"]["action"]


def _obs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, generator=g)
    return TensorDict({("observation", "image"): image, "instruction": NonTensorStack(*INSTRUCTIONS[:batch])}, [batch])


def _hand_decode(index, stats):
    """Action-vocabulary index -> LIBERO action, step by step as the reference does it (numpy, float64)."""
    token = 31744 + np.asarray(index, dtype=np.int64)  # LM id
    bin_index = np.clip((32000 - token) - 1, 0, 254)  # token = 32000 - digitized bin
    center = -1.0 + (2 * bin_index + 1) / 255.0  # bin centers of linspace(-1, 1, 256)
    q01, q99, mask = (np.asarray(stats[k]) for k in ("q01", "q99", "mask"))
    action = np.where(mask, 0.5 * (center + 1) * (q99 - q01 + 1e-8) + q01, center)
    gripper = -np.sign(2 * center[..., 6] - 1)  # binarise to +-1, then invert (1 = close in LIBERO)
    action[..., 6] = gripper
    return action


def test_outputs_follow_the_contract(policy):
    out = policy(_obs())
    expected = {
        "policy_image": ((2, 3, 224, 224), torch.uint8),
        "action_tokens": ((2, 8, 7), torch.int64),
        "action_log_prob": ((2, 8, 7), torch.float32),
        "action": ((2, 8, 7), torch.float32),
    }
    for key, (shape, dtype) in expected.items():
        assert out[key].shape == shape and out[key].dtype == dtype, key
    assert out["prompt_ids"].dtype == torch.int64 and out["prompt_mask"].dtype == torch.bool
    ids, mask = out["prompt_ids"], out["prompt_mask"]
    assert ids.shape == mask.shape and ids[1][~mask[1]].eq(32000).all()  # right padded with <PAD>
    for row, m, instruction in zip(ids, mask, INSTRUCTIONS, strict=False):
        expected_ids = policy.tokenizer.encode(prompt_for(instruction)).ids
        assert row[m].tolist() == expected_ids + [29871] * (expected_ids[-1] != 29871)
    assert prompt_for(INSTRUCTIONS[1]).endswith("put the bowl on the plate?\nOut:")
    assert set(policy.out_keys) == {
        "policy_image",
        "prompt_ids",
        "prompt_mask",
        "action_tokens",
        "action_log_prob",
        "action",
    }


def test_tokens_bins_and_actions_match_hand_computation(policy, stats):
    index = torch.tensor([0, 1, 2, 127, 128, 254, 255])
    decoded = policy.action_tokenizer.decode(index.expand(7, 7).T.contiguous())  # each index in every dim
    np.testing.assert_allclose(decoded.numpy(), _hand_decode(index.expand(7, 7).T.numpy(), stats), rtol=1e-6, atol=1e-6)
    # the reference's quirks: ids 31744 and 31745 share the top bin center, 31999 is the bottom one
    edges = policy.action_tokenizer.decode(torch.tensor([[0, 1, 255, 0, 0, 0, 0]]))
    expected = (
        0.5 * ((np.array([254, 254, 0]) * 2 + 1) / 255.0) * (np.array(stats["q99"][:3]) - stats["q01"][:3] + 1e-8)
        + stats["q01"][:3]
    )
    np.testing.assert_allclose(edges[0, :3].numpy(), expected, rtol=1e-6)
    out = policy(_obs())
    np.testing.assert_allclose(
        out["action"].numpy(), _hand_decode(out["action_tokens"].numpy(), stats), rtol=1e-6, atol=1e-6
    )
    assert set(out["action"][..., 6].unique().tolist()) <= {-1.0, 1.0}


def test_statistics_without_a_mask_still_get_the_gripper_step(path, tmp_path):
    # The reference unnormalises every dimension when the statistics carry no mask (OpenVLA's default mask is
    # all True), and its LIBERO wrapper then maps the last one to -sign(2 g - 1) whatever the mask was
    shutil.copytree(path, tmp_path / "no_mask")
    file = tmp_path / "no_mask" / "dataset_statistics.json"
    statistics = json.loads(file.read_text())
    action_stats = statistics["libero_10_no_noops"]["action"]
    del action_stats["mask"]
    action_stats["q01"][6], action_stats["q99"][6] = 0.0, 1.0  # a gripper range that puts g on both sides of 0.5
    file.write_text(json.dumps(statistics))
    policy = OpenVLAOFTPolicy.from_pretrained(tmp_path / "no_mask", unnorm_key="libero_10", dtype=torch.float32)
    index = np.array([0, 60, 100, 127, 128, 200, 255])
    decoded = policy.action_tokenizer.decode(torch.from_numpy(index).expand(7, 7).T.contiguous()).numpy()
    center = (np.linspace(-1, 1, 256)[:-1] + np.linspace(-1, 1, 256)[1:]) / 2
    center = center[np.clip(255 - index, 0, 254)]  # id 31744 + i is the digitized bin 256 - i
    q01, q99 = np.asarray(action_stats["q01"]), np.asarray(action_stats["q99"])
    unnormalised = 0.5 * (center[:, None] + 1) * (q99 - q01 + 1e-8) + q01  # every dimension, the gripper too
    np.testing.assert_allclose(decoded[:, :6], unnormalised[:, :6], rtol=1e-6, atol=1e-6)
    gripper = -np.sign(2 * unnormalised[:, 6] - 1)
    assert decoded[:, 6].tolist() == gripper.tolist() and set(gripper) == {-1.0, 1.0}


def test_every_suite_of_the_tiny_statistics_decodes_into_the_env_range(path):
    from srpo_rl.envs.chunk import validate_chunk

    every_bin = np.arange(256)[:, None].repeat(7, axis=1)  # [256, 7]: every token in every dim
    for name, suite_stats in json.loads((path / "dataset_statistics.json").read_text()).items():
        action = _hand_decode(every_bin, suite_stats["action"])
        assert np.abs(action).max() <= 1.0, name  # LIBERO's env takes actions in [-1, 1]
        validate_chunk(action.reshape(32, 8, 7).astype(np.float32), 8, 7, batch=True)


def test_log_probs_are_the_tempered_softmax_of_the_model_logits(policy, path):
    with set_exploration_type(ExplorationType.RANDOM):
        torch.manual_seed(0)
        out = policy(_obs())
    # normalise by hand with the processor's (bf16-rounded) DINOv2 constants and SigLIP's 0.5/0.5
    processor = json.loads((path / "preprocessor_config.json").read_text())["tvf_normalize_params"]
    x = out["policy_image"].float() / 255.0
    pixels = torch.cat(
        [(x - torch.tensor(p["mean"]).view(3, 1, 1)) / torch.tensor(p["std"]).view(3, 1, 1) for p in processor], 1
    )
    with torch.no_grad():
        logits = policy.model.action_logits(out["prompt_ids"], out["prompt_mask"], pixels).view(2, 8, 7, 256)
    expected = torch.log_softmax(logits / 1.6, -1).gather(-1, out["action_tokens"][..., None])[..., 0]
    torch.testing.assert_close(out["action_log_prob"], expected, rtol=1e-5, atol=1e-5)
    greedy = policy(_obs())  # no exploration context: argmax, whatever the temperature
    assert torch.equal(greedy["action_tokens"], logits.argmax(-1))


def test_launch_then_finish_is_the_forward(policy):
    # the pool's two halves of a decision: what forward writes, the same random draws, on the CPU
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        torch.manual_seed(3)
        expected = policy(_obs(seed=4))
        torch.manual_seed(3)
        launched = policy.launch(_obs(seed=4))
        out = policy.finish(launched)
    assert launched.gpu_ms() is None  # off CUDA: nothing to time, the clock predicts nothing
    assert set(out.keys()) == {"policy_image", "prompt_ids", "prompt_mask", "action_tokens", "action_log_prob",
                               "action"}
    assert out.batch_size == expected.batch_size
    for key in out.keys():
        assert torch.equal(out[key], expected[key]), key
    assert policy._known_prompts is None  # the host-side prompt lengths do not outlive the call


def test_recomputed_log_probs_give_ratio_one(policy):
    with set_exploration_type(ExplorationType.RANDOM):
        first = policy(_obs(seed=1))
        second = policy(_obs(seed=2))
    assert not torch.equal(first["action_tokens"], second["action_tokens"])  # sampled, not argmax
    recomputed = policy.log_prob(first)
    assert recomputed.requires_grad
    assert torch.equal(recomputed.detach(), first["action_log_prob"].detach())  # same batch: exactly equal
    # a [B, T] trajectory batch (padded to a common prompt length) recomputes within float tolerance
    steps = torch.stack([first.exclude("instruction", "observation"), second.exclude("instruction", "observation")], 1)
    dist = policy.get_dist(steps)
    assert dist.batch_shape == (2, 2, 8, 7) and dist.logits.shape[-1] == 256
    ratio = (dist.log_prob(steps["action_tokens"]) - steps["action_log_prob"]).exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    ratio.sum().backward()
    assert policy.model.projector.fc1.weight.grad is not None
    policy.model.zero_grad(set_to_none=True)


def test_batch_with_time_dimension_is_flattened_inside(policy):
    td = torch.stack([_obs(seed=3), _obs(seed=4)], 1)  # [2, 2]
    out = policy(td)
    assert out["action"].shape == (2, 2, 8, 7) and out["policy_image"].shape == (2, 2, 3, 224, 224)
    single = policy(_obs(seed=4))
    assert torch.equal(out["policy_image"][:, 1], single["policy_image"])
    torch.testing.assert_close(out["action_log_prob"][:, 1], single["action_log_prob"], atol=1e-5, rtol=0)


def test_preprocessing_resizes_and_crops_like_the_reference_geometry(policy):
    # a horizontal ramp: Lanczos keeps a linear ramp linear, so each output column has a known value
    column = torch.arange(256, dtype=torch.float32) * 0.5 + 40
    image = column.expand(1, 3, 256, 256).round().to(torch.uint8)
    cropped = preprocess_images(image)[0, 0].float()
    side = math.sqrt(0.9)
    u = (1 - side) / 2 * 223 + torch.arange(224) * side  # crop_and_resize sample coordinates in the 224 image
    expected = 0.5 * ((u + 0.5) * 256 / 224 - 0.5) + 40  # then the 256 -> 224 resize coordinates
    assert (cropped[:, 8:-8] - expected[8:-8]).abs().max() < 2.5  # JPEG + uint8 rounding
    plain = preprocess_images(image, center_crop=False)[0, 0].float()
    assert (plain[:, 8:-8] - (0.5 * ((torch.arange(224) + 0.5) * 256 / 224 - 0.5) + 40)[8:-8]).abs().max() < 2.5
    flat = preprocess_images(torch.full((2, 3, 256, 256), 100, dtype=torch.uint8))
    assert flat.shape == (2, 3, 224, 224) and (flat.int() - 100).abs().max() <= 1
    obs = _obs()
    assert torch.equal(policy(obs)["policy_image"], preprocess_images(obs["observation", "image"]))


def _tf_lanczos3_weights(in_size: int, out_size: int) -> np.ndarray:
    """TF's ScaleAndTranslate with the antialiased Lanczos3 kernel (tf.image.resize(..., "lanczos3",
    antialias=True)), written out as an ``[out, in]`` matrix: the kernel widened by 1 / scale when downscaling,
    the span clipped to the image, the weights normalised."""
    def lanczos3(x: float) -> float:
        x = abs(x)
        if x > 3.0:
            return 0.0
        return 1.0 if x < 1e-3 else 3.0 * math.sin(math.pi * x) * math.sin(math.pi * x / 3.0) / (math.pi * x) ** 2

    scale = out_size / in_size
    kernel_scale = max(1.0 / scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for x in range(out_size):
        centre = (x + 0.5) / scale
        first = max(math.ceil(centre - 3.0 * kernel_scale - 0.5), 0)
        last = min(math.floor(centre + 3.0 * kernel_scale - 0.5), in_size - 1)
        for j in range(first, last + 1):
            weights[x, j] = lanczos3((j + 0.5 - centre) / kernel_scale)
        weights[x] /= weights[x].sum()
    return weights


def _tf_center_crop(channel: np.ndarray, area: float = 0.9) -> np.ndarray:
    """OpenVLA's center_crop_image on one uint8 channel: to float in [0, 1], TF crop_and_resize (bilinear) of the
    central box of side sqrt(area) back to the same size, then convert_image_dtype to uint8 (x 255.5, floor)."""
    size = channel.shape[0]
    low, high = (1 - math.sqrt(area)) / 2, (1 + math.sqrt(area)) / 2
    coords = low * (size - 1) + np.arange(size) * (high - low) * (size - 1) / (size - 1)
    below = np.floor(coords).astype(int)
    above, frac = np.minimum(below + 1, size - 1), coords - below
    image = channel / 255.0
    rows = image[below] * (1 - frac)[:, None] + image[above] * frac[:, None]
    crop = rows[:, below] * (1 - frac)[None] + rows[:, above] * frac[None]
    return np.floor(np.clip(crop, 0, 1) * 255.5)


def test_preprocessing_is_tf_lanczos3_then_crop_and_resize_on_a_noise_image():
    # noise: every kernel weight and every sample position shows in the output (a bilinear resize would be off
    # by tens of grey levels here, a half-pixel shift as much)
    image = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    weights = _tf_lanczos3_weights(256, 224)
    resized = [np.clip(np.round(weights @ c @ weights.T), 0, 255) for c in image[0].double().numpy()]
    plain = preprocess_images(image, jpeg_quality=None, center_crop=False)[0].int().numpy()
    assert np.abs(plain - np.stack(resized)).max() <= 1  # float rounding at .5
    cropped = preprocess_images(image, jpeg_quality=None)[0].int().numpy()
    expected = np.stack([_tf_center_crop(c) for c in resized])
    difference = np.abs(cropped - expected)
    assert difference.max() <= 1 and difference.mean() < 0.01


def test_without_its_jpeg_round_trip_the_policy_sees_the_env_decoded_image(policy, path):
    obs = _obs()
    raw = obs["observation", "image"]
    # the env's workers did the round trip (LiberoVecEnv(jpeg_quality=95)): PIL by hand, on [H, W, 3]
    decoded = []
    for image in raw.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    env_decoded = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    skipping = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.float32, jpeg_quality=None)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        own = policy(obs.clone())
        env_side = skipping(obs.clone().set(("observation", "image"), env_decoded))
    assert torch.equal(own["policy_image"], env_side["policy_image"])
    assert torch.equal(own["action_tokens"], env_side["action_tokens"])
    # and the skip is real: on the raw image it sees something else
    assert not torch.equal(skipping(obs.clone())["policy_image"], own["policy_image"])
    with pytest.raises(ValueError, match=r"jpeg_quality .* got 101"):
        OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", jpeg_quality=101)


def test_wrist_camera_adds_a_second_image(policy):
    two = OpenVLAOFTPolicy(
        policy.model,
        policy.tokenizer,
        {"means": [[0.485, 0.456, 0.406], [0.5] * 3], "stds": [[0.229, 0.224, 0.225], [0.5] * 3]},
        unnorm_key="libero_spatial",
        num_images_in_input=2,
    )
    assert ("observation", "wrist_image") in two.in_keys and two.unnorm_key == "libero_spatial_no_noops"
    obs = _obs()
    obs["observation", "wrist_image"] = obs["observation", "image"].flip(-1)
    out = two(obs)
    assert out["policy_image"].shape == (2, 6, 224, 224) and out["action"].shape == (2, 8, 7)
    # each camera is preprocessed on its own: the second half of policy_image is the wrist frame's
    wrist_alone = preprocess_images(obs["observation", "wrist_image"])
    assert torch.equal(out["policy_image"][:, 3:], wrist_alone)
    # cameras of different sizes: each resized to the model's size
    obs = _obs()
    small = obs["observation", "image"][..., ::2, ::2].contiguous()
    obs["observation", "wrist_image"] = small
    out = two(obs)
    assert out["policy_image"].shape == (2, 6, 224, 224)
    assert torch.equal(out["policy_image"][:, 3:], preprocess_images(small))
    with pytest.raises(KeyError, match="wrist_image"):
        two(_obs())


def test_unnorm_key_resolution():
    stats = {f"libero_{s}_no_noops": {} for s in ("spatial", "10")}
    assert resolve_unnorm_key(stats, "libero_10") == "libero_10_no_noops"
    assert resolve_unnorm_key(stats, "libero_long") == "libero_10_no_noops"
    assert resolve_unnorm_key(stats, "libero_spatial_no_noops") == "libero_spatial_no_noops"
    with pytest.raises(
        KeyError, match=r"unknown unnorm_key 'bridge'; choose one of libero_10_no_noops, libero_spatial_no_noops"
    ):
        resolve_unnorm_key(stats, "bridge")
    with pytest.raises(ValueError, match="pass unnorm_key"):
        resolve_unnorm_key(stats, None)


def test_fp32_policy_saves_back_the_published_files(policy, path, tmp_path):
    policy.save_pretrained(tmp_path, max_shard_size=int(0.6 * sum(p.numel() * 2 for p in policy.model.parameters())))
    for file in path.iterdir():  # stored bf16 -> fp32 -> bf16 is exact: the same bytes
        assert (tmp_path / file.name).read_bytes() == file.read_bytes(), file.name


def test_statistics_stay_float64_when_the_policy_is_cast(path):
    policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_goal")
    policy.to(torch.float16)
    assert policy.action_tokenizer.norm_low.dtype == torch.float64
    assert policy.model.projector.fc1.weight.dtype == torch.float16


def test_bad_input_gives_clear_errors(policy, path, tmp_path):
    obs = _obs()
    with pytest.raises(TypeError, match=r"'image'\) must be uint8 .* got dtype torch.float32"):
        policy(obs.clone().set(("observation", "image"), obs["observation", "image"].float()))
    with pytest.raises(
        ValueError, match=r"must have shape \[\*batch, 3, H, W\] with batch \[2\]; got \[2, 256, 256, 3\]"
    ):
        policy(obs.clone().set(("observation", "image"), obs["observation", "image"].permute(0, 2, 3, 1)))
    with pytest.raises(KeyError, match="no 'instruction'"):
        policy(obs.exclude("instruction"))
    with pytest.raises(KeyError, match="choose one of libero_10_no_noops, libero_90_no_noops, libero_goal_no_noops"):
        OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_100")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", temperature=0.0)
    with pytest.raises(KeyError, match="run the policy forward"):
        policy.get_dist(obs)
    broken = tmp_path / "ckpt"
    shutil.copytree(path, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing: tokenizer.json, preprocessor_config.json"):
        OpenVLAOFTPolicy.from_pretrained(broken, unnorm_key="libero_10")


@pytest.mark.gpu
def test_bf16_on_gpu_recomputes_the_rollout_log_probs(path):
    policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.bfloat16, device="cuda")
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        out = policy(_obs(batch=2).to("cuda"))
        ratio = (policy.log_prob(out) - out["action_log_prob"]).exp()
    assert out["action_log_prob"].dtype == torch.float32
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-3, rtol=0)


def _decode_cpu_and_wall(decoder, tokens: torch.Tensor) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) of decoding tokens behind a GPU kernel of about 0.3 s."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))  # stands in for the forward that produces the tokens
    cpu, wall = time.thread_time(), time.perf_counter()
    decoder.decode(tokens)
    return time.thread_time() - cpu, time.perf_counter() - wall


@pytest.mark.gpu
def test_decoding_waits_for_the_forward_asleep(policy):
    tokens = torch.randint(0, 256, (4, 8, 7), device="cuda")
    decoder = policy.action_tokenizer
    cpu, wall = _decode_cpu_and_wall(decoder, tokens)
    assert wall > 0.05 and cpu < 0.2 * wall, (cpu, wall)
    # why the subclass exists: torchrl's decoder copies the tokens to the host, spinning through the wait
    plain = copy.copy(decoder)  # the same statistics, torchrl's own class
    plain.__class__ = VocabTailActionTokenizer
    cpu, wall = _decode_cpu_and_wall(plain, tokens)
    assert wall > 0.05 and cpu > 0.8 * wall, (cpu, wall)
    expected = plain.decode(tokens)  # float64; then LIBERO's gripper step, which torchrl's class leaves out
    if decoder.libero_gripper:
        expected[..., -1] = -torch.sign(2 * expected[..., -1] - 1)
    torch.testing.assert_close(decoder.decode(tokens), expected.float(), rtol=0, atol=0)


@pytest.mark.gpu
def test_launch_queues_the_decision_without_a_host_sync(path):
    # a host sync in launch would leave the GPU idle while this thread wakes up (and waits for the GIL), and
    # would wait for the forward queued ahead of it: the pool's next batch could not run right behind it
    # as in a rollout: the env applies the JPEG round trip (a host copy in the policy's process)
    policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.float32, device="cuda",
                                              jpeg_quality=None)
    obs = _obs().to("cuda")
    with torch.no_grad():
        expected = policy.finish(policy.launch(obs.clone()))  # captures the graph (that syncs)
        td = obs.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            launched = policy.launch(td)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out = policy.finish(launched)
    for key in out.keys():
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0, msg=key)
    # stored prompts (training's recomputation, eager, lengths read back from the GPU): the same log-probs
    recomputed = policy.log_prob(out.to("cuda")).detach().cpu()
    torch.testing.assert_close(recomputed, out["action_log_prob"], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_launch_returns_before_the_gpu_is_done(path):
    # as in a rollout: the env applies the JPEG round trip (a host copy in the policy's process)
    policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.float32, device="cuda",
                                              jpeg_quality=None)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        torch.manual_seed(1)
        expected = policy(_obs().to("cuda"))  # also captures the graph
        obs = _obs().to("cuda")
        torch.cuda.synchronize()
        torch.cuda._sleep(int(5e8))  # a forward in flight ahead of it (about 0.3 s)
        torch.manual_seed(1)
        wall = time.perf_counter()
        launched = policy.launch(obs)
        launch_s = time.perf_counter() - wall
        cpu = time.thread_time()
        out = policy.finish(launched)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert launch_s < 0.5 * wall, (launch_s, wall)  # queued, not waited for
    assert cpu < 0.2 * wall, (cpu, wall)  # finish waits asleep
    assert 0 < launched.gpu_ms() < 1e3 * wall
    for key in out.keys():
        torch.testing.assert_close(out[key], expected[key].cpu(), rtol=0, atol=0, msg=key)
