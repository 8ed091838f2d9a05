"""The policy forward pass used by every trainer: log-probabilities of completion tokens.

``forward_rows`` is the one entry point the recipes call (training passes), and ``forward_in_chunks``
runs it over a whole rollout without gradients (pi_old, pi_ref, V_old). Both take the rollout as a
``TokenBatch`` (each prompt once, its answers group-contiguous), run under the run's autocast dtype,
and work for a plain causal LM or for PPO's policy-and-value module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..algorithms import gather_logprobs
from .loading import autocast_context, cache_keyword


@dataclass
class TokenBatch:
    """A rollout's tokens: B prompts once each, and their N = B * group_size answers, group-contiguous."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [N, T] right-padded
    completion_mask: torch.Tensor  # [N, T] 1 on generated tokens up to and including EOS
    group_size: int

    def row_tokens(self) -> torch.Tensor:
        """[N] tokens one answer costs in a forward: its own plus its prompt's (an upper bound when shared)."""
        return self.completion_mask.sum(1) + self.prompt_mask.sum(1).repeat_interleave(self.group_size)


def forward_rows(model, batch: TokenBatch, rows: torch.Tensor, *, temperature: float, layout: str = "auto",
                 autocast: torch.dtype | None = None, with_entropy: bool = False):
    """(log pi(o_t | q, o_<t), entropy or None, V(s_t) or None) for answer ``rows``, each [len(rows), T'].

    T' is the longest selected answer. A model that returns values (PPO's ``PolicyAndValue``) runs the
    padded [prompt | answer] layout and also gives V; a causal LM runs ``grouped_logprobs`` in
    ``layout``. Logits are divided by ``temperature``, so these are the sampler's log-probabilities.
    """
    device = batch.completion_ids.device
    rows = rows.to(device)
    with autocast_context(device, autocast):
        if getattr(model, "returns_values", False):
            groups = torch.div(rows, batch.group_size, rounding_mode="floor")
            return model(*_trim_left(batch.prompt_ids[groups], batch.prompt_mask[groups]),
                         *_trim_right(batch.completion_ids[rows], batch.completion_mask[rows]),
                         temperature, with_entropy)
        logp, entropy = grouped_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                         batch.completion_mask, rows, batch.group_size, temperature, with_entropy,
                                         layout)
        return logp, entropy, None


@torch.no_grad()
def forward_in_chunks(model, batch: TokenBatch, chunks: list[torch.Tensor], **kwargs):
    """(log-probs [N, T], values [N, T] or None) of every answer token, one ``forward_rows`` per row chunk."""
    logp_out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.completion_ids.device)
    values_out = None
    for rows in chunks:
        logp, _, values = forward_rows(model, batch, rows, **kwargs)
        logp_out[rows, :logp.size(1)] = logp.float()
        if values is not None:
            if values_out is None:
                values_out = torch.zeros_like(logp_out)
            values_out[rows, :values.size(1)] = values.float()
    return logp_out, values_out


def split_rows(rows: torch.Tensor, pieces: int, row_tokens: torch.Tensor, max_tokens: int,
               skip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Split ``rows`` into ``pieces`` equal micro-batches, drop the ``skip``ped rows, then cut each so that
    its rows' ``row_tokens`` sum to at most ``max_tokens`` (0: no cut). Order is kept, so the answers of
    one prompt stay together and its prompt is run once per micro-batch it spans."""
    out = []
    for piece in rows.chunk(pieces):
        if skip is not None:
            piece = piece[~skip[piece]]
        if piece.numel() == 0:
            continue
        if not max_tokens:
            out.append(piece)
            continue
        start, total = 0, 0
        for i, tokens in enumerate(row_tokens[piece].tolist()):
            if total and total + tokens > max_tokens:
                out.append(piece[start:i])
                start, total = i, 0
            total += tokens
        out.append(piece[start:])
    return out


def trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Drop prompt columns that are padding in every row and completion columns past the longest answer."""
    return (*_trim_left(prompt_ids, prompt_mask), *_trim_right(completion_ids, completion_mask))


def token_logprobs(logits, tokens, temperature: float, with_entropy: bool):
    """(log-probabilities of ``tokens`` under logits / temperature, per-token entropy or None), [R, T] each.

    logits: [R, S, V] with S >= T, column t predicting tokens[:, t] (trailing columns are ignored, so a
    model's ``logits_to_keep=T + 1`` output is passed as is, without a copy). See ``gather_logprobs``.
    """
    R, S, V = logits.shape
    T = tokens.size(1)
    columns = (torch.arange(R, device=logits.device)[:, None] * S
               + torch.arange(T, device=logits.device)[None]).flatten()
    logp, column_entropy = gather_logprobs(logits.reshape(R * S, V), columns, tokens.flatten(), temperature,
                                           with_entropy)
    return logp.view(R, T), (column_entropy[columns].view(R, T) if with_entropy else None)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature: float = 1.0, with_entropy: bool = False):
    """log pi(o_t | q, o_<t) for every completion token: [N, T]; optionally the per-token entropy [N, T].

    Logits are divided by the sampling temperature, so these are the same log-probabilities the
    sampler recorded. Only the completion positions' logits are computed (``logits_to_keep``), and
    log-probabilities are gathered without building the full log-softmax.
    """
    completion_len = completion_ids.size(1)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_len + 1,
    ).logits  # [N, T + 1, V]: column t predicts completion token t, the last column is unused
    return token_logprobs(logits, completion_ids, temperature, with_entropy)


def _trim_left(ids, mask):
    keep_from = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else mask.size(1)
    return ids[:, keep_from:], mask[:, keep_from:]


def _trim_right(ids, mask):
    width = max(int(mask.sum(1).max()) if mask.numel() else 0, 1)
    return ids[:, :width], mask[:, :width]


def shared_prompt_logprobs(model, prompt_ids, prompt_mask, row_prompt, completion_ids, completion_mask,
                           temperature: float = 1.0, with_entropy: bool = False):
    """Same result as ``completion_logprobs`` on [prompt[row_prompt] | completion], computing each prompt once.

    The G answers to one prompt share its prefix, so the prompt is run once ([B, P]), its KV cache is
    gathered per answer (``row_prompt`` [M] maps answer rows to prompts) and the completions attend to
    it. Gathering is differentiable, so gradients reach the prompt's keys and values exactly as in the
    padded [M, P + T] forward, at a cost of B*P + M*T tokens instead of M*(P + T).
    """
    cache_kw = cache_keyword(model)
    cache = DynamicCache()
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{cache_kw: cache})
    # the prompt's last position predicts token 0 of each of its answers
    first_logp, first_entropy = gather_logprobs(out.logits[:, -1], row_prompt, completion_ids[:, 0], temperature,
                                                with_entropy)
    logp, entropy = first_logp[:, None], (first_entropy[row_prompt][:, None] if with_entropy else None)
    completion_len = completion_ids.size(1)
    if completion_len > 1:
        cache.batch_select_indices(row_prompt)
        inputs = completion_ids[:, :-1]
        attention_mask = torch.cat([prompt_mask[row_prompt], completion_mask[:, :-1]], dim=1)
        position_ids = positions[row_prompt, -1:] + 1 + torch.arange(completion_len - 1, device=inputs.device)
        rest = model(input_ids=inputs, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, **{cache_kw: cache}).logits  # [M, T - 1, V]
        rest_logp, rest_entropy = token_logprobs(rest, completion_ids[:, 1:], temperature, with_entropy)
        logp = torch.cat([logp, rest_logp], dim=1)
        entropy = torch.cat([entropy, rest_entropy], dim=1) if with_entropy else None
    return logp, entropy


def packed_group_logprobs(model, prompt_ids, prompt_mask, row_prompt, completion_ids, completion_mask,
                          temperature: float = 1.0, with_entropy: bool = False):
    """Same result as ``completion_logprobs`` on [prompt[row_prompt] | completion], with no repeated prompt
    and no padding between answers.

    Each prompt becomes one packed row: the prompt, then the answers to it back to back,

        [pad.. | q_1..q_P | a_1 (len n_1) | a_2 (len n_2) | ... | pad..]

    with position ids that restart at P for every answer, and a block mask: a prompt token sees the prompt
    tokens before it; an answer token sees the whole prompt and the tokens before it in its own answer.
    Every token therefore has exactly the positions and visible keys it has in the padded forward, so
    log-probs and gradients are the same, at a cost of B*P + sum(n_i) tokens. Logits are kept only for the
    prompt's last position (which predicts every answer's first token) and the answer positions, and
    log-probs are gathered from one logsumexp per position. Needs an attention that takes a custom 4D
    mask (``sdpa`` or ``eager``); ``row_prompt`` [M] maps answer rows to the B prompts.
    """
    device = completion_ids.device
    B, P = prompt_ids.shape
    M, T = completion_ids.shape
    lengths = completion_mask.sum(1).tolist()
    # where each answer starts after its prompt, in answer order within its row
    offsets, used = [0] * M, [0] * B
    for i, b in enumerate(row_prompt.tolist()):
        offsets[i], used[b] = used[b], used[b] + lengths[i]
    L = P + max(used)

    # token ids, positions and segments (-1 padding, 0 prompt, i + 1 answer i) of the packed rows
    input_ids = torch.zeros(B, L, dtype=prompt_ids.dtype, device=device)
    input_ids[:, :P] = prompt_ids
    prompt_len = prompt_mask.sum(1)
    positions = torch.zeros(B, L, dtype=torch.long, device=device)
    positions[:, :P] = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    segment = torch.full((B, L), -1, dtype=torch.long, device=device)
    segment[:, :P] = torch.where(prompt_mask.bool(), 0, -1)
    # one entry per answer token: (answer, t) -> packed row and column
    answer, t = completion_mask.bool().nonzero(as_tuple=True)
    row = row_prompt.to(device)[answer]
    col = P + torch.tensor(offsets, device=device)[answer] + t
    input_ids[row, col] = completion_ids[answer, t]
    positions[row, col] = prompt_len[row] + t
    segment[row, col] = answer + 1

    real = segment >= 0
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    visible = causal & real[:, None, :] & ((k_seg == 0) | (k_seg == q_seg))
    # padding queries see themselves, so no row of the mask is empty (an empty row gives NaN in SDPA)
    visible |= torch.eye(L, dtype=torch.bool, device=device) & ~real[:, :, None]
    mask = _attention_mask_for(model, visible[:, None])

    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=L - P + 1).logits  # [B, L - P + 1, V]: columns P-1 .. L-1
    # answer token t is predicted by its previous column; token 0 by the prompt's last column (kept index 0)
    predictor = torch.where(t > 0, col - (P - 1) - 1, 0)
    kept = L - P + 1
    columns = row * kept + predictor
    picked, column_entropy = gather_logprobs(logits.reshape(B * kept, -1), columns, completion_ids[answer, t],
                                             temperature, with_entropy)
    logp = torch.zeros(M, T, dtype=picked.dtype, device=device).index_put((answer, t), picked)
    if not with_entropy:
        return logp, None
    entropy = torch.zeros(M, T, dtype=picked.dtype, device=device)
    entropy[answer, t] = column_entropy[columns]
    return logp, entropy


def _attention_mask_for(model, visible: torch.Tensor) -> torch.Tensor:
    """A boolean [B, 1, Q, K] mask (True = attend) in the form the model's attention takes: boolean for
    SDPA, additive (0 or the dtype's minimum) for the eager implementation."""
    if attention_implementation(model) == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min)
    return visible


def attention_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


FORWARD_LAYOUTS = ("auto", "packed", "shared", "padded")


def choose_layout(model, layout: str, prompt_len: int, row_prompt: list[int], lengths: list[int]) -> str:
    """The training forward for one batch: ``packed``, ``shared`` or ``padded`` (see ``grouped_logprobs``).

    ``auto`` takes ``packed`` when the model's attention accepts a custom mask and its estimated cost is
    lower than ``shared``'s. The estimate, in units of one (query, key) attention pair, is

        cost = 10 d * tokens + pairs  (+ 2 d per answer token for ``shared``: gathering the prompt's KV
                                       cache per answer and joining the logits)

    with d the hidden size, calibrated on a 2-core CPU (fp32 forward+backward of 1.1M- and 20M-parameter
    models). Packing drops the padding between answers and those copies, but its attention is dense over
    a whole packed row, so long answers in large groups keep the shared-prompt forward.
    """
    if layout not in FORWARD_LAYOUTS:
        raise ValueError(f"forward layout must be one of {', '.join(FORWARD_LAYOUTS)}; got {layout!r}")
    if layout != "auto":
        return layout
    if attention_implementation(model) not in ("sdpa", "eager"):
        return "shared"
    d = getattr(getattr(model, "config", None), "hidden_size", None) or 256
    per_prompt: dict[int, int] = {}
    for b, n in zip(row_prompt, lengths):
        per_prompt[b] = per_prompt.get(b, 0) + n
    B, M, T = len(per_prompt), len(lengths), max(lengths, default=0)
    L = prompt_len + max(per_prompt.values(), default=0)
    packed = 10 * d * B * L + B * L * L
    shared = 10 * d * (B * prompt_len + M * T) + B * prompt_len ** 2 + M * T * (prompt_len + T) + 2 * d * M * T
    return "packed" if packed <= shared else "shared"


def grouped_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows, group_size: int,
                     temperature: float = 1.0, with_entropy: bool = False, layout: str = "auto"):
    """Log-probs (and entropy) of completion ``rows`` of a rollout whose prompts are given once per group.

    prompt_ids/mask: [B, P] one row per prompt; completion_ids/mask: [B * G, T], group-contiguous.
    Returns tensors [len(rows), T'] where T' is the longest of the selected completions. ``layout``:
    ``padded`` runs [prompt | answer] per answer (the straightforward forward); ``shared`` runs each
    prompt once and gathers its KV cache per answer; ``packed`` runs one row per prompt holding the prompt
    and its answers back to back; ``auto`` picks the cheaper of the last two (``choose_layout``). All
    give the same values and gradients.
    """
    rows = rows.to(completion_ids.device)
    groups = torch.div(rows, group_size, rounding_mode="floor")
    completion_ids, completion_mask = _trim_right(completion_ids[rows], completion_mask[rows])
    if layout == "padded":
        p_ids, p_mask = _trim_left(prompt_ids[groups], prompt_mask[groups])
        return completion_logprobs(model, p_ids, p_mask, completion_ids, completion_mask, temperature,
                                   with_entropy)
    unique, row_prompt = torch.unique(groups, return_inverse=True)
    p_ids, p_mask = _trim_left(prompt_ids[unique], prompt_mask[unique])
    layout = choose_layout(model, layout, p_ids.size(1), row_prompt.tolist(), completion_mask.sum(1).tolist())
    forward = packed_group_logprobs if layout == "packed" else shared_prompt_logprobs
    return forward(model, p_ids, p_mask, row_prompt, completion_ids, completion_mask, temperature, with_entropy)
