import math
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from srpo_rl.models.vjepa2 import (
    VideoEmbedder,
    load_vjepa2,
    sample_frame_indices,
    vjepa2_config_from_state_dict,
    write_tiny_vjepa2_checkpoint,
)

IMG = 48  # 3x3 patch grid: non-trivial row / column RoPE positions
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vjepa2")
    write_tiny_vjepa2_checkpoint(d / "tiny.pt", layout="original", seed=3)
    write_tiny_vjepa2_checkpoint(d / "hf", layout="hf", seed=3, img_size=IMG)
    return d


@pytest.fixture(scope="module")
def original_sd(ckpt_dir):
    raw = torch.load(ckpt_dir / "tiny.pt", weights_only=True)["encoder"]
    return {k.removeprefix("module.backbone."): v.double() for k, v in raw.items()}


@pytest.fixture(scope="module")
def embedder(ckpt_dir):
    return VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, enable_fp16=False, device="cpu", batch_size=2)


# ---------------------------------------------------------------- plain reference forward of the original ViT
def _layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rope(x, pos):
    """x [..., N, 20], pos [N]: tiled sin/cos (f0..f9, f0..f9), adjacent-pair rotation."""
    omega = 10000.0 ** (-torch.arange(10, dtype=x.dtype) / 10)
    freq = pos.to(x.dtype)[:, None] * omega  # [N, 10]
    idx = torch.arange(20) % 10  # tiled layout
    cos, sin = torch.cos(freq[:, idx]), torch.sin(freq[:, idx])
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos[:, 0::2] - x[..., 1::2] * sin[:, 0::2]
    out[..., 1::2] = x[..., 1::2] * cos[:, 1::2] + x[..., 0::2] * sin[:, 1::2]
    return out


def reference_tokens(sd, video):
    """video [B, 3, T, H, W] -> tokens [B, N, D] of the original encoder (float64)."""
    w = sd["patch_embed.proj.weight"]
    dim, tub, patch = w.shape[0], w.shape[2], w.shape[3]
    x = torch.nn.functional.conv3d(video, w, sd["patch_embed.proj.bias"], stride=(tub, patch, patch))
    _, _, gt, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # token n = t*gh*gw + h*gw + w
    n = torch.arange(x.shape[1])
    frame, row, col = n // (gh * gw), (n % (gh * gw)) // gw, n % gw
    heads = dim // 64
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        h = _layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = (t.unflatten(-1, (heads, 64)).transpose(1, 2) for t in qkv.split(dim, dim=-1))
        q = torch.cat([_rope(q[..., :20], frame), _rope(q[..., 20:40], row), _rope(q[..., 40:60], col), q[..., 60:]], -1)
        k = torch.cat([_rope(k[..., :20], frame), _rope(k[..., 20:40], row), _rope(k[..., 40:60], col), k[..., 60:]], -1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
        o = (attn @ v).transpose(1, 2).flatten(2)
        x = x + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = _layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    return _layer_norm(x, sd["norm.weight"], sd["norm.bias"])


# ---------------------------------------------------------------- plain reference preprocessing (numpy)
def _np_bilinear(img, oh, ow):
    def coords(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, ly = coords(img.shape[1], oh)
    x0, x1, lx = coords(img.shape[2], ow)
    top = img[:, y0][:, :, x0] * (1 - lx) + img[:, y0][:, :, x1] * lx
    bot = img[:, y1][:, :, x0] * (1 - lx) + img[:, y1][:, :, x1] * lx
    return top * (1 - ly[:, None]) + bot * ly[:, None]


def reference_preprocess(frames, img_size=IMG, num_frames=64):
    """uint8 [T, 3, h, w] (upscaled) -> [num_frames, 3, S, S] float64, as the reference transform: the short side
    resized to 256 / 224 x S (torchvision's Resize(int): the long side in proportion, truncated), the centre cropped."""
    t, h, w = frames.shape[0], frames.shape[2], frames.shape[3]
    idx = np.linspace(0, t - 1, num_frames, dtype=int) if t >= num_frames else np.resize(np.arange(t), num_frames)
    short = int(256.0 / 224 * img_size)
    oh, ow = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    top, left = int(round((oh - img_size) / 2.0)), int(round((ow - img_size) / 2.0))
    out = []
    for i in idx:
        f = np.round(_np_bilinear(frames[i].numpy().astype(np.float64), oh, ow))
        f = f[:, top : top + img_size, left : left + img_size] / 255.0
        out.append((f - MEAN[:, None, None]) / STD[:, None, None])
    return torch.from_numpy(np.stack(out))


# ---------------------------------------------------------------- tests
def test_sample_frame_indices():
    assert sample_frame_indices(64).tolist() == list(range(64))
    assert sample_frame_indices(127).tolist() == [2 * i for i in range(64)]
    assert sample_frame_indices(100, 4).tolist() == [0, 33, 66, 99]
    assert sample_frame_indices(3, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert sample_frame_indices(1).tolist() == [0] * 64


@pytest.mark.parametrize("hidden, mlp, heads", [(1024, 4096, 16), (1280, 5120, 16), (1408, 6144, 22), (128, 192, 2)])
def test_head_count_of_the_released_encoders(hidden, mlp, heads):
    # the upstream builders: vit_large 1024 / 16 heads, vit_huge 1280 / 16 (80-dim heads), vit_giant_xformers
    # 1408 / 22; a width of no released encoder: heads of 64 dims
    shapes = {"patch_embed.proj.weight": (hidden, 3, 2, 16, 16), "blocks.0.mlp.fc1.weight": (mlp, hidden)}
    sd = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}  # shapes only, no memory
    config = vjepa2_config_from_state_dict(sd)
    assert config.num_attention_heads == heads and hidden % heads == 0
    assert vjepa2_config_from_state_dict(sd, num_heads=8).num_attention_heads == 8


def test_original_layout_matches_reference_forward(ckpt_dir, original_sd):
    model = load_vjepa2(ckpt_dir / "tiny.pt", img_size=IMG, num_frames=8)
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_hidden_layers) == (128, 2, 2)
    assert model.config.patch_size == 16 and model.config.tubelet_size == 2 and model.config.mlp_ratio == 1.5
    pixels = torch.randn(2, 8, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))  # [B, T, C, H, W]
    with torch.no_grad():
        tokens = model.encoder(pixel_values_videos=pixels).last_hidden_state
    expected = reference_tokens(original_sd, pixels.double().permute(0, 2, 1, 3, 4))
    assert tokens.shape == (2, 4 * 9, 128)
    torch.testing.assert_close(tokens.double(), expected, atol=2e-5, rtol=1e-5)

    emb = VideoEmbedder(model, img_size=IMG, num_frames=8, enable_fp16=False, device="cpu").encode(pixels)
    torch.testing.assert_close(emb.double(), expected.mean(1), atol=2e-5, rtol=1e-5)


def test_preprocess_matches_reference_transform(embedder):
    frames = torch.randint(0, 256, (70, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = embedder.preprocess(frames).double()
    expected = reference_preprocess(frames)
    assert got.shape == (64, 3, IMG, IMG)
    # float32 vs float64 resampling may round a rare pixel the other way: at most one uint8 step
    diff = (got - expected).abs()
    assert diff.max() <= 1 / (255 * 0.224) + 1e-5
    assert (diff > 1e-4).float().mean() < 0.01


@pytest.mark.parametrize("shape", [(40, 60), (60, 44)])
def test_preprocess_of_non_square_frames_crops_the_centre_of_the_resized_frame(embedder, shape):
    frames = torch.randint(0, 256, (9, 3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    got = embedder.preprocess(frames).double()
    expected = reference_preprocess(frames)
    assert got.shape == expected.shape == (64, 3, IMG, IMG)
    diff = (got - expected).abs()
    assert diff.max() <= 1 / (255 * 0.224) + 1e-5 and (diff > 1e-4).float().mean() < 0.01


def test_embedding_matches_reference_end_to_end(embedder, original_sd):
    gen = torch.Generator().manual_seed(2)
    videos = [
        torch.randint(0, 256, (t, 3, 40, 40), dtype=torch.uint8, generator=gen) for t in (90, 1, 17)
    ]  # longer than 64, a single frame, shorter than 64
    emb = embedder(videos)
    # reference_preprocess gives [T, C, H, W]; the original encoder takes [B, C, T, H, W]
    ref = torch.stack([reference_tokens(original_sd, reference_preprocess(v).permute(1, 0, 2, 3)[None])[0].mean(0)
                       for v in videos])
    torch.testing.assert_close(emb.double(), ref, atol=1e-3, rtol=1e-3)


def test_empty_video_gives_zero_embedding_and_batching_is_transparent(ckpt_dir, embedder):
    gen = torch.Generator().manual_seed(4)
    videos = [torch.randint(0, 256, (t, 3, 40, 40), dtype=torch.uint8, generator=gen) for t in (5, 0, 80, 12, 0)]
    emb = embedder(videos)  # batch_size=2
    assert emb.dtype == torch.float32 and emb.shape == (5, 128)
    assert emb[1].eq(0).all() and emb[4].eq(0).all()
    assert not emb[[0, 2, 3]].eq(0).all(-1).any()
    one_by_one = torch.cat([embedder([v]) for v in videos])
    torch.testing.assert_close(emb, one_by_one, atol=1e-5, rtol=1e-5)
    offloaded = VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, enable_fp16=False, offload=True, device="cpu")
    torch.testing.assert_close(offloaded(videos), emb, atol=1e-5, rtol=1e-5)
    assert next(offloaded.encoder.parameters()).device.type == "cpu"
    assert embedder([]).shape == (0, 128)


def test_a_progress_bar_counts_the_videos_of_main_thread_calls_only(ckpt_dir, embedder, capsys):
    videos = [torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)] * 5
    shown = VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, enable_fp16=False, device="cpu", batch_size=2,
                          progress="reward")
    capsys.readouterr()
    torch.testing.assert_close(shown(videos), embedder(videos))
    bar = capsys.readouterr().err
    assert "reward:" in bar and "/5 " in bar, bar
    assert "embed" not in bar  # the embedder without progress showed none
    # the reward's background embedder calls it from its own thread, beside the rollout's bar: no bar there
    thread = threading.Thread(target=shown, args=(videos,))
    thread.start()
    thread.join()
    assert capsys.readouterr().err == ""


def test_hf_layout_gives_same_embeddings(ckpt_dir, embedder):
    hf = VideoEmbedder(ckpt_dir / "hf", img_size=IMG, enable_fp16=False, device="cpu")
    video = [torch.randint(0, 256, (30, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))]
    torch.testing.assert_close(hf(video), embedder(video), atol=1e-6, rtol=1e-6)


def test_key_mismatches_are_listed(ckpt_dir, tmp_path):
    ckpt = torch.load(ckpt_dir / "tiny.pt", weights_only=True)
    del ckpt["encoder"]["module.backbone.blocks.1.mlp.fc2.bias"]
    ckpt["encoder"]["module.backbone.blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.mlp\.fc2\.bias[\s\S]*encoder\.layer\.0\.attention\.extra"):
        load_vjepa2(tmp_path / "bad.pt", img_size=IMG)
    with pytest.raises(KeyError, match="target_encoder"):
        load_vjepa2(ckpt_dir / "tiny.pt", checkpoint_key="target_encoder")

    hf = tmp_path / "hf_bad"
    load_vjepa2(ckpt_dir / "hf", img_size=IMG).save_pretrained(hf)
    weights = load_file(hf / "model.safetensors")
    del weights["encoder.layer.0.mlp.fc1.weight"]
    weights["encoder.layer.0.mlp.junk"] = torch.zeros(1)
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.mlp\.fc1\.weight[\s\S]*encoder\.layer\.0\.mlp\.junk"):
        load_vjepa2(hf, img_size=IMG)


def test_embedder_sets_the_rope_grid_to_img_size(ckpt_dir, embedder):
    # loaded for 64-px inputs, fed 48-px frames: the RoPE grid must follow the frames fed
    model = load_vjepa2(ckpt_dir / "tiny.pt", img_size=64)
    resized = VideoEmbedder(model, img_size=IMG, enable_fp16=False, device="cpu")
    assert model.config.crop_size == IMG
    video = [torch.randint(0, 256, (30, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))]
    torch.testing.assert_close(resized(video), embedder(video), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of the encoder's patch size 16"):
        VideoEmbedder(model, img_size=50, device="cpu")


def test_compiled_layers_give_the_eager_embeddings_with_one_compilation(ckpt_dir, embedder):
    from torch._dynamo.utils import counters

    compiled = VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, enable_fp16=False, device="cpu", batch_size=2)
    compiled.compile_layers()
    gen = torch.Generator().manual_seed(8)
    videos = [torch.randint(0, 256, (t, 3, 40, 40), dtype=torch.uint8, generator=gen) for t in (30, 70, 9)]
    counters.clear()
    torch.testing.assert_close(compiled(videos), embedder(videos), atol=1e-5, rtol=1e-5)
    # the layers share one graph: every layer of the first batch of 2 runs it; the last batch, of one video,
    # is a new batch size and one more graph; none is made per layer
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    assert all(hasattr(layer.forward.args[0], "_torchdynamo_orig_callable") for layer in compiled.encoder.encoder.layer)
    assert compiled.encoder.state_dict().keys() == embedder.encoder.state_dict().keys()


@pytest.mark.gpu
def test_fp16_and_offload_on_gpu(ckpt_dir):
    gen = torch.Generator().manual_seed(6)
    videos = [torch.randint(0, 256, (t, 3, 256, 256), dtype=torch.uint8, generator=gen) for t in (100, 9)]
    fp32 = VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, enable_fp16=False, device="cuda")
    fp16 = VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, enable_fp16=True, offload=True, device="cuda")
    torch.testing.assert_close(fp16(videos), fp32(videos), atol=2e-2, rtol=2e-2)
    assert next(fp16.encoder.parameters()).device.type == "cpu"


@pytest.mark.gpu
def test_compiled_layers_under_fp16_on_gpu(ckpt_dir):
    gen = torch.Generator().manual_seed(9)
    videos = [torch.randint(0, 256, (t, 3, 256, 256), dtype=torch.uint8, generator=gen) for t in (100, 9, 64)]
    eager = VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, device="cuda", batch_size=2)
    compiled = VideoEmbedder(ckpt_dir / "tiny.pt", img_size=IMG, device="cuda", batch_size=2)
    compiled.compile_layers()
    torch.testing.assert_close(compiled(videos), eager(videos), atol=2e-2, rtol=2e-2)
