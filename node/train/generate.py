"""Sampling text from a trained model: the proof that a run yielded something a user can read.

The model runs whole, stage by stage along the full path, with no key/value cache: generation here
is a sample for a report or a quick look, tens to hundreds of tokens, where recomputing the window
costs little next to writing the cache that no other code path needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowband.node.train.along_path import Stages, full_path, run_path

BYTE_VOCAB = 256


def encode_bytes(text: str) -> list[int]:
    """The byte-level tokenizer every run uses today: UTF-8 bytes are the token ids."""
    return list(text.encode("utf-8"))


def decode_bytes(tokens: Sequence[int]) -> str:
    """Token ids back to text; a sample cut inside a multi-byte character shows a replacement mark."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def check_sampling(temperature: float, top_k: int, tokens: int) -> None:
    """Refuse settings that would sample nonsense or nothing, naming the option to change."""
    if not temperature >= 0.0:
        raise ValueError(f"--temperature must be >= 0 (0: always the most likely token), got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: no limit), got {top_k}")
    if tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {tokens}")


@torch.no_grad()
def sample(stages: Stages, prompt: Sequence[int], *, tokens: int, max_seq_len: int, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0) -> list[int]:
    """``tokens`` new token ids after ``prompt`` (greedy at temperature 0), the window cut to the last
    ``max_seq_len`` tokens (the rotary tables go no further)."""
    check_sampling(temperature, top_k, tokens)
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    num_stages = len(stages)
    path = full_path(num_stages) if num_stages > 1 else [0, 0]
    generator = torch.Generator().manual_seed(seed)
    out = [int(t) for t in prompt]
    for _ in range(tokens):
        window_1T = torch.tensor([out[-max_seq_len:]], dtype=torch.long)
        logits_V = run_path(stages, path, window_1T)[0, -1].float()
        if temperature == 0.0:
            out.append(int(logits_V.argmax()))
            continue
        logits_V = logits_V / temperature
        if 0 < top_k < logits_V.numel():
            kth = torch.topk(logits_V, top_k).values[-1]
            logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
        probs_V = torch.softmax(logits_V, dim=-1)
        out.append(int(torch.multinomial(probs_V, 1, generator=generator)))
    return out[len(prompt):]
