r"""The learning rule, as pure functions.

For a prompt with G sampled completions :math:`y_1..y_G` and rewards :math:`r_i`, the group-normalised
advantage is :math:`A_i = (r_i - \bar r) / (\sigma_r + \epsilon)`. For every completion token t,
:math:`\rho_t = \exp(\log\pi_\theta(y_t) - \log\mu(y_t))` is the importance ratio between the current policy
and the behaviour policy μ that sampled it (the generator's weights, possibly several versions old). The loss is

.. math::
    L = \frac{1}{N}\sum_i \frac{1}{|y_i|}\sum_t \Big[-\min\big(\hat\rho_t A_i,\ \mathrm{clip}(\rho_t, 1-\varepsilon,
        1+\varepsilon) A_i\big) + \beta\,\mathrm{KL}_t\Big]

with :math:`\hat\rho_t = \min(\rho_t, c)` (dual clip: a very stale token cannot blow up a negative-advantage
update) and the k3 estimator :math:`\mathrm{KL}_t = e^{\log\pi_{ref}-\log\pi_\theta} - (\log\pi_{ref} -
\log\pi_\theta) - 1 \ge 0` to the frozen reference policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def group_advantages(rewards: Sequence[float], eps: float = 1e-6, std_floor: float = 0.0) -> list[float]:
    """Rewards normalised within their group; a group whose rewards are all equal teaches nothing.

    ``std_floor`` bounds the divisor from below: a group spread less than that (the judge's own noise, once
    the student's samples all score alike) is scaled as if it spread that much, so its noise is not
    stretched to +-1 while groups with a real difference keep the plain GRPO scale.

    >>> [round(a, 4) for a in group_advantages([1.0, 0.0])]
    [1.0, -1.0]
    >>> group_advantages([0.5, 0.5, 0.5])
    [0.0, 0.0, 0.0]
    >>> group_advantages([])
    []
    >>> [round(a, 2) for a in group_advantages([0.51, 0.49], std_floor=0.05)]
    [0.2, -0.2]
    >>> [round(a, 2) for a in group_advantages([1.0, 0.0], std_floor=0.05)]
    [1.0, -1.0]
    """
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    return [(r - mean) / (max(std, std_floor) + eps) for r in rewards]


def minibatch_spans(group_sizes: list[int], minibatches: int) -> list[tuple[int, int]]:
    """Row spans ``(start, end)`` of a step's minibatches: its groups, in order, dealt into ``minibatches``
    runs of whole groups as even in group count as they go (a group's completions share a forward pass of
    their prompt, and its advantages were normalised together). Fewer groups than minibatches: one each.

    >>> minibatch_spans([4, 4, 4, 4], 2)
    [(0, 8), (8, 16)]
    >>> minibatch_spans([4, 3, 4], 2)
    [(0, 7), (7, 11)]
    >>> minibatch_spans([4, 4], 3)
    [(0, 4), (4, 8)]
    >>> minibatch_spans([4, 4, 4, 4], 1)
    [(0, 16)]
    """
    n = max(1, min(minibatches, len(group_sizes)))
    spans, start, g = [], 0, 0
    for k in range(n):
        take = len(group_sizes) // n + (1 if k < len(group_sizes) % n else 0)
        end = start + sum(group_sizes[g : g + take])
        spans.append((start, end))
        start, g = end, g + take
    return spans


def step_advantages(
    groups: Sequence[Sequence[float]], scale: str = "group", eps: float = 1e-6, std_floor: float = 0.0
) -> list[list[float]]:
    """Advantages of one step's groups: each reward minus its group's mean, divided by a standard deviation.

    ``scale="group"`` divides by the group's own (GRPO, :func:`group_advantages`). ``scale="step"`` divides by
    the within-group deviation pooled over the step: a group whose completions score within the judge's noise
    of each other then teaches little, instead of having that noise stretched to +-1 (on SmolLM2, a quarter of
    the groups spread less than 0.03 in reward). Either divisor is at least ``std_floor``.

    >>> [[round(a, 2) for a in g] for g in step_advantages([[1.0, 0.0], [0.51, 0.49]], "group")]
    [[1.0, -1.0], [1.0, -1.0]]
    >>> [[round(a, 2) for a in g] for g in step_advantages([[1.0, 0.0], [0.51, 0.49]], "step")]
    [[1.41, -1.41], [0.03, -0.03]]
    """
    if scale == "group":
        return [group_advantages(g, eps, std_floor) for g in groups]
    if scale != "step":
        raise ValueError(f"advantage scale must be 'group' or 'step', not {scale!r}")
    centred = [[r - sum(g) / len(g) for r in g] if g else [] for g in groups]
    n = sum(len(g) for g in centred)
    pooled = math.sqrt(sum(c * c for g in centred for c in g) / n) if n else 0.0
    return [[c / (max(pooled, std_floor) + eps) for c in g] for g in centred]


def learning_rate_at(step: int, base: float, decay_steps: int, min_ratio: float) -> float:
    """The learning rate for optimizer step ``step`` (0-based): cosine from ``base`` down to ``base *
    min_ratio`` over ``decay_steps`` steps, then flat; ``decay_steps=0`` keeps it constant.

    Big early steps move the policy while its rewards are easy to improve; small late ones stop a noisy
    group-normalised gradient from undoing them.

    >>> learning_rate_at(0, 1e-3, 0, 0.1)
    0.001
    >>> [round(learning_rate_at(s, 1.0, 10, 0.2), 3) for s in (0, 5, 10, 50)]
    [1.0, 0.6, 0.2, 0.2]
    """
    if decay_steps <= 0:
        return base
    progress = min(step, decay_steps) / decay_steps
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class LossConfig:
    clip_eps: float = 0.2
    max_ratio: float = 5.0
    kl_coef: float = 0.05
    #: clip against the proximal policy (the policy as the step found it) instead of the behaviour policy,
    #: with the behaviour -> proximal importance weight truncated at ``max_ratio`` (decoupled PPO)
    decoupled: bool = False


def policy_loss(
    logp_new: torch.Tensor,
    logp_behaviour: torch.Tensor,
    logp_ref: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    logp_prox: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped off-policy policy-gradient loss with a KL penalty; all token tensors are (batch, tokens).

    By default the PPO ratio is taken against the behaviour policy (the generator's version), so a token of a
    rollout two versions old that the last two steps already moved past 1 ± ε gets no gradient at all. With
    ``cfg.decoupled`` and ``logp_prox`` (the policy as this step found it, no gradient) the trust region is
    around the proximal policy instead and the staleness is corrected by a separate importance weight
    ``w = π_prox / π_behaviour``, truncated at ``max_ratio`` (decoupled PPO, Hilton et al. 2021):
    ``-w · min(r·A, clip(r, 1 ± ε)·A)`` with ``r = π_θ / π_prox``. On fresh rollouts the two are the same.

    >>> z = torch.zeros(1, 2); m = torch.ones(1, 2)
    >>> loss, metrics = policy_loss(z, z, z, torch.tensor([1.0]), m, LossConfig())
    >>> round(loss.item(), 4), metrics["kl"], metrics["clip_frac"]
    (-1.0, 0.0, 0.0)

    A stale token already pushed past 1 + ε: clipped against behaviour, it has no gradient; against the
    proximal policy (where θ is now) it has one, weighted by how much likelier the token has become.

    >>> behaviour, now = torch.zeros(1, 1), torch.full((1, 1), 0.4, requires_grad=True)
    >>> a, one = torch.tensor([1.0]), torch.ones(1, 1)
    >>> old, _ = policy_loss(now, behaviour, now.detach(), a, one, LossConfig(kl_coef=0))
    >>> old.backward(); now.grad.item()
    0.0
    >>> now.grad = None
    >>> cfg = LossConfig(kl_coef=0, decoupled=True)
    >>> new, metrics = policy_loss(now, behaviour, now.detach(), a, one, cfg, logp_prox=now.detach())
    >>> new.backward(); round(now.grad.item(), 4), round(metrics["is_weight_mean"], 4), metrics["clip_frac"]
    (-1.4918, 1.4918, 0.0)
    """
    mask = mask.to(logp_new.dtype)
    adv = advantages.unsqueeze(-1)
    behaviour_ratio = torch.exp(logp_new - logp_behaviour)
    if cfg.decoupled and logp_prox is not None:
        weight = torch.clamp(torch.exp(logp_prox - logp_behaviour), max=cfg.max_ratio)
        ratio = torch.exp(logp_new - logp_prox)  # the trust region is around the policy the step started from
        clipped = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
        pg = -weight * torch.minimum(ratio * adv, clipped)
    else:
        weight, ratio = torch.ones_like(logp_new), behaviour_ratio
        unclipped = torch.clamp(ratio, max=cfg.max_ratio) * adv
        clipped = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
        pg = -torch.minimum(unclipped, clipped)
    log_diff = logp_ref - logp_new
    kl = torch.exp(log_diff) - log_diff - 1.0
    per_token = pg + cfg.kl_coef * kl
    lengths = mask.sum(-1).clamp(min=1.0)
    loss = ((per_token * mask).sum(-1) / lengths).mean()
    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1.0)
        clip_frac = (((ratio - 1.0).abs() > cfg.clip_eps).to(mask.dtype) * mask).sum() / n_tokens
        metrics = {
            "loss": float(loss.item()),
            "pg_loss": float(((pg * mask).sum(-1) / lengths).mean().item()),
            "kl": float(((kl * mask).sum() / n_tokens).item()),
            "clip_frac": float(clip_frac.item()),
            "ratio_mean": float(((behaviour_ratio * mask).sum() / n_tokens).item()),
            "is_weight_mean": float(((weight * mask).sum() / n_tokens).item()),
        }
    return loss, metrics


def completion_logprobs(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    temperature: float = 1.0,
    share_prompts: bool = True,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs (and entropies) of each completion given its prompt, right-padded.

    Returns ``(logp, entropy, mask)``, each (batch, max completion length); ``entropy`` is zeros unless
    ``with_entropy`` (a metric of the policy: the reference's is never read). With ``share_prompts``,
    completions of one prompt (a group) share its forward pass: the prompt runs once and its key/value cache
    serves all of them, which on SmolLM2 with G = 4 and its ~35-token chat prompt skips a third of the tokens
    (gradients flow through the shared cache, so the result is the same as one padded batch;
    ``tests/services/test_learner.py``). That is two forwards per group: on a CPU fewer tokens is what counts,
    on a GPU fewer forwards (kernel launches), so there the whole batch goes through one padded forward.
    """
    parts = (
        _logits_by_prompt(model, sequences, pad_id)
        if share_prompts
        else [(list(range(len(sequences))), _token_logits(model, sequences, pad_id))]
    )
    device = parts[0][1].device
    order = [i for rows, _ in parts for i in rows for _ in sequences[i][1]]
    rows_t = torch.tensor(order, device=device)
    offsets = torch.tensor([j for rows, _ in parts for i in rows for j in range(len(sequences[i][1]))], device=device)
    targets = torch.tensor([t for rows, _ in parts for i in rows for t in sequences[i][1]], device=device)
    # every completion token of the batch in one (tokens, vocab) block: one softmax, one backward
    token_logp = torch.log_softmax(torch.cat([logits for _, logits in parts]).float() / temperature, dim=-1)
    comp_width = max(len(c) for _, c in sequences)
    logp = torch.zeros((len(sequences), comp_width), device=device)
    entropy = torch.zeros((len(sequences), comp_width), device=device)
    mask = torch.zeros((len(sequences), comp_width), device=device)
    logp[rows_t, offsets] = token_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if with_entropy:
        with torch.no_grad():  # a metric only: no graph through a second (tokens, vocab) tensor
            entropy[rows_t, offsets] = -(token_logp.exp() * token_logp).sum(-1)
    mask[rows_t, offsets] = 1.0
    return logp, entropy, mask


def _logits_by_prompt(
    model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int
) -> list[tuple[list[int], torch.Tensor]]:
    """(rows, packed token logits) per distinct prompt, its completions sharing its forward pass."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(sequences):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    parts = []
    for key, rows in by_prompt.items():
        prompt, completions = list(key), [sequences[i][1] for i in rows]
        if len(rows) == 1 or not all(completions):  # nothing to share, or an empty completion (no first token)
            parts.append((rows, _token_logits(model, [(prompt, c) for c in completions], pad_id)))
        else:
            parts.append((rows, _shared_prompt_token_logits(model, prompt, completions, pad_id)))
    return parts


def _token_logits(model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """The logits that predict each completion token, packed row after row: (completion tokens, vocab)."""
    lengths = [len(p) + len(c) for p, c in sequences]
    width = max(lengths)
    device = next(model.parameters()).device
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (p, c) in enumerate(sequences):
        ids[i, : lengths[i]] = torch.tensor(p + c)
        attn[i, : lengths[i]] = 1
    # the LM head (a fifth of SmolLM2's compute per token) only from the first column that predicts a completion
    first = min(len(p) for p, _ in sequences) - 1
    out = model(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=width - first)
    rows = torch.tensor([i for i, (_, c) in enumerate(sequences) for _ in c], device=device)
    cols = torch.tensor([len(p) - 1 - first + j for p, c in sequences for j in range(len(c))], device=device)
    logits: torch.Tensor = out.logits[rows, cols]  # logits at position k predict token k + 1
    return logits


def _shared_prompt_token_logits(
    model: Any, prompt: list[int], completions: list[list[int]], pad_id: int
) -> torch.Tensor:
    """``_token_logits`` for completions of one prompt: the prompt's forward pass once, its cache repeated."""
    device = next(model.parameters()).device
    head = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    cache = head.past_key_values
    cache.batch_repeat_interleave(len(completions))
    width = max(len(c) for c in completions)
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(completions), len(prompt) + width), dtype=torch.long)
    attn[:, : len(prompt)] = 1
    for k, c in enumerate(completions):
        ids[k, : len(c)] = torch.tensor(c)
        attn[k, len(prompt) : len(prompt) + len(c)] = 1
    # completion column j predicts token j + 1; token 0 is predicted by the prompt's last position
    tail = model(input_ids=ids.to(device), attention_mask=attn.to(device), past_key_values=cache).logits
    rows = torch.tensor([k for k, c in enumerate(completions) for _ in c[1:]], device=device, dtype=torch.long)
    cols = torch.tensor([j for c in completions for j in range(len(c) - 1)], device=device, dtype=torch.long)
    firsts = head.logits[:, -1].expand(len(completions), -1)
    logits = torch.cat([firsts, tail[rows, cols]])  # (completions + later tokens, vocab): reorder row after row
    index = []
    later = len(completions)
    for k, c in enumerate(completions):
        index.append(k)
        index.extend(range(later, later + len(c) - 1))
        later += len(c) - 1
    return logits[torch.tensor(index, device=device)]


def share_prompts_by_default(device: str, threads: int) -> bool:
    """Whether a step should share each group's prompt forward (:func:`completion_logprobs`) on this device.

    Measured LoRA steps of 16 SmolLM2 rollouts (``rlaif bench compute``): sharing was 1.45x faster than one
    padded batch on one CPU thread and 1.14x on two; on 16 CPU threads the padded batch was 2.1x faster, and
    on an H200 5.8x (fewer, larger forwards win once there is parallel hardware to fill).

    >>> share_prompts_by_default("cpu", 1), share_prompts_by_default("cpu", 16), share_prompts_by_default("cuda", 1)
    (True, False, False)
    """
    return device == "cpu" and threads <= 2


def reference_logprobs(
    model: Any,
    reference: torch.nn.Module | None,
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    temperature: float,
    share_prompts: bool = True,
) -> torch.Tensor:
    """The frozen reference's completion log-probs (see :func:`micro_batch_loss` for ``reference=None``)."""
    with torch.no_grad():
        if reference is None:
            with model.disable_adapter():
                return completion_logprobs(model, sequences, pad_id, temperature, share_prompts, with_entropy=False)[0]
        return completion_logprobs(reference, sequences, pad_id, temperature, share_prompts, with_entropy=False)[0]


def micro_batch_loss(
    model: Any,
    reference: torch.nn.Module | None,
    sequences: list[tuple[list[int], list[int]]],
    behaviour_logprobs: Sequence[Sequence[float]] | None,
    advantages: Sequence[float],
    pad_id: int,
    temperature: float,
    cfg: LossConfig,
    share_prompts: bool = True,
    ref_logp: torch.Tensor | None = None,
    with_entropy: bool = True,
    proximal: dict[int, torch.Tensor] | None = None,
    at: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch and its metrics (with the completions' mean entropy unless not
    ``with_entropy``: a metric that costs a pass over the (tokens x vocab) log-probs, read from one update a step).

    ``reference=None`` means a LoRA policy: the frozen reference is the same network with its adapters
    disabled. ``behaviour_logprobs=None`` treats the batch as on-policy (importance ratio 1).
    ``share_prompts``: see :func:`completion_logprobs`. ``ref_logp``: the reference's log-probs of these
    sequences (:func:`reference_logprobs`), when already known; the reference does not change between updates.
    ``proximal`` (with ``cfg.decoupled``): the proximal log-probs by micro-batch start ``at``; the first pass over
    a micro-batch in a step records its own (the policy before this update), later epochs read them. Without
    it, this pass's own log-probs are the proximal ones (right for a single update).
    """
    logp, entropy, mask = completion_logprobs(model, sequences, pad_id, temperature, share_prompts, with_entropy)
    if ref_logp is None:
        ref_logp = reference_logprobs(model, reference, sequences, pad_id, temperature, share_prompts)
    if behaviour_logprobs is None:
        behaviour = logp.detach()
    else:
        behaviour = torch.zeros_like(logp)
        for i, row in enumerate(behaviour_logprobs):
            behaviour[i, : len(row)] = torch.tensor(row, device=logp.device)
    adv = torch.tensor(list(advantages), device=logp.device)
    prox = None
    if cfg.decoupled:  # without a cache (one update) this pass is the policy the update starts from
        prox = logp.detach() if proximal is None else proximal.setdefault(at, logp.detach())
    loss, metrics = policy_loss(logp, behaviour, ref_logp, adv, mask, cfg, prox)
    if with_entropy:
        metrics["entropy"] = float(((entropy * mask).sum() / mask.sum().clamp(min=1.0)).item())
    return loss, metrics
