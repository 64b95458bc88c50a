"""HostAdamW: torch's AdamW on fp32 master weights in host memory, checkpointed, and FSDP2-sharded."""

import os
import warnings

import pytest
import torch
from conftest import spawn_gloo
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from srpo_rl.checkpoint import CheckpointManager
from srpo_rl.distributed import DistInfo, close_distributed, shard_actor
from srpo_rl.optim import HostAdamW, available_host_bytes, check_gpu_update_fits, round_to_bf16_stochastic

LR, BETAS, EPS, WD = 0.05, (0.9, 0.999), 1e-8, 0.1


def _gradients(shapes, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=g) for shape in shapes] for _ in range(steps)]


def _adamw_float64(weights: list[torch.Tensor], gradients: list[list[torch.Tensor]], lr: float = LR,
                   wd: float = WD) -> list[torch.Tensor]:
    """AdamW written out from Loshchilov & Hutter (decoupled decay) with Adam's bias corrections, in float64."""
    (b1, b2), out = BETAS, []
    for i, w in enumerate(weights):
        w, m, v = w.double(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
        for t, grads in enumerate(gradients, start=1):
            g = grads[i].double()
            w = w * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)
        out.append(w)
    return out


def test_master_weights_follow_adamw_and_the_parameters_their_bf16_rounding():
    shapes = [(7, 5), (5,), (3, 2, 4)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(w.clone()) for w in start]  # fp32 start: the master's exact first value
    optimizer = HostAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, chunk_bytes=64)  # several chunks
    gradients = _gradients(shapes, steps=4)
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    expected = _adamw_float64(start, gradients)
    for p, want in zip(params, expected):
        master = optimizer.state[p]["master"]
        assert master.dtype == torch.float32 and master.device.type == "cpu"
        torch.testing.assert_close(master.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), master)  # fp32 parameters: the master itself
        assert int(optimizer.state[p]["step"]) == 4


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_parameters_stored_transposed_get_their_update_at_their_own_elements(state_dtype):
    # a transposed and a channels-last parameter: the update pairs master, moments and gradient element by element
    g = torch.Generator().manual_seed(3)
    transposed = torch.nn.Parameter(torch.randn(4, 3, generator=g).t())
    channels_last = torch.nn.Parameter(torch.randn(2, 3, 2, 2, generator=g).to(memory_format=torch.channels_last))
    params = [transposed, channels_last]
    assert not any(p.is_contiguous() for p in params)
    start = [p.detach().clone() for p in params]
    optimizer = HostAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype=state_dtype)
    gradients = _gradients([tuple(p.shape) for p in params], steps=3, seed=4)
    gradients[0][0].zero_()
    gradients[0][0][0, 1] = 1.0  # one element moves by its gradient at the first step: (0, 1), not (1, 0)
    for grads in gradients:
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
    tolerance = dict(rtol=1e-5, atol=1e-6) if state_dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    for p, want in zip(params, _adamw_float64(start, gradients)):
        torch.testing.assert_close(p.detach().double(), want, **tolerance)


def test_each_parameter_group_steps_with_its_own_lr_and_weight_decay():
    shapes = [(6, 3), (4,)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(10 + i)) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(w.clone()) for w in start]
    optimizer = HostAdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01, "weight_decay": 0.0}],
                          lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    gradients = _gradients(shapes, steps=3, seed=1)
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    first = _adamw_float64(start[:1], [g[:1] for g in gradients])[0]  # the defaults
    second = _adamw_float64(start[1:], [g[1:] for g in gradients], lr=0.01, wd=0.0)[0]
    torch.testing.assert_close(params[0].detach().double(), first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[1].detach().double(), second, rtol=1e-5, atol=1e-6)


def test_bf16_parameters_get_the_rounded_master_and_torch_adamw_s_bits():
    shapes = [(16, 8), (8,)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(10 + i)) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in start]
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))  # never gets a gradient
    optimizer = HostAdamW(params + [frozen], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    # torch's own fused AdamW on fp32 copies of the same (bf16-valued) weights with the same fp32 gradients
    reference = [torch.nn.Parameter(p.detach().float()) for p in params]
    torch_adamw = torch.optim.AdamW(reference, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    for grads in _gradients(shapes, steps=3, seed=1):
        for p, r, g in zip(params, reference, grads):
            p.grad, r.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        optimizer.step()
        torch_adamw.step()
    for p, r in zip(params, reference):
        master = optimizer.state[p]["master"]
        assert torch.equal(master, r.detach())
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), master.to(torch.bfloat16))
        assert not torch.equal(master, master.to(torch.bfloat16).float())  # the master keeps more than bf16
    assert frozen not in optimizer.state and torch.equal(frozen.detach(), torch.ones(3, dtype=torch.bfloat16))
    assert optimizer.host_bytes() == 3 * 4 * (16 * 8 + 8)


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 ``x`` (equal where ``x`` is one), from torch's
    round-to-nearest conversion and ``nextafter`` in bf16."""
    nearest = x.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf"))).float()
    down = torch.nextafter(nearest, torch.full_like(nearest, float("-inf"))).float()
    exact = nearest.float() == x
    low = torch.where(exact | (nearest.float() < x), nearest.float(), down)
    high = torch.where(exact | (nearest.float() > x), nearest.float(), up)
    return low, high


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, generator=g) * torch.logspace(-6, 3, 64)  # both signs, many binades
    draws = 4000
    rounded = round_to_bf16_stochastic(x.repeat(draws, 1).contiguous(),
                                       torch.randint(0, 2**16, (draws, 64), dtype=torch.int32, generator=g))
    low, high = _bf16_neighbours(x)
    assert torch.equal(rounded, rounded.to(torch.bfloat16).float())  # a bf16 value: it converts exactly
    assert ((rounded == low) | (rounded == high)).all()
    # the chance of the upper neighbour is the distance from the lower one: the mean is x within 5 sigma
    p = (x - low) / (high - low)
    sigma = (high - low) * (p * (1 - p) / draws).sqrt()
    assert ((rounded.mean(0) - x).abs() <= 5 * sigma + 1e-12 * x.abs()).all()


def test_bf16_moments_follow_fp32_adamw_within_their_rounding():
    shapes, steps = [(33, 17), (17,)], 10
    start = [torch.randn(s, generator=torch.Generator().manual_seed(20 + i)) for i, s in enumerate(shapes)]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = HostAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, chunk_bytes=256,
                              state_dtype=dtype)  # several chunks, each over the flat buffer's blocks
        largest_step = 0.0  # of the Adam term, weight decay aside
        for grads in _gradients(shapes, steps=steps, seed=2):
            decayed = [p.detach() * (1 - LR * WD) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
            largest_step = max([largest_step] + [float((p.detach() - d).abs().max()) for p, d in zip(params, decayed)])
        runs[dtype] = (params, optimizer, largest_step)
    (fp32_params, _, largest_step), (bf16_params, bf16, _) = runs[torch.float32], runs[torch.bfloat16]
    for p in bf16_params:
        assert bf16.state[p]["exp_avg"].dtype == bf16.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        assert bf16.state[p]["master"].dtype == torch.float32
    assert bf16.host_bytes() == (4 + 2 + 2) * (33 * 17 + 17)
    # a bf16 moment is off by less than one bf16 spacing (2^-7 of it) per rounding: after t steps by at most
    # t x 2^-7 of itself, so the step m / sqrt(v) by at most 1.5 t x 2^-7 of itself (sqrt halves v's share)
    worst = sum(1.5 * t * 2**-7 * largest_step for t in range(1, steps + 1))
    differences = torch.cat([(a - b).detach().abs().flatten() for a, b in zip(bf16_params, fp32_params)])
    assert 0 < differences.max() <= worst
    assert differences.mean() <= worst / 10  # the rounding errors are unbiased: most cancel


def test_bf16_second_moment_keeps_moving_where_round_to_nearest_stalls():
    # a constant gradient of 1: exactly, v_t = 1 - beta2^t (0.95 after 3000 steps); the increment (1 - beta2)
    # falls below half of bf16's spacing once v passes 0.5, so v rounded to nearest stops near there
    steps, beta2 = 3000, BETAS[1]
    param = torch.nn.Parameter(torch.zeros(2048))
    optimizer = HostAdamW([param], lr=0.0, betas=BETAS, weight_decay=0.0, state_dtype=torch.bfloat16)
    nearest = torch.zeros((), dtype=torch.bfloat16)
    for _ in range(steps):
        param.grad = torch.ones(2048)
        optimizer.step()
        nearest = (beta2 * nearest.float() + (1 - beta2)).to(torch.bfloat16)
    exact = 1 - beta2**steps
    assert abs(optimizer.state[param]["exp_avg_sq"].float().mean() - exact) < 0.01 * exact
    assert float(nearest) < 0.6 * exact


def test_a_saved_state_loads_into_either_state_dtype():
    params = [torch.nn.Parameter(torch.randn(5, 3))]
    saved = HostAdamW(params, lr=LR)
    params[0].grad = torch.randn(5, 3)
    saved.step()
    for dtype in (torch.bfloat16, torch.float32):
        loaded = HostAdamW(params, lr=LR, state_dtype=dtype)
        loaded.load_state_dict(saved.state_dict())
        state = loaded.state[params[0]]
        assert state["master"].dtype == torch.float32 and torch.equal(state["master"], saved.state[params[0]]["master"])
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == dtype
        torch.testing.assert_close(state["exp_avg_sq"].float(), saved.state[params[0]]["exp_avg_sq"],
                                   rtol=2**-8, atol=0)  # bf16: to nearest, half a spacing
    with pytest.raises(ValueError, match=r"state_dtype must be one of \['torch.float32', 'torch.bfloat16'\]"):
        HostAdamW(params, state_dtype=torch.float16)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"invalid HostAdamW settings lr=-1"):
        HostAdamW([torch.nn.Parameter(torch.ones(1))], lr=-1)
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1, got 0"):
        HostAdamW([torch.nn.Parameter(torch.ones(1))], chunk_bytes=0)


def test_a_state_larger_than_the_host_fails_before_allocating_with_the_sizes_named():
    # 2e12 parameters on the meta device (no memory behind them): 24 TB of fp32 state, more than any host has;
    # without the check the kernel kills the process part-way through allocating it, with no message
    available = int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable:")).split()[1])
    assert abs(available_host_bytes() - 1024 * available) < 2**30  # the kernel's MemAvailable, in bytes
    n = 2 * 10**12
    huge = torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16, device="meta"))
    huge.grad = torch.empty_like(huge)
    optimizer = HostAdamW([huge], lr=1e-3)
    # master + two moments in fp32, and the step's buffers: 3 x (chunk_bytes + the largest parameter in fp32)
    needed_gib = (3 * 4 * n + 3 * (optimizer.chunk_bytes + 4 * n)) / 2**30
    message = (rf"HostAdamW needs {needed_gib:.1f} GiB of host memory .* 2000\.00 B parameters, "
               rf"and \d+\.\d GiB are available")
    with pytest.raises(MemoryError, match=message):
        optimizer.init_state()
    with pytest.raises(MemoryError, match=message):
        optimizer.step()
    assert not optimizer.state.get(huge)  # nothing was allocated


def test_a_gpu_update_that_cannot_fit_fails_at_start_up_naming_the_plans():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    model[0].bias.requires_grad_(False)  # frozen: neither a gradient nor moments
    # trainable: 8 x 4 fp32 weights (4 bytes each), 4 x 2 + 2 bf16 ones (2 bytes); each gets a gradient and two
    # moments of its dtype
    need = 3 * (32 * 4 + 10 * 2)
    assert check_gpu_update_fits(model.parameters(), capacity_bytes=need + 100, allocated_bytes=100) == need
    with pytest.raises(MemoryError, match=r"need 0\.0 GiB .*actor\.fsdp\.optimizer_offload=true.*actor\.lora_rank=32"):
        check_gpu_update_fits(model.parameters(), capacity_bytes=need + 100, allocated_bytes=101)


def test_the_memory_the_job_takes_beside_the_state_is_counted():
    # a 1 MiB state fits any host, but not with a reserve of more than the host's available memory beside it: the
    # env processes and the rollout that grow after start-up must fit too, or the kernel kills the job at its first
    # step
    param = torch.nn.Parameter(torch.zeros(2**16))
    optimizer = HostAdamW([param], lr=1e-3, chunk_bytes=2**20)
    reserve = available_host_bytes() + 2**30  # more than the host has, whatever others free meanwhile
    needed = (12 * 2**16 + 3 * (2**20 + 4 * 2**16)) / 2**30
    with pytest.raises(MemoryError, match=rf"needs {needed:.1f} GiB .* plus {reserve / 2**30:.1f} GiB that the job "
                                          rf"takes beside it, and \d+\.\d GiB are available"):
        optimizer.init_state(reserve_bytes=reserve)
    assert not optimizer.state.get(param)
    with pytest.raises(ValueError, match="reserve_bytes must be >= 0, got -1"):
        optimizer.init_state(reserve_bytes=-1)
    optimizer.init_state(reserve_bytes=2**20)
    assert optimizer.host_bytes() == 12 * 2**16


def test_state_built_up_front_steps_as_the_state_built_at_the_first_step():
    x = torch.linspace(-1, 1, 6, dtype=torch.bfloat16).reshape(1, 6)
    eager_model, lazy_model = _model(), _model()
    eager, lazy = HostAdamW(eager_model.parameters(), lr=LR), HostAdamW(lazy_model.parameters(), lr=LR)
    eager.init_state()
    for p in eager_model.parameters():
        state = eager.state[p]
        assert torch.equal(state["master"], p.detach().float()) and state["step"].item() == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert eager.host_bytes() == 12 * sum(p.numel() for p in eager_model.parameters())
    _train(eager_model, eager, range(3), x)
    _train(lazy_model, lazy, range(3), x)
    for a, b in zip(eager_model.parameters(), lazy_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(eager.state[a]["master"], lazy.state[b]["master"])


class _Net(torch.nn.Sequential):
    def fsdp_blocks(self) -> list[torch.nn.Module]:  # what shard_actor wraps block by block
        return [self[0], self[2]]


def _model(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    torch.manual_seed(0)
    return _Net(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(dtype)


def _train(model: torch.nn.Module, optimizer: HostAdamW, steps: range, x: torch.Tensor) -> None:
    for step in steps:
        optimizer.zero_grad()
        (model(x) * torch.linspace(-1, 1, 3, dtype=x.dtype, device=x.device) * (step + 1)).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_resume_continues_bit_for_bit(tmp_path, state_dtype):
    # bf16 moments too: their stochastic rounding draws from the step and the parameter, not a running generator
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    straight = _model()
    straight_opt = HostAdamW(straight.parameters(), lr=LR, weight_decay=WD, state_dtype=state_dtype)
    _train(straight, straight_opt, range(4), x)

    first = _model()
    first_opt = HostAdamW(first.parameters(), lr=LR, weight_decay=WD, state_dtype=state_dtype)
    _train(first, first_opt, range(2), x)
    manager = CheckpointManager(tmp_path / "ckpt")
    resumed = _model()
    resumed_opt = HostAdamW(resumed.parameters(), lr=LR, weight_decay=WD, state_dtype=state_dtype)
    with warnings.catch_warnings(record=True) as caught:  # one process saves and loads without DCP's warnings
        warnings.simplefilter("always")
        manager.save(2, model=first, optimizer=first_opt, trainer_state={"step": 2})
        assert manager.load_latest(model=resumed, optimizer=resumed_opt)["step"] == 2
    assert [str(w.message) for w in caught if "torch.distributed" in str(w.message)] == []
    for p in resumed.parameters():
        state = resumed_opt.state[p]
        assert int(state["step"]) == 2
        assert state["master"].dtype == torch.float32 and state["exp_avg"].dtype == state_dtype
        assert all(state[k].device.type == "cpu" for k in ("master", "exp_avg", "exp_avg_sq"))
    _train(resumed, resumed_opt, range(2, 4), x)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(straight_opt.state[a][key], resumed_opt.state[b][key]), (name, key)


def _sharded_worker(rank: int, world_size: int, out: str) -> None:
    """Two FSDP2 ranks: two steps, a checkpoint, a fresh model and optimizer that resume, two more steps."""
    info = DistInfo(rank, world_size, rank, torch.device("cpu"))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))[rank::world_size]

    def build():
        model = shard_actor(_model(torch.float32), info, mixed_precision="fp32", forward_methods=())
        return model, HostAdamW(model.parameters(), lr=LR, weight_decay=WD)

    model, optimizer = build()
    _train(model, optimizer, range(2), x)
    manager = CheckpointManager(os.path.join(out, "ckpt"))
    manager.save(2, model=model, optimizer=optimizer, trainer_state={})
    model, optimizer = build()
    manager.load_latest(model=model, optimizer=optimizer)
    assert all(state["master"].to_local().device.type == "cpu" for state in optimizer.state.values())
    _train(model, optimizer, range(2, 4), x)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(state, os.path.join(out, "sharded.pt"))

    # the recipe's configuration: bf16 shards, gradients accumulated over two backwards (FSDP2 keeps the sum
    # in fp32 between them), one host step; the shards are the rounded fp32 masters
    model = shard_actor(_model(torch.bfloat16), info, mixed_precision="bf16", forward_methods=())
    optimizer = HostAdamW(model.parameters(), lr=LR, weight_decay=WD)
    for last, half in ((False, x[:2]), (True, x[2:])):
        model.set_requires_gradient_sync(last)
        model(half.to(torch.bfloat16)).float().square().sum().backward()
    optimizer.step()
    for param in model.parameters():
        master = optimizer.state[param]["master"].to_local()
        assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(param.to_local(), master.to(torch.bfloat16))


@pytest.mark.slow
def test_fsdp2_shards_resume_and_match_one_process(tmp_path):
    spawn_gloo(_sharded_worker, 2, str(tmp_path))
    sharded = torch.load(tmp_path / "sharded.pt")
    single = _model(torch.float32)
    # FSDP2 averages the two ranks' gradients: the mean over both halves of the batch, 2x each half's sum
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    optimizer = HostAdamW(single.parameters(), lr=LR, weight_decay=WD)
    for step in range(4):
        optimizer.zero_grad()
        (single(x) * torch.linspace(-1, 1, 3) * (step + 1)).sum().div(2).backward()
        optimizer.step()
    start = _model(torch.float32).state_dict()
    for name, value in single.state_dict().items():
        assert not torch.equal(value, start[name])  # the steps moved every weight
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_cuda_parameters_get_the_same_update_as_host_parameters():
    """Through pinned staging and asynchronous copies, bit for bit what the same update does on the host."""
    shapes = [(1024, 96), (96,), (3, 7)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(20 + i)).to(torch.bfloat16)
             for i, s in enumerate(shapes)]
    on_host = [torch.nn.Parameter(w.clone()) for w in start]
    on_gpu = [torch.nn.Parameter(w.cuda()) for w in start]
    optimizers = [HostAdamW(ps, lr=LR, weight_decay=WD, chunk_bytes=2**17) for ps in (on_host, on_gpu)]
    for grads in _gradients(shapes, steps=3, seed=2):
        for p, q, g in zip(on_host, on_gpu, grads):
            p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).cuda()
        for optimizer in optimizers:
            optimizer.step()
    for p, q in zip(on_host, on_gpu):
        assert q.device.type == "cuda" and torch.equal(q.detach().cpu(), p.detach())
        assert torch.equal(optimizers[1].state[q]["master"], optimizers[0].state[p]["master"])


@pytest.mark.gpu
def test_fsdp2_on_a_cuda_mesh_keeps_the_state_on_the_host(tmp_path):
    """One NCCL rank, the recipe's bf16 shards on the GPU: the state stays in host memory (a CUDA mesh made
    ``DTensor.from_local`` move it to the GPU, where the host step failed) and the update is the unsharded one."""
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).cuda()
        info = DistInfo(0, 1, 0, torch.device("cuda", 0))
        sharded = shard_actor(_model(torch.bfloat16), info, mixed_precision="bf16", forward_methods=())
        plain = _model(torch.bfloat16).cuda()
        optimizers = [HostAdamW(m.parameters(), lr=LR, weight_decay=WD) for m in (sharded, plain)]
        for model, optimizer in zip((sharded, plain), optimizers):
            _train(model, optimizer, range(2), x)
        for state in optimizers[0].state.values():
            assert all(state[k].to_local().device.type == "cpu" for k in ("master", "exp_avg", "exp_avg_sq"))
        for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):  # one rank: its shard is all
            assert p.to_local().device.type == "cuda"
            torch.testing.assert_close(p.to_local(), q, msg=name)
            torch.testing.assert_close(optimizers[0].state[p]["master"].to_local(), optimizers[1].state[q]["master"],
                                       rtol=1e-5, atol=1e-6, msg=name)
    finally:
        close_distributed()
