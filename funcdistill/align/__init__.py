"""Distillation across tokenizers: aligning two tokenizations of the same text.

A teacher and a student from different model families do not share a
vocabulary, and they cut the same text into different tokens. This subpackage
relates them:

- `align` finds the *groups*: the smallest spans of text that both
  tokenizations cover with whole tokens, from the character offsets of a fast
  tokenizer. It returns an `Alignment`, a NamedTuple of tensors.
- `at_groups` gathers each side's logits at its groups' last tokens, where
  both models have read the same text: the inputs of a loss that allows two
  vocabularies (:func:`funcdistill.losses.uld_loss`).
- `group_logprobs` merges each side's token log-probabilities into group
  log-probabilities (a group's probability is the product of its tokens').
- `shared_vocab` maps the tokens whose strings are equal in both
  vocabularies (byte-level ``'Ġ'`` and SentencePiece ``'▁'`` both mean a leading space).

**Chat templates** differ between model families, so two rendered
conversations differ outside the assistant's reply: align the reply only.
Render each side's conversation with its own template, find where the reply
starts in each rendered text (``rendered.index(reply)``), subtract that start
from the side's offsets, clip them to the reply (``offsets.clamp(0, len(reply))``)
and mask out the tokens left empty (``offsets[..., 1] > offsets[..., 0]``, with the
attention mask). A token that straddles the reply's start (a template's space
joined to the first word, as Llama-2's ``'▁t'``) is kept, so its probability
counts in :func:`group_logprobs`. Both sides' offsets are then positions in the
same text (the recipe in the LLM page's cross-tokenizer section). On
policy, the student's generated reply is decoded and tokenised again for the
teacher, and aligned the same way.

`align` and `shared_vocab` are data preparation (plain Python, once per batch
or once per pair of tokenizers); `at_groups` and `group_logprobs` are
differentiable and run under :func:`torch.func.grad`, :func:`torch.func.vmap`
and ``torch.compile``. Nothing here imports a tokenizer library.

Example:
    >>> import torch
    >>> from funcdistill.align import align, at_groups
    >>> # 'hello world' as 'hello', 'Ġworld' (teacher) and 'he', 'llo', 'world' (student)
    >>> a = align(torch.tensor([[[0, 5], [5, 11]]]), torch.tensor([[[0, 2], [2, 5], [6, 11]]]))
    >>> a.student_group
    tensor([[0, 0, 1]])
    >>> at_groups(torch.randn(1, 3, 7), a.student_last).shape  # student logits after 'hello', 'hello world'
    torch.Size([1, 2, 7])
"""

from __future__ import annotations

from funcdistill.align._alignment import Alignment, align
from funcdistill.align._groups import at_groups, group_logprobs
from funcdistill.align._vocab import shared_vocab

__all__ = ["Alignment", "align", "at_groups", "group_logprobs", "shared_vocab"]
