"""OpenVLA-OFT model: published file format, bit-exact round trips, logits against a plain reference forward."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from srpo_rl.models.llama_tokenizer import build_tiny_llama_tokenizer, load_llama_tokenizer
from srpo_rl.models.openvla_oft import (
    OpenVLAOFT,
    OpenVLAOFTConfig,
    tiny_config,
    write_random_checkpoint,
    write_tiny_checkpoint,
)
from srpo_rl.models.openvla_oft_files import StateDictMismatchError

PUBLISHED_CONFIG_KEYS = {
    "arch_specifier",
    "architectures",
    "auto_map",
    "hf_llm_id",
    "image_resize_strategy",
    "image_sizes",
    "llm_backbone_id",
    "llm_max_length",
    "model_type",
    "n_action_bins",
    "norm_stats",
    "output_projector_states",
    "pad_to_multiple_of",
    "pad_token_id",
    "text_config",
    "timm_model_ids",
    "timm_override_act_layers",
    "torch_dtype",
    "transformers_version",
    "use_fused_vision_backbone",
    "vision_backbone_id",
}
LIBERO_DATASETS = {f"libero_{s}_no_noops" for s in ("spatial", "object", "goal", "10", "90")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two shared cores: a second intra-op thread only adds contention for these tiny tensors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_openvla_oft")
    writer = write_tiny_checkpoint(path, seed=3)
    return path, writer


@pytest.fixture(scope="module")
def model32(ckpt):
    return OpenVLAOFT.from_pretrained(ckpt[0], dtype=torch.float32)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    # two prompts of different lengths: the shorter one is right-padded with <PAD> (32000)
    ids = torch.tensor([[1, 259, 261, 300, 262, 263, 29871], [1, 270, 281, 29871, 32000, 32000, 32000]])
    return ids, ids != 32000, torch.randn(2, 6, 224, 224, generator=g)


def test_checkpoint_is_in_the_published_format(ckpt):
    path, writer = ckpt
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "dataset_statistics.json",
            "preprocessor_config.json",
            "processor_config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
        ]
    )
    config = json.loads((path / "config.json").read_text())
    assert set(config) == PUBLISHED_CONFIG_KEYS
    assert config["model_type"] == "openvla" and config["torch_dtype"] == "bfloat16"
    assert config["timm_model_ids"] == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert config["text_config"]["vocab_size"] == 32064 and config["pad_token_id"] == 32000
    assert not any("dim" in k or "depth" in k for k in config)  # tower sizes only live in the tensor shapes

    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(path / shard))
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # timm / HF-port names, e.g. LayerScale stored as scale_factor, fused qkv, SigLIP's attention pool
    for key, shape in {
        "vision_backbone.featurizer.reg_token": [1, 4, 64],
        "vision_backbone.featurizer.pos_embed": [1, 256, 64],
        "vision_backbone.featurizer.blocks.0.ls1.scale_factor": [64],
        "vision_backbone.featurizer.blocks.2.attn.qkv.weight": [192, 64],
        "vision_backbone.fused_featurizer.attn_pool.kv.weight": [192, 96],
        "projector.fc1.weight": [640, 160],
        "language_model.model.embed_tokens.weight": [32064, 64],
        "language_model.lm_head.weight": [32064, 64],
    }.items():
        assert list(tensors[key].shape) == shape, key
    # tensor counts follow the 7B layout per block: 5 + 14/block + 2 (DINOv2), 3 + 12/block + 2 + 13 (SigLIP)
    count = lambda p: sum(k.startswith(p) for k in tensors)  # noqa: E731
    assert (count("vision_backbone.featurizer."), count("vision_backbone.fused_featurizer.")) == (
        5 + 14 * 3 + 2,
        3 + 12 * 3 + 15,
    )
    assert (count("projector."), count("language_model.")) == (6, 1 + 9 * 2 + 2)

    stats = json.loads((path / "dataset_statistics.json").read_text())
    assert set(stats) == LIBERO_DATASETS
    for entry in stats.values():
        action = entry["action"]
        assert action["mask"] == [True] * 6 + [False]
        assert all(lo < hi for lo, hi in zip(action["q01"], action["q99"], strict=False))
        assert all(len(action[k]) == 7 for k in ("mean", "std", "min", "max", "q01", "q99"))
        assert len(entry["proprio"]["q99"]) == 8 and "mask" not in entry["proprio"]
    processor = json.loads((path / "preprocessor_config.json").read_text())
    assert processor["tvf_normalize_params"][0]["mean"] == [0.484375, 0.455078125, 0.40625]
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer" and tokenizer_config["pad_token"] == "<PAD>"


def test_seven_b_layout_matches_the_published_tensor_counts():
    with torch.device("meta"):
        model = OpenVLAOFT(OpenVLAOFTConfig())
    state = model.state_dict()
    assert len(state) == 982
    assert sum(t.numel() for t in state.values()) == 7_541_237_184
    assert list(state["projector.fc1.weight"].shape) == [8704, 2176]
    assert list(state["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"].shape) == [4304, 1152]
    assert model.config.action_token_begin == 31744
    assert model.language_model.config.rms_norm_eps == 1e-6
    assert len(model.fsdp_blocks()) == 23 + 26 + 32


def test_random_checkpoint_of_another_size_loads_back_bit_for_bit(tmp_path):
    # the writer the full-size GPU runs use (write_random_checkpoint(path) = the 7B), at a CPU size
    config = tiny_config(hidden_size=96, num_layers=3, vision_widths=(32, 48), vision_depth=2)
    writer = write_random_checkpoint(tmp_path, config, seed=5, dtype=torch.float32)
    loaded = OpenVLAOFT.from_pretrained(tmp_path)
    assert loaded.config.text_config["hidden_size"] == 96 and loaded.language_model.config.num_hidden_layers == 3
    state = writer.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert len(list(tmp_path.glob("model-0000*-of-00002.safetensors"))) == 2  # the sharded layout
    # weights scaled for O(1) activations: std 1/sqrt(fan_in) for matrices, norms near 1
    weight = state["language_model.model.layers.0.mlp.down_proj.weight"]
    assert abs(weight.std().item() * math.sqrt(weight.shape[1]) - 1) < 0.05
    assert abs(state["language_model.model.norm.weight"].mean().item() - 1) < 0.05


def test_load_reproduces_the_writer_bit_for_bit(ckpt):
    path, writer = ckpt
    loaded = OpenVLAOFT.from_pretrained(path)  # stored dtype (bf16)
    for key, value in writer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, pixels), writer(ids, mask, pixels))


def test_save_load_save_gives_identical_files(ckpt, tmp_path):
    path, _ = ckpt
    loaded = OpenVLAOFT.from_pretrained(path)
    total = sum(p.numel() * p.element_size() for p in loaded.parameters())
    loaded.save_pretrained(tmp_path / "a", max_shard_size=int(0.6 * total))  # the writer's shard size
    for file in path.iterdir():
        assert (tmp_path / "a" / file.name).read_bytes() == file.read_bytes(), file.name
    OpenVLAOFT.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b", max_shard_size=int(0.6 * total))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in path.iterdir())


# --- an independent forward: explicit math, one sample at a time, a loop over query positions ----------------


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _reference_tower(w, prefix, image, depth, heads, prefix_tokens):
    p = lambda name: w[prefix + name]  # noqa: E731
    patch = p("patch_embed.proj.weight")
    k = patch.shape[-1]
    # patchify by hand: 16 x 16 patches of 3 x 14 x 14, row-major, dotted with the conv kernel
    cols = image.unfold(1, k, k).unfold(2, k, k).permute(1, 2, 0, 3, 4).reshape(-1, 3 * k * k)
    x = cols @ patch.reshape(patch.shape[0], -1).T + p("patch_embed.proj.bias") + p("pos_embed")[0]
    prefix_rows = [w[prefix + t][0] for t in prefix_tokens]  # [cls, 4 registers] for DINOv2, none for SigLIP
    x = torch.cat(prefix_rows + [x])
    d = x.shape[-1]
    hd = d // heads
    for i in range(depth - 1):  # features of the second-to-last block
        b = f"blocks.{i}."
        h = _layer_norm(x, p(b + "norm1.weight"), p(b + "norm1.bias"))
        qkv = h @ p(b + "attn.qkv.weight").T + p(b + "attn.qkv.bias")
        q, kk, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        out = torch.cat(
            [
                torch.softmax(q[:, s : s + hd] @ kk[:, s : s + hd].T / math.sqrt(hd), -1) @ v[:, s : s + hd]
                for s in range(0, d, hd)
            ],
            -1,
        )
        a = out @ p(b + "attn.proj.weight").T + p(b + "attn.proj.bias")
        x = x + (a * p(b + "ls1.scale_factor") if prefix + b + "ls1.scale_factor" in w else a)
        h = _layer_norm(x, p(b + "norm2.weight"), p(b + "norm2.bias"))
        m = _gelu(h @ p(b + "mlp.fc1.weight").T + p(b + "mlp.fc1.bias")) @ p(b + "mlp.fc2.weight").T + p(
            b + "mlp.fc2.bias"
        )
        x = x + (m * p(b + "ls2.scale_factor") if prefix + b + "ls2.scale_factor" in w else m)
    return x[sum(len(r) for r in prefix_rows) :]


def _rms(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight


def _rope(x, position, theta=10000.0):
    half = x.shape[-1] // 2
    freq = position / theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = torch.cos(freq).float(), torch.sin(freq).float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _reference_logits(w, ids, pixels, attention, heads=4, layers=2, vocab=32064):
    """Logits [56, 256] for one unpadded prompt ``ids`` (a list starting with <s>)."""
    vision = torch.cat(
        [
            _reference_tower(w, "vision_backbone.featurizer.", pixels[:3], 3, 16, ["cls_token", "reg_token"]),
            _reference_tower(w, "vision_backbone.fused_featurizer.", pixels[3:], 3, 16, []),
        ],
        -1,
    )
    p = _gelu(vision @ w["projector.fc1.weight"].T + w["projector.fc1.bias"])
    p = _gelu(p @ w["projector.fc2.weight"].T + w["projector.fc2.bias"])
    patches = p @ w["projector.fc3.weight"].T + w["projector.fc3.bias"]
    embed = w["language_model.model.embed_tokens.weight"]
    seq = (
        [embed[ids[0]]] + list(patches) + [embed[t] for t in ids[1:]] + [torch.zeros(embed.shape[1])] * 56 + [embed[2]]
    )
    x = torch.stack(seq)
    n, d = x.shape
    hd = d // heads
    for layer in range(layers):
        pre = f"language_model.model.layers.{layer}."
        h = _rms(x, w[pre + "input_layernorm.weight"])
        q, k, v = ((h @ w[pre + f"self_attn.{name}_proj.weight"].T).view(n, heads, hd) for name in "qkv")
        q = torch.stack([_rope(q[i], float(i)) for i in range(n)])  # RoPE at each token's position
        k = torch.stack([_rope(k[j], float(j)) for j in range(n)])
        out = torch.zeros_like(x)
        for i in range(n):  # one query position at a time, over the keys it may see
            keys = n if attention == "bidirectional" else i + 1
            scores = torch.einsum("hc,jhc->hj", q[i], k[:keys]) / math.sqrt(hd)
            out[i] = torch.einsum("hj,jhc->hc", torch.softmax(scores, -1), v[:keys]).reshape(d)
        x = x + out @ w[pre + "self_attn.o_proj.weight"].T
        h = _rms(x, w[pre + "post_attention_layernorm.weight"])
        gate = h @ w[pre + "mlp.gate_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ w[pre + "mlp.up_proj.weight"].T)) @ w[pre + "mlp.down_proj.weight"].T
    x = _rms(x, w["language_model.model.norm.weight"])
    before = [256 + len(ids) - 1 + s for s in range(56)]  # the position before each action slot
    return x[before] @ w["language_model.lm_head.weight"][vocab - 64 - 256 : vocab - 64].T


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_logits_match_a_plain_reference_forward(ckpt, attention):
    path, _ = ckpt
    model = OpenVLAOFT.from_pretrained(path, dtype=torch.float32, attention=attention)
    weights = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(shard).items()})
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        logits = model.action_logits(ids, mask, pixels)
    assert logits.shape == (2, 56, 256) and logits.dtype == torch.float32
    for b in range(2):
        expected = _reference_logits(weights, ids[b][mask[b]].tolist(), pixels[b], attention)
        torch.testing.assert_close(logits[b], expected, atol=2e-4, rtol=1e-4)


def test_attention_options_change_the_logits(model32):
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        bidirectional = model32(ids, mask, pixels)
        model32.attention = "causal"
        try:
            causal = model32(ids, mask, pixels)
        finally:  # the module's model is shared with the tests after this one
            model32.attention = "bidirectional"
    assert (bidirectional - causal).abs().max() > 1e-2


def test_padding_and_batch_composition_do_not_change_a_row(model32):
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        both = model32(ids, mask, pixels)
        alone = model32(ids[1:, :4], mask[1:, :4], pixels[1:])
        extra_pads = model32(
            torch.nn.functional.pad(ids, (0, 5), value=32000), torch.nn.functional.pad(mask, (0, 5)), pixels
        )
    torch.testing.assert_close(alone[0], both[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extra_pads, both, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(ckpt):
    model = OpenVLAOFT.from_pretrained(ckpt[0], dtype=torch.float32).train()
    ids, mask, pixels = _inputs()

    def grads():
        model.zero_grad()
        model(ids, mask, pixels).logsumexp(-1).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and "vision_backbone.featurizer.blocks.0.attn.qkv.weight" in plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5)
    assert len(model.fsdp_blocks()) == 2 + 2 + 2


def test_compiled_blocks_recompile_past_dynamos_default_limit():
    # a block function past Dynamo's 8 graphs would run eagerly; the recipe's vision blocks reach 8 already
    from torch._dynamo.testing import CompileCounter

    from srpo_rl.models.openvla_oft import _with_block_dynamo_config

    counter = CompileCounter()
    block = _with_block_dynamo_config(torch.compile(lambda x: x * 2 + 1, backend=counter, dynamic=True))
    for rank in range(1, 13):  # a new rank always needs a new graph
        assert torch.equal(block(torch.ones([2] * rank)), torch.full([2] * rank, 3.0))
    assert counter.frame_count == 12
    assert torch._dynamo.config.recompile_limit == 8  # the patch ends with each call


def test_compiled_blocks_give_the_eager_logits_and_gradients(ckpt):
    eager = OpenVLAOFT.from_pretrained(ckpt[0], dtype=torch.float32).train()
    compiled = OpenVLAOFT.from_pretrained(ckpt[0], dtype=torch.float32).train()
    compiled.compile_blocks()
    compiled.gradient_checkpointing_enable()  # the update's setting: the recompute runs the compiled blocks too
    ids, mask, pixels = _inputs()
    counters.clear()

    def logits_and_grads(model):
        model.zero_grad()
        logits = model(ids, mask, pixels)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    want_logits, want = logits_and_grads(eager)
    got_logits, got = logits_and_grads(compiled)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-3)
    # the blocks' forwards are compiled in place: same parameters and names, so checkpoints are unchanged
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in compiled.fsdp_blocks())
    # each block is one graph even under checkpointing (transformers' hub-kernel norms broke it there before)
    assert counters["frames"]["ok"] > 0 and not counters["graph_break"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_blocks"])
def test_fsdp2_sharded_model_runs_and_saves_the_full_checkpoint(ckpt, tmp_path, compiled):
    dist = torch.distributed
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = OpenVLAOFT.from_pretrained(ckpt[0], dtype=torch.float32)
        ids, mask, pixels = _inputs()
        expected = model(ids, mask, pixels).detach()
        if compiled:  # as the recipe does with model.compile_blocks=true: compiled first, then sharded
            model.compile_blocks()
        for block in model.fsdp_blocks():
            fully_shard(block)
        fully_shard(model)
        model.gradient_checkpointing_enable()
        logits = model(ids, mask, pixels)
        torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)
        logits.logsumexp(-1).sum().backward()
        assert all(isinstance(p, DTensor) for p in model.parameters())
        total = sum(p.numel() * 2 for p in model.parameters())
        model.save_pretrained(tmp_path / "saved", max_shard_size=int(0.6 * total))  # gathered; fp32 -> stored bf16
        for file in ckpt[0].iterdir():
            assert (tmp_path / "saved" / file.name).read_bytes() == file.read_bytes(), file.name
    finally:
        dist.destroy_process_group()


# --- errors ------------------------------------------------------------------------------------------------


def _copy(ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt[0], path)
    return path


def _edit_shard(path, edit):
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = path / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {
        k: shard.name for k in tensors
    }
    index_file.write_text(json.dumps(index))


def test_missing_files_are_listed(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    (path / "model-00001-of-00002.safetensors").unlink()
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: config.json, model-00001-of-00002.safetensors"):
        OpenVLAOFT.from_pretrained(path)


def test_unexpected_missing_and_misshapen_keys_are_listed(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)

    def edit(tensors):
        tensors["language_model.lm_head.bias"] = torch.zeros(32064, dtype=torch.bfloat16)
        del tensors["language_model.lm_head.weight"]

    _edit_shard(path, edit)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError) as info:
        OpenVLAOFT.from_pretrained(path)
    message = str(info.value)
    assert "missing keys (1): language_model.lm_head.weight" in message
    assert "unexpected keys (1): language_model.lm_head.bias" in message
    assert (
        "shape mismatches (6)" in message and "mlp.gate_proj.weight: checkpoint [128, 64] vs model [100, 64]" in message
    )


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "llava"}, "config.json has model_type 'llava'; expected 'openvla'"),
    ({"use_fused_vision_backbone": False}, "not an OpenVLA-OFT of the fused DINOv2 \\+ SigLIP backbone .* got "
                                          "use_fused_vision_backbone=False, arch_specifier='no-align\\+fused-gelu-mlp'"),
    ({"arch_specifier": "no-align+gelu-mlp"}, "arch_specifier='no-align\\+gelu-mlp'"),
    ({"use_proprio": True}, "use_proprio=true .* reads the discrete-token checkpoints SRPO starts from"),
    ({"text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}},
     "text_config.rope_scaling=\\{'type': 'linear', 'factor': 2.0\\}; OpenVLA's Llama-2 backbone has none"),
])
def test_configs_of_other_models_are_named(ckpt, tmp_path, edit, message):
    # other OpenVLA variants (a single vision tower, the continuous-action OFT with its proprio token, a scaled
    # rotary embedding) load into no module here: refused with what was read, before any weight is
    path = _copy(ckpt, tmp_path)
    config = json.loads((path / "config.json").read_text())
    for key, value in edit.items():
        config[key] = config[key] | value if isinstance(value, dict) else value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        OpenVLAOFT.from_pretrained(path)


def test_bad_arguments_and_inputs_are_rejected(model32):
    with pytest.raises(ValueError, match="unknown attention 'full'; choose one of bidirectional, causal"):
        OpenVLAOFT(OpenVLAOFTConfig(), attention="full")
    ids, mask, pixels = _inputs()
    with pytest.raises(ValueError, match="right padding"):
        model32(ids, mask.flip(1), pixels)
    with pytest.raises(ValueError, match="6 channels per image"):
        model32(ids, mask, pixels[:, :3])


def test_tiny_tokenizer_has_the_llama2_ids(ckpt):
    tok = load_llama_tokenizer(ckpt[0])
    enc = tok.encode("In: What action should the robot take to open the drawer?\nOut:")
    assert enc.ids[0] == 1 and 13 in enc.ids  # <s> first, "\n" as byte piece <0x0A>
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>", "\u2581", "<PAD>")] == [
        0,
        1,
        2,
        3,
        29871,
        32000,
    ]
    assert tok.decode(enc.ids) == "In: What action should the robot take to open the drawer?\nOut:"
    assert build_tiny_llama_tokenizer().get_vocab_size() == 32001
