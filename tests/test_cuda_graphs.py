"""CUDA graphs of the policy forward: bucket sizes, padding invariance (CPU), graph replay == eager (GPU), the
policy's preprocessing captured with the forward (GPU), graphs of LoRA adapters beside or merged into the
weights."""

import pytest
import torch
from tensordict import TensorDict

from srpo_rl.cuda_graphs import GraphedActionLogits, batch_bucket, graphs_supported
from srpo_rl.models.llama_tokenizer import build_tiny_llama_tokenizer
from srpo_rl.models.openvla_oft import OpenVLAOFT, tiny_config
from srpo_rl.models.openvla_oft_files import preprocessor_config
from srpo_rl.policy import OpenVLAOFTPolicy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenVLAOFT(tiny_config()).eval()


def _inputs(batch: int, width: int, lengths: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 31000, (batch, width), generator=g)
    ids[:, 0] = 1
    return ids, torch.tensor(lengths), torch.randn(batch, 6, 224, 224, generator=g)


def test_batch_buckets_cover_every_batch_with_bounded_padding():
    assert [batch_bucket(b) for b in range(1, 17)] == list(range(1, 17))  # the pool's common sizes: no padding
    assert [batch_bucket(b) for b in (17, 20, 21, 33, 63, 65, 100)] == [18, 20, 22, 36, 64, 80, 112]
    buckets = [batch_bucket(b) for b in range(1, 301)]
    assert all(b <= k for b, k in zip(range(1, 301), buckets))
    assert all(k - b < max(1, b // 4 + 1) for b, k in zip(range(1, 301), buckets))  # < ~25 % padding rows
    assert all(k - b <= max(1, b // 8) for b, k in zip(range(1, 65), buckets))  # <= 12.5 % up to 64 rows
    assert buckets == sorted(buckets)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        batch_bucket(0)


def test_padding_rows_and_width_leave_the_real_rows_unchanged(model):
    # what a graph bucket does to a batch: more rows (copies of the first) and a wider prompt (any ids)
    ids, lengths, pixels = _inputs(3, 9, [9, 5, 7], seed=1)
    with torch.no_grad():
        plain = model.logits_from_lengths(ids, lengths, pixels)
        wide_ids = torch.cat([ids, torch.randint(3, 31000, (3, 7))], dim=1)
        padded = model.logits_from_lengths(
            torch.cat([wide_ids, wide_ids[:1].expand(2, -1)]), torch.cat([lengths, lengths[:1].expand(2)]),
            torch.cat([pixels, torch.randn(2, *pixels.shape[1:])]),  # any finite pixels
        )
        masked = model.action_logits(ids, torch.arange(9)[None] < lengths[:, None], pixels)
    torch.testing.assert_close(padded[:3], plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masked, plain)


def test_graphs_refuse_cpu_models_and_the_policy_falls_back(model):
    assert not graphs_supported(model)
    with pytest.raises(ValueError, match="plain tensors on a CUDA device"):
        GraphedActionLogits(model)
    policy = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.0)
    td = TensorDict({("observation", "image"): torch.zeros(2, 3, 64, 64, dtype=torch.uint8)}, [2])
    td.set_non_tensor("instruction", ["open the drawer", "put the bowl on the plate"])
    with torch.no_grad():
        assert policy(td)["action"].shape == (2, 8, 7)
    assert policy._graphed[1] is None  # decided once for these parameters: eager
    decided = policy._graphed
    with torch.no_grad():
        policy(td.clone())
    assert policy._graphed is decided
    policy.to(torch.float64)  # new storage under the same Parameter objects: decided again
    with torch.no_grad():
        policy(td.clone())
    assert policy._graphed is not decided and policy._graphed[0][2] == torch.float64
    policy.to(torch.float32)


def _tiny_policy_and_observation():
    torch.manual_seed(0)
    model = OpenVLAOFT(tiny_config()).eval()
    policy = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.0)
    td = TensorDict({("observation", "image"): torch.zeros(2, 3, 64, 64, dtype=torch.uint8)}, [2])
    td.set_non_tensor("instruction", ["open the drawer", "put the bowl on the plate"])
    return model, policy, td


def test_policy_decides_its_graphs_again_when_lora_adapters_are_added():
    # a graph replays the forward it captured: one captured before add_lora would skip the adapters
    from srpo_rl.lora import add_lora

    model, policy, td = _tiny_policy_and_observation()
    with torch.no_grad():
        policy(td.clone())
    decided = policy._graphed
    add_lora(model, rank=2)
    with torch.no_grad():
        policy(td.clone())
    assert policy._graphed is not decided and policy._graphed[0][4] and not decided[0][4]


@pytest.mark.gpu
def test_graph_replay_matches_eager_forward_on_cuda(model):
    cuda = model.to("cuda")
    graphed = GraphedActionLogits(cuda, width_multiple=8)
    with torch.no_grad():
        for batch, width, seed in ((3, 9, 0), (5, 12, 1), (3, 7, 2), (17, 16, 3)):  # 17 rows run padded to 18
            lengths = torch.randint(2, width + 1, (batch,), generator=torch.Generator().manual_seed(seed))
            lengths[0] = width
            ids, n, pixels = (t.cuda() for t in _inputs(batch, width, lengths.tolist(), seed))
            logits, kept = graphed(ids, n, pixels)
            assert kept is None  # no prepare: nothing but the logits
            torch.testing.assert_close(logits, cuda.logits_from_lengths(ids, n, pixels), rtol=1e-4, atol=1e-4)
        assert {k[:2] for k in graphed.graphs} == {(3, 16), (5, 16), (3, 8), (18, 16)}  # widths: multiples of 8
        # weights changed in place are what the next replay reads
        cuda.projector.fc3.bias.add_(0.5)
        ids, n, pixels = (t.cuda() for t in _inputs(3, 9, [9, 4, 6], 4))
        torch.testing.assert_close(graphed(ids, n, pixels)[0], cuda.logits_from_lengths(ids, n, pixels),
                                   rtol=1e-4, atol=1e-4)
    model.to("cpu")


@pytest.mark.gpu
def test_graphs_capture_the_compiled_blocks():
    torch.manual_seed(0)
    eager = OpenVLAOFT(tiny_config()).eval().cuda()
    compiled = OpenVLAOFT(tiny_config()).eval().cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    graphed = GraphedActionLogits(compiled, width_multiple=8)
    with torch.no_grad():
        for batch, width, seed in ((3, 9, 0), (5, 12, 1)):
            lengths = torch.full((batch,), width)
            ids, n, pixels = (t.cuda() for t in _inputs(batch, width, lengths.tolist(), seed))
            torch.testing.assert_close(graphed(ids, n, pixels)[0], eager.logits_from_lengths(ids, n, pixels),
                                       rtol=1e-3, atol=1e-3)
    assert all(graph is not None for graph in graphed.graphs.values())  # every bucket captured, none eager


@pytest.mark.gpu
def test_graphs_read_the_lora_adapters_in_place():
    from srpo_rl.lora import add_lora

    torch.manual_seed(0)
    model = OpenVLAOFT(tiny_config()).eval().cuda()
    adapters = add_lora(model, rank=4)
    graphed = GraphedActionLogits(model, width_multiple=8)
    ids, n, pixels = (t.cuda() for t in _inputs(3, 9, [9, 4, 6], 5))
    with torch.no_grad():
        for _ in range(2):  # as an optimizer step would: the adapters change in place between replays
            for b in adapters[1::2]:
                b.normal_(0.0, 0.05)
            torch.testing.assert_close(graphed(ids, n, pixels)[0], model.logits_from_lengths(ids, n, pixels),
                                       rtol=1e-4, atol=1e-4)
    assert list(graphed.graphs.values())[0] is not None


@pytest.mark.gpu
def test_policy_graphs_take_in_lora_adapters_added_after_a_forward():
    from srpo_rl.lora import add_lora

    torch.manual_seed(0)
    model = OpenVLAOFT(tiny_config()).eval().cuda()
    policy = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.6,
                              jpeg_quality=None).to("cuda")
    eager = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.6,
                             jpeg_quality=None, cuda_graphs=False).to("cuda")
    with torch.no_grad():
        policy(_camera_obs(2, 0).to("cuda"))  # graphs captured without adapters
        before = policy._graphed[1]
        for b in add_lora(model, rank=4)[1::2]:
            b.normal_(0.0, 0.05)  # adapters that change the logits
        obs = _camera_obs(2, 1).to("cuda")
        graphed_out, eager_out = policy(obs.clone()), eager(obs.clone())
    assert policy._graphed[1] is not before and all(g is not None for g in policy._graphed[1].graphs.values())
    assert torch.equal(graphed_out["action_tokens"], eager_out["action_tokens"])
    torch.testing.assert_close(graphed_out["action_log_prob"], eager_out["action_log_prob"], rtol=1e-4, atol=1e-4)


def test_policy_decides_its_graphs_again_inside_merged_adapters():
    # inside the block the layers run plain on merged weights: a graph of the adapters' forward would add them twice
    from srpo_rl.lora import add_lora, merged_adapters

    model, policy, td = _tiny_policy_and_observation()
    add_lora(model, rank=2)
    with torch.no_grad():
        policy(td.clone())
        adapted = policy._graphed
        with merged_adapters(model):
            policy(td.clone())
            merged = policy._graphed
        policy(td.clone())
    assert adapted[0][4] and not merged[0][4] and policy._graphed[0] == adapted[0]


@pytest.mark.gpu
def test_policy_graphs_inside_merged_adapters_sample_as_the_adapted_policy_across_updates():
    # the rollout's setting: graphs captured inside merged_adapters, the adapters updated between two rollouts
    from srpo_rl.lora import add_lora, merged_adapters

    torch.manual_seed(0)
    model = OpenVLAOFT(tiny_config()).eval().cuda()
    adapters = add_lora(model, rank=4)
    policy = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.6,
                              jpeg_quality=None).to("cuda")
    eager = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.6,
                             jpeg_quality=None, cuda_graphs=False).to("cuda")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    graphs = []
    with torch.no_grad():
        for rollout in range(2):
            for b in adapters[1::2]:  # an update between the rollouts
                b.normal_(0.0, 0.05)
            obs = _camera_obs(3, rollout).to("cuda")
            reference = eager(obs.clone())  # the adapters beside the weights
            with merged_adapters(model):
                merged_out = policy(obs.clone())
                graphs.append(policy._graphed[1])
            assert torch.equal(merged_out["action_tokens"], reference["action_tokens"])  # greedy
            torch.testing.assert_close(merged_out["action_log_prob"], reference["action_log_prob"],
                                       rtol=1e-4, atol=1e-4)
    assert graphs[0] is graphs[1] and all(g is not None for g in graphs[1].graphs.values())  # captured once
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)


def _camera_obs(batch: int, seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    td = TensorDict({("observation", "image"): torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8,
                                                            generator=g)}, [batch])
    td.set_non_tensor("instruction", ["open the drawer", "put the bowl on the plate", "pick up the soup"][:batch])
    return td


@pytest.mark.gpu
def test_policy_graph_takes_the_frames_and_matches_the_eager_policy(model):
    # the resize, crop and normalisation run inside the graph: the same policy_image byte for byte, the same
    # logits up to the rounding of a replay, as the eager policy (preprocess, then the model's forward)
    policy = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.6,
                              jpeg_quality=None).to("cuda")
    eager = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), temperature=1.6,
                             jpeg_quality=None, cuda_graphs=False).to("cuda")
    with torch.no_grad():
        for batch, seed in ((3, 0), (2, 1), (3, 2)):
            obs = _camera_obs(batch, seed).to("cuda")
            graphed_out, eager_out = policy(obs.clone()), eager(obs.clone())
            assert torch.equal(graphed_out["policy_image"], eager_out["policy_image"])
            assert torch.equal(graphed_out["prompt_ids"], eager_out["prompt_ids"])
            assert torch.equal(graphed_out["action_tokens"], eager_out["action_tokens"])  # greedy
            torch.testing.assert_close(graphed_out["action_log_prob"], eager_out["action_log_prob"],
                                       rtol=1e-4, atol=1e-4)
            # what training recomputes from the stored inputs (eager, no graph) is what the rollout stored
            torch.testing.assert_close(policy.log_prob(graphed_out), graphed_out["action_log_prob"],
                                       rtol=1e-4, atol=1e-4)
    graphed = policy._graphed[1]
    assert {k[2:] for k in graphed.graphs} == {((3, 256, 256), torch.uint8)}  # frames in, not pixel values
    assert all(g is not None for g in graphed.graphs.values())
    policy.center_crop = False  # captured with the forward: a change captures again
    with torch.no_grad():
        obs = _camera_obs(2, 3).to("cuda")
        out = policy(obs.clone())
        eager.center_crop = False
        assert torch.equal(out["policy_image"], eager(obs.clone())["policy_image"])
    assert policy._graphed[1] is not graphed
    model.to("cpu")
