"""LoRA adapters: the adapted model starts as the checkpoint, only the adapters train, the merged weights are
``W + alpha / rank * B @ A`` (computed here independently), the published format written from an adapted model
loads without LoRA, inference inside ``merged_adapters`` runs the plain model on those weights and leaves the base
weights bit for bit as they were, and the tiny recipe trains, checkpoints and resumes with adapters. The adapted
layer's custom ops give the formula's values and gradients eager, compiled and under FSDP2, and compiled they copy
nothing where a plain sum would."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from srpo_rl.checkpoint import CheckpointManager
from srpo_rl.lora import add_lora, adapters_active, lora_parameters, merge_lora_state, merged_adapters
from srpo_rl.models.openvla_oft import OpenVLAOFT, write_tiny_checkpoint

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_openvla_oft")
    write_tiny_checkpoint(path, seed=5)
    return path


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 259, 261, 300, 262, 263, 29871], [1, 270, 281, 29871, 32000, 32000, 32000]])
    return ids, ids != 32000, torch.randn(2, 6, 224, 224, generator=g)


def _adapted(ckpt, seed=0):
    model = OpenVLAOFT.from_pretrained(ckpt, dtype=torch.float32)
    adapters = add_lora(model, RANK, ALPHA)
    with torch.no_grad():  # a trained adapter: B away from its zero start
        g = torch.Generator().manual_seed(seed)
        for p in lora_parameters(model)[1::2]:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, adapters


def test_adapters_start_as_the_checkpoint_and_are_all_that_trains(ckpt):
    base = OpenVLAOFT.from_pretrained(ckpt, dtype=torch.float32)
    model = OpenVLAOFT.from_pretrained(ckpt, dtype=torch.float32)
    trainable_linears = [name for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and not name.endswith("lm_head")]
    adapters = add_lora(model, RANK, ALPHA)
    assert len(adapters) == 2 * len(trainable_linears) and adapters == lora_parameters(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{name}.{part}" for name in trainable_linears for part in ("lora_A", "lora_B")]
    assert all(p.dtype == torch.float32 for p in adapters)
    # PEFT's "gaussian" init, which OpenVLA's LoRA fine-tuning uses: A ~ N(0, 1 / rank^2), B = 0; scale alpha / rank
    a = torch.cat([p.detach().flatten() for p in adapters[0::2]])
    assert a.numel() > 10_000 and abs(a.std().item() * RANK - 1) < 0.05 and abs(a.mean().item()) * RANK < 0.05
    assert all(not b.any() for b in adapters[1::2])
    assert {m.lora_scaling.item() for m in model.modules() if hasattr(m, "lora_scaling")} == {ALPHA / RANK}
    ids, mask, pixels = _inputs()
    logits = model(ids, mask, pixels)
    torch.testing.assert_close(logits, base(ids, mask, pixels), atol=0, rtol=0)  # B = 0: exactly the checkpoint
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(b.grad.abs().sum() > 0 for b in adapters[1::2])  # dL/dB = (dL/dy)^T (x A^T): nonzero
    assert all(a.grad.abs().sum() == 0 for a in adapters[::2])  # dL/dA goes through B = 0


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "trainable_base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapted_layer_computes_x_wt_plus_b_plus_scaled_x_at_bt_and_its_gradients(dtype, train_base):
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(12, 10).to(dtype)
    (a, b) = add_lora(layer, rank=RANK, alpha=ALPHA, skip=())
    layer.requires_grad_(train_base)  # a base made trainable again gets its gradients too
    a.requires_grad_(), b.requires_grad_()
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=g))
    x = torch.randn(2, 5, 12, generator=g).to(dtype).requires_grad_()
    out = layer(x)
    out.square().sum().backward()
    # the same layer written out in fp32 from its definition
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    w32, bias32 = (layer.weight.detach().float().requires_grad_(), layer.bias.detach().float().requires_grad_())
    ref = x32 @ w32.T + bias32 + ALPHA / RANK * (x32 @ a_ref.T) @ b_ref.T
    ref.square().sum().backward()
    assert out.shape == (2, 5, 10) and out.dtype == dtype
    pairs = [(out.detach().float(), ref.detach()), (a.grad, a_ref.grad), (b.grad, b_ref.grad),
             (x.grad.float(), x32.grad)]
    if train_base:
        pairs += [(layer.weight.grad.float(), w32.grad), (layer.bias.grad.float(), bias32.grad)]
    else:
        assert layer.weight.grad is None and layer.bias.grad is None
    for got, want in pairs:
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # bf16 keeps 8 bits of mantissa: compare the error to the whole tensor's size
            assert (got - want).norm() / want.norm() < 0.02


def test_flop_counter_counts_the_adapted_layers_products_on_the_meta_device():
    # benchmarks/iteration_flops.py counts on the meta device: the custom ops need formulas, autocast has no state
    from torch.utils.flop_counter import FlopCounterMode

    n, k, out, r = 6, 12, 10, RANK
    with torch.device("meta"):
        layer = torch.nn.Linear(k, out)
        add_lora(layer, rank=r, alpha=ALPHA, skip=())
        x = torch.empty(2, 3, k, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    forward = 2 * n * k * out + 2 * n * k * r + 2 * n * r * out  # x W^T, x A^T, (x A^T) (s B)^T
    # dL/dx = g W + (g sB) A; dL/dA = (g sB)^T x; dL/d(sB) = g^T (x A^T)
    backward = 2 * n * out * k + (2 * n * out * r + 2 * n * r * k) + 2 * r * n * k + 2 * out * n * r
    assert counter.get_total_flops() == forward + backward


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "trainable_base"])
def test_adapted_fp32_layer_under_autocast_runs_in_its_dtype_as_a_plain_layer_does(train_base):
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(12, 10)
    plain = copy.deepcopy(layer)
    (a, b) = add_lora(layer, rank=RANK, alpha=ALPHA, skip=())
    layer.requires_grad_(train_base)
    a.requires_grad_(), b.requires_grad_()
    x = torch.randn(2, 5, 12, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zero_b = layer(x)  # B starts at zero: exactly the plain layer under autocast
        expected = plain(x)
    assert zero_b.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(zero_b, expected)
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = x @ layer.weight.detach().T + layer.bias.detach() + ALPHA / RANK * (x @ a_ref.T) @ b_ref.T
    ref.square().sum().backward()
    assert out.dtype == torch.bfloat16 and a.grad.dtype == b.grad.dtype == torch.float32
    for got, want in [(out.detach().float(), ref.detach()), (a.grad, a_ref.grad), (b.grad, b_ref.grad)]:
        assert (got - want).norm() / want.norm() < 0.02  # bf16 operands: 8 bits of mantissa
    assert (layer.weight.grad is not None) == train_base


def test_merged_weights_are_w_plus_scaled_b_a_and_give_the_adapted_logits(ckpt):
    model, _ = _adapted(ckpt)
    layer = model.language_model.model.layers[0].self_attn.q_proj
    expected = layer.weight.detach() + ALPHA / RANK * layer.lora_B.detach() @ layer.lora_A.detach()
    merged = merge_lora_state(model.state_dict())
    assert not any("lora_" in key for key in merged)
    assert list(merged) == [k for k in model.state_dict() if "lora_" not in k]  # the checkpoint's order kept
    torch.testing.assert_close(merged["language_model.model.layers.0.self_attn.q_proj.weight"], expected)
    plain = OpenVLAOFT.from_pretrained(ckpt, dtype=torch.float32)
    plain.load_state_dict(merged)
    ids, mask, pixels = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, mask, pixels), model(ids, mask, pixels), atol=1e-5, rtol=1e-5)


def test_published_checkpoint_of_an_adapted_model_loads_without_lora(ckpt, tmp_path):
    model, _ = _adapted(ckpt, seed=2)
    model.save_pretrained(tmp_path / "out", dtype=torch.float32)
    keys = {k for f in (tmp_path / "out").glob("*.safetensors") for k in load_file(f)}
    assert keys == {k for f in ckpt.glob("*.safetensors") for k in load_file(f)}  # the published names, no adapter
    loaded = OpenVLAOFT.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, mask, pixels = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pixels), model(ids, mask, pixels), atol=1e-5, rtol=1e-5)


def test_compiled_blocks_run_the_adapters_and_inside_merged_adapters_the_merged_weights(ckpt):
    model, _ = _adapted(ckpt, seed=3)
    ids, mask, pixels = _inputs(3)
    with torch.no_grad():
        eager = model(ids, mask, pixels)
        model.compile_blocks()
        torch.testing.assert_close(model(ids, mask, pixels), eager, atol=1e-4, rtol=1e-4)
        with merged_adapters(model):  # no graph compiled with the adapters may add them to the merged weights
            torch.testing.assert_close(model(ids, mask, pixels), eager, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(ids, mask, pixels), eager, atol=1e-4, rtol=1e-4)


def test_compiled_adapted_layer_sums_as_the_eager_one_forward_and_backward():
    # compiled, the adapter's custom ops are traced through their fake kernels: the same values and gradients
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(12, 10)
    a, b = add_lora(layer, rank=RANK, alpha=ALPHA, skip=())
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=g))
    x = torch.randn(3, 4, 12, generator=g)
    results = []
    for run in (layer, torch.compile(layer, dynamic=True)):
        x_in = x.clone().requires_grad_()
        out = run(x_in)
        out.square().sum().backward()
        results.append([out.detach(), x_in.grad, a.grad.clone(), b.grad.clone()])
        a.grad = b.grad = None
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


class _Attention(torch.nn.Module):
    """q, k and v projections feeding attention: where Inductor rewrites a plain adapter sum as a copying addmm."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, 32, bias=False) for _ in range(3))

    def forward(self, x):
        heads = [proj(x).view(2, 16, 4, 8).transpose(1, 2) for proj in (self.q, self.k, self.v)]
        return F.scaled_dot_product_attention(*heads).sum()


def _copies_inside_addmm(module) -> int:
    compiled = torch.compile(module, dynamic=True)
    x = torch.randn(2, 16, 32, requires_grad=True)
    compiled(x).backward()
    with torch.profiler.profile() as profile:
        compiled(x).backward()
    return sum(e.name == "aten::copy_" and e.cpu_parent is not None and e.cpu_parent.name == "aten::addmm"
               for e in profile.events())


def _plain_sum(layer, x):
    rows = x.reshape(-1, x.shape[-1])
    out = F.linear(rows, layer.weight) + F.linear(rows, layer.lora_A) @ (layer.lora_B * layer.lora_scaling).t()
    return out.view(*x.shape[:-1], -1)


def test_compiled_adapters_make_no_copy_where_a_plain_sum_makes_one():
    # Why the adapter runs through custom ops: compiled, ``base + down @ up.T`` becomes an out-of-place addmm that
    # first copies the base product into its result wherever the sum feeds a non-pointwise op (here, as in the 7B's
    # q, k and v: 343 copies, 3 % of its kernel time on an H100). Through the ops nothing is copied.
    plain = _Attention()
    add_lora(plain, RANK, ALPHA, skip=())
    for layer in (plain.q, plain.k, plain.v):
        layer.forward = functools.partial(_plain_sum, layer)
    adapted = _Attention()
    add_lora(adapted, RANK, ALPHA, skip=())
    torch._dynamo.reset()
    assert _copies_inside_addmm(plain) > 0
    assert _copies_inside_addmm(adapted) == 0


def _adapted_stack() -> torch.nn.Sequential:
    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    add_lora(stack, RANK, ALPHA, skip=())
    with torch.no_grad():
        for p in lora_parameters(stack)[1::2]:
            p.normal_(0, 0.1)
    return stack


def _rows(rank: int) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(rank))


def _sharded_adapter_grads(rank: int, world_size: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    stack = _adapted_stack()
    for module in (stack[0], stack[2], stack):
        fully_shard(module)
    stack(_rows(rank)).square().sum().backward()
    grads = [p.grad.full_tensor() for p in lora_parameters(stack)]
    if rank == 0:
        torch.save(grads, out)


def test_fsdp2_sharded_adapters_get_the_gradients_of_one_process(tmp_path):
    # FSDP2 hands the custom ops the gathered weights and reduces the adapters' gradients as any parameter's
    from conftest import spawn_gloo

    spawn_gloo(_sharded_adapter_grads, 2, str(tmp_path / "grads.pt"))
    single = _adapted_stack()
    (single(torch.cat([_rows(0), _rows(1)])).square().sum() / 2).backward()  # FSDP2 averages over the ranks
    for sharded, want in zip(torch.load(tmp_path / "grads.pt"), (p.grad for p in lora_parameters(single)),
                             strict=True):
        torch.testing.assert_close(sharded, want, atol=1e-5, rtol=1e-5)


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_inference_inside_merged_adapters_is_the_plain_model_on_the_merged_weights(ckpt, tmp_path):
    model, adapters = _adapted(ckpt, seed=4)
    optimizer = torch.optim.AdamW(adapters)
    plain = OpenVLAOFT.from_pretrained(ckpt, dtype=torch.float32)
    plain.load_state_dict(merge_lora_state(model.state_dict()))
    ids, mask, pixels = _inputs(4)
    base = _base_weights(model)
    with torch.no_grad():
        adapted = model(ids, mask, pixels)
        with merged_adapters(model):
            assert not any(adapters_active(m) for m in model.modules())
            merged = model(ids, mask, pixels)
            for name, weight in plain.state_dict().items():  # W + alpha / rank * B @ A, in place
                assert torch.equal(model.state_dict()[name], weight), name
            # saved now, the merged weights and their adapters would count the adapters twice
            with pytest.raises(RuntimeError, match="adapters are merged into its weights"):
                model.save_pretrained(tmp_path / "inside")
            with pytest.raises(RuntimeError, match="adapters are merged into its weights"):  # its state dict too
                model.save_pretrained(tmp_path / "inside", state_dict=model.state_dict())
            with pytest.raises(RuntimeError, match="adapters are merged into its weights"):
                CheckpointManager(tmp_path / "checkpoints").save(1, model=model, optimizer=optimizer, trainer_state={})
        after = model(ids, mask, pixels)
    torch.testing.assert_close(merged, plain(ids, mask, pixels), atol=0, rtol=0)  # the same ops on the same weights
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)  # bit for bit
    torch.testing.assert_close(after, adapted, atol=0, rtol=0)  # the adapters run beside the weights again
    assert sum(adapters_active(m) for m in model.modules()) == len(adapters) // 2
    model(ids, mask, pixels).logsumexp(-1).sum().backward()
    assert all(a.grad.abs().sum() > 0 for a in adapters)  # they train again
    model.save_pretrained(tmp_path / "after", dtype=torch.float32)  # after the block: W + scaling * B @ A
    reloaded = OpenVLAOFT.from_pretrained(tmp_path / "after", dtype=torch.float32)
    assert all(torch.equal(reloaded.state_dict()[n], w) for n, w in plain.state_dict().items())


def test_bf16_rollout_log_probs_from_merged_weights_differ_from_the_adapters_far_less_than_bf16_does(ckpt):
    # the rollout stores log-probs of the merged forward; the update recomputes them with the adapters beside the
    # weights: the merged weight's one rounding must be small against what bf16 itself does to the log-probs
    ids, mask, pixels = _inputs(6)
    log_probs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = OpenVLAOFT.from_pretrained(ckpt, dtype=dtype)
        add_lora(model, RANK, ALPHA)
        with torch.no_grad():
            g = torch.Generator().manual_seed(6)
            for p in lora_parameters(model)[1::2]:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            adapted = model(ids, mask, pixels.to(dtype)).float().log_softmax(-1)
            with merged_adapters(model):
                merged = model(ids, mask, pixels.to(dtype)).float().log_softmax(-1)
        log_probs[dtype] = adapted, merged
    exact = log_probs[torch.float32][0]
    adapted, merged = log_probs[torch.bfloat16]
    bf16_error = (adapted - exact).abs().mean()
    assert bf16_error > 0 and (merged - adapted).abs().mean() < 0.05 * bf16_error


def test_merged_adapters_restore_bf16_weights_exactly_where_subtracting_would_not():
    g = torch.Generator().manual_seed(6)
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    a, b = add_lora(layer, rank=RANK, alpha=ALPHA, skip=())
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=g))
    base = layer.weight.detach().clone()
    delta = ALPHA / RANK * b.detach() @ a.detach()
    with merged_adapters(layer):
        merged = layer.weight.detach().clone()
    assert torch.equal(merged, (base.float() + delta).to(torch.bfloat16))
    assert not torch.equal((merged.float() - delta).to(torch.bfloat16), base)  # unmerging would round twice
    assert torch.equal(layer.weight, base)


def test_merged_adapters_restore_on_error_and_take_in_weights_loaded_in_between():
    g = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(6, 5)
    a, b = add_lora(layer, rank=2, alpha=2.0, skip=())
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=g))
    first = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="mid-rollout"):
        with merged_adapters(layer):
            raise RuntimeError("mid-rollout")
    assert torch.equal(layer.weight, first) and adapters_active(layer)
    loaded = torch.randn(layer.weight.shape, generator=g)
    layer.load_state_dict({**layer.state_dict(), "weight": loaded})  # in place: the host copy is stale now
    with merged_adapters(layer):
        torch.testing.assert_close(layer.weight.detach(), loaded + b.detach() @ a.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.weight, loaded)
    with merged_adapters(layer), merged_adapters(layer):  # nested: the inner block finds nothing left to merge
        pass
    assert torch.equal(layer.weight, loaded) and adapters_active(layer)
    # writes that no version counter sees: through .data, and a new tensor assigned in place of the weight
    through_data = torch.randn(layer.weight.shape, generator=g)
    layer.weight.data.copy_(through_data)
    with merged_adapters(layer):
        pass
    assert torch.equal(layer.weight, through_data)
    assigned = torch.randn(layer.weight.shape, generator=g)
    layer.load_state_dict({**layer.state_dict(), "weight": assigned.clone()}, assign=True)
    with merged_adapters(layer):
        torch.testing.assert_close(layer.weight.detach(), assigned + b.detach() @ a.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.weight, assigned)


def test_bad_ranks_and_models_without_linear_layers_are_rejected():
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        add_lora(torch.nn.Linear(4, 4), 0)
    with pytest.raises(ValueError, match="no trainable nn.Linear"):
        add_lora(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1)), 2)


@pytest.mark.slow
def test_recipe_trains_checkpoints_and_resumes_the_adapters_alone(tmp_path):
    from test_srpo_libero import _load_dcp, _run

    out = tmp_path / "run"
    # a random policy fails everywhere, so every advantage is 0: the weight decay is what moves the adapters
    lora = [f"actor.lora_rank={RANK}", "actor.lr=0.01", "actor.weight_decay=0.5"]
    code, log = _run(out, 1, *lora)
    assert code == 0, log[-3000:]
    code, log = _run(out, 2, *lora)
    assert code == 0, log[-3000:]
    assert f"resumed from {out}/checkpoints/global_step_1 at step 1" in log
    first, second = (_load_dcp(out / "checkpoints" / f"global_step_{s}", "model") for s in (1, 2))
    adapter_keys = {k for k in second if k.endswith(("lora_A", "lora_B"))}
    assert adapter_keys and {k for k in first if "lora_" in k} == {k for k in second if "lora_" in k}
    for key, value in second.items():
        if key.endswith("lora_A"):
            assert not torch.equal(value, first[key]), key  # decayed again after the resume
        elif "lora_" not in key:
            assert torch.equal(value, first[key]), key  # the base weights stay frozen
    optim = _load_dcp(out / "checkpoints" / "global_step_2", "optim")["state"]
    assert set(optim) == adapter_keys  # AdamW holds state for the adapters only
    published = out / "checkpoints" / "global_step_2" / "huggingface"
    model = OpenVLAOFT.from_pretrained(published, dtype=torch.float32)  # merged: loads without LoRA
    assert not any("lora_" in name for name, _ in model.named_parameters())
