"""A1111-style prompt weights and prompts longer than CLIP's 77 tokens.

Syntax (as in the AUTOMATIC1111 web UI):
- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1;
- `(text:1.4)` sets an explicit multiplier; nesting multiplies, `((a:1.5))` -> 1.65;
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters.
Unlike A1111, brackets that are never closed (or closers without a matching opener) stay in the
text literally instead of silently weighting the rest of the prompt.

Long prompts are split into chunks of 75 tokens; each chunk gets BOS/EOS, is padded to 77 and
encoded separately, and the chunk embeddings are concatenated along the sequence axis (so the
UNet cross-attends over 77*n tokens). Each token embedding is scaled by its weight, then the
chunk is rescaled so its mean equals the unweighted mean (A1111 does this so weights change the
relative emphasis rather than the overall magnitude). A1111 takes that mean over the whole batch;
here it is per prompt, so a prompt's embedding does not depend on the others in its batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where it runs: the generate stage module loads without torch
    import torch

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = 75  # 77 minus BOS and EOS

# One lexeme per match, tried in order: escapes, openers, an explicit weight that closes a round
# bracket, closers, plain text, and a lone ':' or '\\'.
_LEXEME = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\])
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+)
  | (?P<other>[:\\])
    """,
    re.X,
)


@dataclass
class _Segment:
    text: str
    weight: float = 1.0


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """Split an A1111-weighted prompt into (text, weight) pieces, adjacent equal weights merged.

    >>> parse_prompt_weights("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    segments: list[_Segment] = []
    # Open brackets: (kind, index of the placeholder segment holding the bracket's own text).
    stack: list[tuple[str, int]] = []

    def close(multiplier: float) -> None:
        _, start = stack.pop()
        segments[start].text = ""  # the bracket was used as syntax, not text
        for seg in segments[start + 1:]:
            seg.weight *= multiplier

    for m in _LEXEME.finditer(prompt):
        kind = m.lastgroup
        lexeme = m.group(0)
        if kind == "escape":
            segments.append(_Segment(lexeme[1]))
        elif kind == "open":
            # A placeholder keeps the bracket in place: it becomes literal text if never closed.
            stack.append((lexeme, len(segments)))
            segments.append(_Segment(lexeme))
        elif kind == "weight":
            if stack and stack[-1][0] == "(":
                close(float(m.group("weight")))
            else:
                segments.append(_Segment(lexeme))
        elif kind == "close":
            if stack and stack[-1][0] == ("(" if lexeme == ")" else "["):
                close(ROUND_MULTIPLIER if lexeme == ")" else SQUARE_MULTIPLIER)
            else:
                segments.append(_Segment(lexeme))
        else:  # text, or a ':' / '\\' that is not part of any syntax
            segments.append(_Segment(lexeme))

    merged: list[tuple[str, float]] = []
    for seg in segments:
        if not seg.text:
            continue
        if merged and merged[-1][1] == seg.weight:
            merged[-1] = (merged[-1][0] + seg.text, seg.weight)
        else:
            merged.append((seg.text, seg.weight))
    return merged


def tokenize_weighted(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids (no BOS/EOS) of a weighted prompt and one weight per token."""
    pieces = parse_prompt_weights(prompt)
    if not pieces:
        return [], []
    # One batched call; no truncation: long prompts are chunked afterwards.
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    ids: list[int] = []
    weights: list[float] = []
    for (_, weight), piece_ids in zip(pieces, encoded):
        ids.extend(piece_ids)
        weights.extend([weight] * len(piece_ids))
    return ids, weights


def chunk_tokens(
    ids: list[int], weights: list[float], bos: int, eos: int, pad: int, n_chunks: int | None = None
) -> tuple[list[list[int]], list[list[float]]]:
    """Cut tokens into chunks of 75, each framed as BOS + tokens + EOS + padding to 77.

    `n_chunks` (at least the number needed) adds empty chunks at the end, so two prompts can be
    given the same length.
    """
    needed = chunks_needed(ids)
    n_chunks = needed if n_chunks is None else n_chunks
    if n_chunks < needed:
        raise ValueError(f"{len(ids)} tokens need {needed} chunks, asked for {n_chunks}")
    chunk_ids, chunk_weights = [], []
    for c in range(n_chunks):
        body = ids[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        body_w = weights[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        n_pad = CHUNK_TOKENS - len(body)
        chunk_ids.append([bos, *body, eos] + [pad] * n_pad)
        chunk_weights.append([1.0, *body_w, 1.0] + [1.0] * n_pad)
    return chunk_ids, chunk_weights


def _special_ids(tokenizer) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no BOS/EOS token; a CLIP tokenizer is expected")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def chunks_needed(ids: list[int]) -> int:
    """How many 77-token chunks a prompt of these token ids takes."""
    return max(1, math.ceil(len(ids) / CHUNK_TOKENS))


def count_chunks(tokenizer, prompt: str) -> int:
    """How many 77-token chunks `prompt` takes."""
    return chunks_needed(tokenize_weighted(tokenizer, prompt)[0])


def encode_weighted_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    n_chunks: int | list[int] | None = None,
    restore_mean: bool = True,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Encode weighted, possibly long prompts: one (n_chunks * 77, hidden) float32 tensor each.

    `n_chunks` pads each prompt with empty chunks to that many (an int for all, or one per prompt);
    None uses each prompt's own need. All chunks of all prompts go through the text encoder in one
    batch.
    """
    tokens = [tokenize_weighted(tokenizer, p) for p in prompts]
    return encode_tokenized(tokenizer, text_encoder, tokens, n_chunks, restore_mean, device)


def encode_tokenized(
    tokenizer,
    text_encoder,
    tokens: list[tuple[list[int], list[float]]],
    n_chunks: int | list[int] | None = None,
    restore_mean: bool = True,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """`encode_weighted_prompts` for prompts already tokenized by `tokenize_weighted`, so a caller
    that needs the chunk counts first tokenizes each prompt once."""
    import torch

    bos, eos, pad = _special_ids(tokenizer)
    device = device if device is not None else text_encoder.device
    if isinstance(n_chunks, int) or n_chunks is None:
        n_chunks = [n_chunks] * len(tokens)
    if len(n_chunks) != len(tokens):
        raise ValueError(f"{len(tokens)} prompts but {len(n_chunks)} chunk counts")

    all_ids: list[list[int]] = []
    all_weights: list[list[float]] = []
    per_prompt: list[int] = []
    for (ids, weights), n in zip(tokens, n_chunks):
        c_ids, c_weights = chunk_tokens(ids, weights, bos, eos, pad, n)
        all_ids.extend(c_ids)
        all_weights.extend(c_weights)
        per_prompt.append(len(c_ids))
    if not all_ids:
        return []

    with torch.inference_mode():
        input_ids = torch.tensor(all_ids, dtype=torch.long, device=device)
        hidden = text_encoder(input_ids)[0].float()  # (chunks, 77, hidden): last hidden state
        weights = torch.tensor(all_weights, dtype=torch.float32, device=device)
        weighted = apply_token_weights(hidden, weights, restore_mean=restore_mean)

    out, start = [], 0
    for n in per_prompt:
        out.append(weighted[start:start + n].reshape(n * hidden.shape[1], hidden.shape[2]))
        start += n
    return out


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor, restore_mean: bool = True) -> torch.Tensor:
    """Scale (chunks, tokens, dim) embeddings by (chunks, tokens) weights.

    With `restore_mean`, each chunk is rescaled afterwards to its original mean. Chunks whose
    weights are all 1 are returned unchanged (bit for bit). The rescale is skipped for a chunk whose
    weighted mean is ~0, where the ratio is meaningless (e.g. an untrained encoder whose final
    LayerNorm has zero bias).
    """
    import torch

    scaled = hidden * weights.unsqueeze(-1)
    if restore_mean:
        old_mean = hidden.mean(dim=(1, 2), keepdim=True)
        new_mean = scaled.mean(dim=(1, 2), keepdim=True)
        scale_ref = hidden.abs().mean(dim=(1, 2), keepdim=True)
        well_defined = new_mean.abs() > 1e-4 * scale_ref
        ratio = torch.where(well_defined, old_mean / torch.where(well_defined, new_mean, 1.0), 1.0)
        scaled = scaled * ratio
    unweighted = (weights == 1.0).all(dim=1)
    return torch.where(unweighted[:, None, None], hidden, scaled)
