"""What a narrower storage dtype keeps of a teacher output, and the build's check that the output fits it.

Casting to a floating dtype rounds to nearest. With ``u`` its unit roundoff
(half its ``eps``), ``tiny`` its smallest normal number and ``max`` its
largest finite one, a value ``x`` is stored as ``x'`` with

* ``|x' - x| <= u * |x|`` when ``tiny <= |x| <= max`` (the normal range),
* ``|x' - x| <= u * tiny`` below it (gradual underflow: a value smaller than
  ``u * tiny`` becomes 0; exact zeros stay zero),
* ``x' = inf`` when ``|x|`` rounds beyond ``max`` (float16: from 65520 up).

So every sample's output is stored within ``u`` times its largest magnitude,
provided that magnitude is in the normal range. :func:`check` refuses the two
cases where that fails: a value that overflows, and a sample whose values
(not all zero) are all below ``tiny``. It does not refuse single small values
next to larger ones: a million standard normal values hold about fifty below
float16's ``tiny`` (6.1e-5), and their error (at most 3e-8) is far below that
of the sample's largest values.

==========  ===========  ===========  ============
dtype       ``u``        ``tiny``     ``max``
==========  ===========  ===========  ============
float16     2**-11       2**-14       65504
bfloat16    2**-8        2**-126      3.39e38
float32     2**-24       2**-126      3.40e38
==========  ===========  ===========  ============
"""

from __future__ import annotations

import torch

__all__: list[str] = []


def loses(source: torch.dtype, stored: torch.dtype) -> bool:
    """Whether casting ``source`` values to ``stored`` can round, overflow or underflow.

    Example:
        >>> loses(torch.float32, torch.float16), loses(torch.float16, torch.float32)
        (True, False)
    """
    if source == stored or not (source.is_floating_point and stored.is_floating_point):
        return False
    a, b = torch.finfo(source), torch.finfo(stored)
    return b.eps > a.eps or b.max < a.max or b.tiny > a.tiny


def check(leaf: torch.Tensor, stored: torch.dtype, *, where: str, pair: int, first: int) -> None:
    """Raise when the batch-first ``leaf`` does not fit ``stored`` (see the module's docstring).

    One pass over the tensor (the per-sample minimum and maximum), then work on
    one number per sample.

    Args:
        leaf: the teacher output, ``(batch, ...)``.
        stored: its storage dtype.
        where: which pair(s) and teacher point, for the message.
        pair: a pair index reading it, for the fix the message gives.
        first: the sample index of the first row, for the message.

    Raises:
        ValueError: a value overflows ``stored``, or a sample's values are all
            in its subnormal range; the message names the sample, the value
            and the fix.
    """
    if not loses(leaf.dtype, stored) or leaf.numel() == 0:
        return
    lo, hi = torch.aminmax(leaf.detach().reshape(leaf.shape[0], -1), dim=1)
    largest = torch.maximum(-lo, hi).to("cpu", torch.float64)  # NaN for a sample holding a NaN: not checked
    info = torch.finfo(stored)
    name = str(stored).removeprefix("torch.")
    over = torch.isfinite(largest) & (largest.to(stored).isinf())
    if over.any():
        i = int(torch.argmax(torch.where(over, largest, 0.0)))
        raise ValueError(
            f"{where} does not fit its storage dtype {name}: sample {first + i} has a value of magnitude "
            f"{float(largest[i]):.4g}, beyond {name}'s largest {info.max:.6g}, so it would be stored as inf. "
            f"{_fix(pair, stored)}, or scale the output down."
        )
    under = (largest > 0) & (largest < info.tiny)
    if under.any():
        i = int(torch.argmax(under.to(torch.int8)))
        raise ValueError(
            f"{where} does not fit its storage dtype {name}: the largest magnitude of sample {first + i} is "
            f"{float(largest[i]):.4g}, below {name}'s normal range (from {info.tiny:.4g}), so all its values "
            f"would lose their relative precision (those below {info.tiny * info.eps / 2:.4g} becoming 0). "
            f"{_fix(pair, stored)}, or scale the output up."
        )


def _fix(pair: int, stored: torch.dtype) -> str:
    keep = f"Keep the teacher's dtype for this pair (dtype={{{pair}: None}}, or no dtype)"
    if stored != torch.float16:
        return keep
    return f"{keep}, store it in bfloat16 (dtype={{{pair}: torch.bfloat16}}: float32's range, 2**-8 relative error)"
