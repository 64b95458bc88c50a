"""A small token-action policy on a state vector, with the policy contract of OpenVLA-OFT.

:class:`StateTokenPolicy` maps ``("observation", "state")`` to a chunk of ``chunk_len x action_dim``
action tokens, each an index into ``num_bins`` uniform bins over ``[-1, 1]`` (256 as in OpenVLA),
through an MLP. By default a token's logits are a discretised Gaussian over the ordered bins (a mean
and a scale per token): reinforcing a sampled token then also raises its neighbours. In the Reacher
experiment (examples/srpo_reacher.py) outcome-reward RL moved it much faster than free per-bin logits
(``head="logits"``, OpenVLA's kind of head), in a small, not exhaustive, comparison. Like :class:`srpo_rl.policy.OpenVLAOFTPolicy` it samples every token at
``temperature`` under ``ExplorationType.RANDOM`` (argmax otherwise), writes the per-token log-probs
under that temperature and the de-tokenised continuous chunk, and stores what it read
(``"policy_state"``) so that :meth:`StateTokenPolicy.get_dist` recomputes the same distribution at
training time. It is a CPU-sized stand-in for a VLA in the SRPO pipeline (rollout, progress reward,
filters, :class:`~srpo_rl.objectives.SRPOLoss`), not a vision-language model: it reads no image
and no instruction.

Examples:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> from torchrl.envs.utils import ExplorationType, set_exploration_type
    >>> policy = StateTokenPolicy(state_dim=10, action_dim=2, chunk_len=8)
    >>> td = TensorDict({("observation", "state"): torch.randn(4, 10)}, [4])
    >>> with set_exploration_type(ExplorationType.RANDOM):
    ...     td = policy(td)
    >>> td["action_tokens"].shape, td["action"].shape, td["policy_state"].shape
    (torch.Size([4, 8, 2]), torch.Size([4, 8, 2]), torch.Size([4, 10]))
    >>> logp = policy.get_dist(td).log_prob(td["action_tokens"])
    >>> torch.allclose(logp, td["action_log_prob"])
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import InteractionType
from tensordict.utils import NestedKey
from torch import nn
from torch.distributions import Categorical
from torchrl.data.vla import UniformActionTokenizer
from torchrl.modules import MLP
from torchrl.modules.vla import VLAWrapperBase

__all__ = ["HEADS", "POLICY_STATE_KEY", "StateTokenPolicy"]

HEADS = ("gaussian", "logits")
# Narrowest discretised Gaussian: half a bin of 256 over [-1, 1].
MIN_SCALE = 1.0 / 256

#: Where the policy stores its (float32) input for training-time recomputation.
POLICY_STATE_KEY = "policy_state"


class StateTokenPolicy(VLAWrapperBase):
    """An MLP from a state vector to per-token logits over ``num_bins`` action bins.

    Args:
        state_dim: size of the state vector.
        action_dim: action dimensions per env step.
        chunk_len: env steps per decision (tokens per decision = ``chunk_len * action_dim``).

    Keyword Args:
        num_bins: action bins per dimension, uniform over ``[-1, 1]``. Defaults to 256.
        hidden_sizes: widths of the MLP's hidden layers. Defaults to ``(256, 256)``.
        head: ``"gaussian"``: the logits of a token are ``-((c_k - m) / s) ** 2 / 2`` over the bin centres
            ``c_k``, with ``m = tanh(.)`` and ``s = softplus(.) + 1 / 256`` from the MLP (2 outputs per
            token). ``"logits"``: one free logit per bin (``num_bins`` outputs per token).
        temperature: sampling temperature; also scales the log-probs and :meth:`get_dist`.
        state_key: where the state is read. Defaults to ``("observation", "state")``.

    Reads ``state_key`` float ``[*B, state_dim]``; writes ``"policy_state"`` float32
    ``[*B, state_dim]``, ``"action_tokens"`` int64 ``[*B, chunk_len, action_dim]``,
    ``"action_log_prob"`` float32 (per token, under ``softmax(logits / temperature)``) and
    ``"action"`` float32 (the bin centres, in ``[-1, 1]``). The input is standardised with
    ``state_loc`` / ``state_scale`` buffers (identity until :meth:`set_state_normalization`).
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        chunk_len: int = 8,
        *,
        num_bins: int = 256,
        hidden_sizes: Sequence[int] = (256, 256),
        head: str = "gaussian",
        temperature: float = 1.0,
        state_key: NestedKey = ("observation", "state"),
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if state_dim < 1 or action_dim < 1 or chunk_len < 1 or num_bins < 2:
            raise ValueError(
                f"state_dim, action_dim, chunk_len must be >= 1 and num_bins >= 2; got {state_dim}, {action_dim}, "
                f"{chunk_len}, {num_bins}"
            )
        super().__init__(
            action_dim=action_dim,
            chunk_size=chunk_len,
            action_head="tokens",
            vocab_size=num_bins,
            action_tokenizer=UniformActionTokenizer(num_bins, low=-1.0, high=1.0),
            output_mode="both",
            return_vla_action_container=False,
            log_probs_mode="token",
            use_state=True,
            default_interaction_type=InteractionType.DETERMINISTIC,
            state_key=state_key,
            action_key="action",
            action_chunk_key="action",
            action_tokens_key="action_tokens",
            log_probs_key="action_log_prob",
        )
        self.state_dim, self.temperature, self.head = int(state_dim), float(temperature), head
        self.net = MLP(
            in_features=state_dim,
            out_features=chunk_len * action_dim * (num_bins if head == "logits" else 2),
            num_cells=list(hidden_sizes),
            activation_class=nn.ReLU,
        )
        self.register_buffer("state_loc", torch.zeros(state_dim))
        self.register_buffer("state_scale", torch.ones(state_dim))
        self.register_buffer("bin_centers", self.action_tokenizer.decode(torch.arange(num_bins)))

    def _update_keys(self) -> None:
        keys = self._tensor_keys
        self.in_keys = [keys.state]
        self.out_keys = [POLICY_STATE_KEY, keys.action_tokens, keys.log_probs, keys.action_chunk]

    def set_state_normalization(self, loc: torch.Tensor, scale: torch.Tensor) -> StateTokenPolicy:
        """Standardises the input as ``(state - loc) / scale`` (e.g. the mean and std of the demonstrations)."""
        self.state_loc.copy_(torch.as_tensor(loc, dtype=torch.float32))
        self.state_scale.copy_(torch.as_tensor(scale, dtype=torch.float32).clamp_min(1e-6))
        return self

    def token_logits(self, state: torch.Tensor) -> torch.Tensor:
        """Raw logits (temperature 1) ``[*B, chunk_len, action_dim, num_bins]`` of a state batch ``[*B, state_dim]``."""
        if state.shape[-1] != self.state_dim:
            raise ValueError(f"state has shape {list(state.shape)}; expected [..., {self.state_dim}]")
        x = (state.to(self.state_loc) - self.state_loc) / self.state_scale
        if self.head == "logits":
            return self.net(x).unflatten(-1, (self.chunk_size, self.action_dim, self.vocab_size))
        mean, scale = self.net(x).unflatten(-1, (self.chunk_size, self.action_dim, 2)).unbind(-1)
        mean = torch.tanh(mean).unsqueeze(-1)
        scale = (torch.nn.functional.softplus(scale) + MIN_SCALE).unsqueeze(-1)
        return -0.5 * ((self.bin_centers - mean) / scale) ** 2

    def _action_logits(self, tensordict: TensorDictBase) -> torch.Tensor:
        state = tensordict.get(POLICY_STATE_KEY, None)
        if state is None:
            raise KeyError(
                f"missing {POLICY_STATE_KEY!r}: run the policy forward on the observation first (the step records of "
                f"srpo_rl.rollout.collect_rollouts hold it only when {POLICY_STATE_KEY!r} is in its policy_keys)"
            )
        return self.token_logits(state) / self.temperature

    def forward(self, tensordict: TensorDictBase, **kwargs: Any) -> TensorDictBase:
        """Stores the state it reads, then samples (RANDOM exploration) or takes the argmax of every token."""
        state = tensordict.get(self._tensor_keys.state, None)
        if state is None:
            raise KeyError(f"the policy input has no {self._tensor_keys.state!r}: a float state vector is required")
        tensordict.set(POLICY_STATE_KEY, state.to(torch.float32))
        return super().forward(tensordict, **kwargs)

    def get_dist(self, tensordict: TensorDictBase, **kwargs: Any) -> Categorical:
        """``Categorical`` with batch ``[*B, chunk_len, action_dim]`` over the bins at ``temperature``, recomputed
        (with grad) from the stored ``"policy_state"``."""
        return Categorical(logits=self._action_logits(tensordict))
