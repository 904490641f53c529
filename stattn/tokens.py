"""Prompt words -> key (token) indices of the text encoder's 77-token sequence.

The released Attention Regulation code tokenises each target word and takes the *first*
occurrence of each sub-token in the padded prompt, so "a cat and a cat" can never address the
second cat, and a short word can match inside another word's tokens. Here a target (a word or a
phrase) must match a run of whole tokens, and repeated targets take successive occurrences:
``token_indices(tok, "a cat and a cat", ["cat", "cat"]) == [2, 5]``.

CLIP's BPE marks the last piece of every word (``cat</w>``), and a word is tokenised the same
wherever it stands, so matching the target's token sequence inside the prompt's matches whole
words only ("cat" does not match inside "cats" or "category").
"""
from __future__ import annotations

from typing import Sequence, Union

__all__ = ["token_indices", "eos_index", "prompt_ids"]

SUBTOKENS = ("all", "first")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids as the pipeline encodes them: SOS at 0, truncated and padded to the
    tokenizer's model_max_length (77 for CLIP)."""
    _check_prompt(prompt)
    return list(tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True).input_ids)


def eos_index(tokenizer, prompt: str) -> int:
    """Index of the first end-of-text token after the prompt (SOS is index 0). The released code
    keeps this column's probability unedited, with SOS's."""
    ids = prompt_ids(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    for i in range(1, len(ids)):
        if ids[i] == eos:
            return i
    raise ValueError(f"prompt: no end-of-text token in the encoded prompt {prompt!r} (tokenizer without EOS?)")


def token_indices(tokenizer, prompt: str, words: Union[str, Sequence[str]], *,
                  subtokens: str = "all") -> list[int]:
    """Key indices of ``words`` (target words or phrases) in ``prompt``.

    - A target that the tokenizer splits into several tokens (a rare word, or a phrase such as
      "red car") must appear as that contiguous run of tokens; ``subtokens="all"`` returns all of
      its indices (what the released code uses), ``"first"`` only the first one.
    - Targets are matched in the order given and each takes the first occurrence not already
      taken by an earlier target, so repeating a word addresses its successive occurrences.
    - Only the part of the prompt that survives truncation (between SOS and EOS) is searched.
    Raises ValueError naming the word and the prompt when a target is not in the prompt (or
    occurs fewer times than it is asked for).
    """
    if isinstance(words, str):
        words = [words]
    if not isinstance(words, (list, tuple)) or not words:
        raise ValueError(f"words: expected a non-empty list of target words, got {words!r}")
    if subtokens not in SUBTOKENS:
        raise ValueError(f"subtokens: expected one of {SUBTOKENS}, got {subtokens!r}")
    ids = prompt_ids(tokenizer, prompt)
    body = ids[1:eos_index(tokenizer, prompt)]        # the prompt's own tokens; offset 1 for SOS
    taken = [False] * len(body)
    out: list[int] = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"words: each target must be a non-empty string, got {word!r}")
        pattern = list(tokenizer(word, add_special_tokens=False).input_ids)
        start = _find_free_run(body, taken, pattern)
        if start is None:
            count = sum(1 for s in range(len(body)) if body[s:s + len(pattern)] == pattern)
            why = ("is not in the prompt" if count == 0 else
                   f"is asked for more times than the {count} time(s) it occurs in the prompt")
            raise ValueError(f"words: target {word!r} {why} {prompt!r}"
                             + (" (after truncation to the tokenizer's length)" if count == 0 else ""))
        for j in range(start, start + len(pattern)):
            taken[j] = True
        run = [1 + j for j in range(start, start + len(pattern))]
        out.extend(run if subtokens == "all" else run[:1])
    return out


def _find_free_run(body: list[int], taken: list[bool], pattern: list[int]):
    n = len(pattern)
    if n == 0:
        return None
    for s in range(len(body) - n + 1):
        if body[s:s + n] == pattern and not any(taken[s:s + n]):
            return s
    return None


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
