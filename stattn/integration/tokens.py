"""Prompt words -> key (token) indices of the text encoder's 77-token sequence.

The released Attention Regulation code tokenises each target word and takes the *first*
occurrence of each sub-token in the padded prompt, so "a cat and a cat" can never address the
second cat, and a short word can match inside another word's tokens. Here a target (a word or a
phrase) must match a run of whole words of the prompt, and repeated targets take successive
occurrences: ``token_indices(tok, "a cat and a cat", ["cat", "cat"]) == [2, 5]``.

Word boundaries come from the tokenizer itself: its ``word_ids`` (the pre-tokenizer's words, as
``return_offsets_mapping`` gives their character spans), so "fish" matches neither inside
"catfish" (tokens ``cat`` ``fish</w>``) nor "cats". A tokenizer without them (a slow, pure-Python
one) falls back on CLIP's BPE convention: a word's last piece ends in ``</w>``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

__all__ = ["token_indices", "eos_index", "prompt_ids", "prompt_words", "check_targets"]

SUBTOKENS = ("all", "first")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids as the pipeline encodes them: SOS at 0, truncated and padded to the
    tokenizer's model_max_length (77 for CLIP)."""
    _check_prompt(prompt)
    return list(_encode(tokenizer, prompt).input_ids)


def eos_index(tokenizer, prompt: str) -> int:
    """Index of the first end-of-text token after the prompt (SOS is index 0). The released code
    keeps this column's probability unedited, with SOS's."""
    return _eos(tokenizer, prompt_ids(tokenizer, prompt), prompt)


def _eos(tokenizer, ids: list, prompt: str) -> int:
    eos = tokenizer.eos_token_id
    for i in range(1, len(ids)):
        if ids[i] == eos:
            return i
    raise ValueError(f"prompt: no end-of-text token in the encoded prompt {prompt!r} (tokenizer without EOS?)")


def prompt_words(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """The words of the prompt that survive its truncation, in order, as the tokenizer splits
    them: (the word's text, its key indices). Punctuation is a word of its own. The text is the
    prompt's own with a fast tokenizer (its offsets), the decoded, normalised (lower-case) form without."""
    _check_prompt(prompt)
    return _words(tokenizer, prompt, _encode(tokenizer, prompt))


def _words(tokenizer, prompt: str, enc) -> list[tuple[str, list[int]]]:
    """prompt_words of the encoding ``enc`` (_encode's) of ``prompt``."""
    ids = list(enc.input_ids)
    if tokenizer.is_fast:
        word = enc.word_ids()
        starts_word = lambda i: word[i] != word[i - 1]           # noqa: E731
    else:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        starts_word = lambda i: pieces[i - 1].endswith("</w>")   # noqa: E731
    groups: list = []
    for i in range(1, _eos(tokenizer, ids, prompt)):
        if i == 1 or starts_word(i):
            groups.append([i])
        else:
            groups[-1].append(i)
    if tokenizer.is_fast:
        spans = enc.offset_mapping
        return [(prompt[spans[cols[0]][0]:spans[cols[-1]][1]], cols) for cols in groups]
    return [(tokenizer.decode([ids[i] for i in cols]).strip(), cols) for cols in groups]


def token_indices(tokenizer, prompt: str, words: Union[str, Sequence[str]], *,
                  subtokens: str = "all") -> list[int]:
    """Key indices of ``words`` (target words or phrases) in ``prompt``.

    - A target is matched as a run of whole words of the prompt with the same tokens (so case and
      spacing follow the tokenizer's normalisation); a target the tokenizer splits into several
      tokens (a rare word, or a phrase such as "red car") gives, with ``subtokens="all"``, all of
      its indices (what the released code uses), with ``"first"`` only the first one.
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
    _check_prompt(prompt)
    enc = _encode(tokenizer, prompt)                          # one encoding for ids, words and EOS
    ids = list(enc.input_ids)
    starts = [cols[0] for _, cols in _words(tokenizer, prompt, enc)]
    bounds = set(starts) | {_eos(tokenizer, ids, prompt)}     # where a word starts or the prompt ends
    taken: set = set()
    out: list[int] = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"words: each target must be a non-empty string, got {word!r}")
        pattern = list(tokenizer(word, add_special_tokens=False).input_ids)
        runs = [s for s in starts if ids[s:s + len(pattern)] == pattern and s + len(pattern) in bounds] if pattern else []
        free = [s for s in runs if not taken.intersection(range(s, s + len(pattern)))]
        if not free:
            why = ("is not in the prompt" if not runs else
                   f"is asked for more times than the {len(runs)} time(s) it occurs in the prompt")
            raise ValueError(f"words: target {word!r} {why} {prompt!r}"
                             + (" (as whole words, after truncation to the tokenizer's length)" if not runs else ""))
        run = list(range(free[0], free[0] + len(pattern)))
        taken.update(run)
        out.extend(run if subtokens == "all" else run[:1])
    return out


def _encode(tokenizer, prompt: str):
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     **({"return_offsets_mapping": True} if tokenizer.is_fast else {}))


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")


def check_targets(targets, token_indices) -> Optional[list]:
    """A method's ``targets=`` (words of the prompt) against its ``token_indices=`` (key columns):
    exactly one of them given; targets as a non-empty list of non-empty strings (one string: a list
    of one), or None when the indices are given. The indices are the method's to check."""
    if (targets is None) == (token_indices is None):
        raise ValueError("targets / token_indices: give exactly one of them (target words of the prompt, "
                         f"or key indices), got targets={targets!r}, token_indices={token_indices!r}")
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None:
        if not isinstance(targets, (list, tuple)) or not targets or \
                not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"targets: expected a non-empty list of non-empty strings, got {targets!r}")
        targets = list(targets)
    return targets
