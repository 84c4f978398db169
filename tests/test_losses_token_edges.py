"""Token losses at their edges: no tokens, mixed precision, stored top-k indices.

"Every token loss" here is the three losses on logits (generalized JSD, skew KL,
top-k KL) and the two fused ones on hidden states, at every reduction each
accepts. The float64 references are the same losses on float64 copies of the
inputs *after* their rounding to bfloat16; that float64 path is checked against
plain-Python definitions in tests/test_losses_divergence.py.

Tolerances. Inputs are rounded to bfloat16 once, before both the loss and the
reference see them, so that rounding (2**-8 relative) is common to both and
only the loss's own arithmetic is compared. A loss computed in float32 (the
wider dtype) is then within a few float32 roundings (~1e-7 relative, each
term O(1)) of float64: rtol 1e-5 / atol 1e-6. A loss computed in bfloat16
would be off by ~2**-8 = 4e-3 relative, 400 times more, so the tolerance
tells the two apart. A gradient returned in bfloat16 (for a bfloat16 input)
is the float32 gradient rounded once: rtol 2**-8.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import grad

from funcdistill import losses as L

V, H = 7, 5
F32 = {"rtol": 1e-5, "atol": 1e-6}
BF16_ONCE = {"rtol": 2.0**-8, "atol": 1e-6}  # one rounding to bfloat16 (8 significant bits)
BF16, F32_T = torch.bfloat16, torch.float32


pytestmark = pytest.mark.usefixtures("seed")


def exact_head(leading, dtype, *, scale=1):
    """Hidden states in {-1, 0, 1}, weight and bias in multiples of 1/8 up to 2: every logit is a multiple of
    1/8 below 12 in size, exact in bfloat16, so a head's matmul is exact in any dtype and any summation order."""
    hidden = torch.randint(-1, 2, (*leading, H)).to(dtype)
    weight = (torch.randint(-16, 17, (V, H)) / 8 * scale).to(dtype)
    bias = (torch.randint(-16, 17, (V,)) / 8).to(dtype)
    return hidden, weight, bias


def _linear(hidden, weight, bias):
    return torch.nn.functional.linear(hidden, weight, bias)


def _topk(hidden, weight, bias, k=3):
    """A teacher head's stored top-k log-probabilities and indices."""
    return _linear(hidden, weight, bias).log_softmax(-1).topk(k)


# every token loss as f(teacher head, student hidden, student weight, student bias, **kw)
TOKEN_LOSSES = {
    "jsd beta=0": lambda t, h, w, b, **kw: L.generalized_jsd_loss(_linear(*t), _linear(h, w, b), beta=0.0, **kw),
    "jsd beta=0.5": lambda t, h, w, b, **kw: L.generalized_jsd_loss(_linear(*t), _linear(h, w, b), **kw),
    "jsd beta=1": lambda t, h, w, b, **kw: L.generalized_jsd_loss(_linear(*t), _linear(h, w, b), beta=1.0, **kw),
    "skew": lambda t, h, w, b, **kw: L.skew_kl_loss(_linear(*t), _linear(h, w, b), **kw),
    "skew reverse": lambda t, h, w, b, **kw: L.skew_kl_loss(_linear(*t), _linear(h, w, b), reverse=True, **kw),
    "topk": lambda t, h, w, b, **kw: L.topk_kl_loss(*_topk(*t), _linear(h, w, b), **kw),
    "fused jsd": lambda t, h, w, b, **kw: L.fused_linear_jsd_loss(
        t[0], h, t[1], w, teacher_bias=t[2], student_bias=b, chunk_size=2, **kw
    ),
    "fused jsd beta=0": lambda t, h, w, b, **kw: L.fused_linear_jsd_loss(
        t[0], h, t[1], w, beta=0.0, teacher_bias=t[2], student_bias=b, chunk_size=2, **kw
    ),
    "fused topk": lambda t, h, w, b, **kw: L.fused_linear_topk_kl_loss(
        *_topk(*t), h, w, student_bias=b, chunk_size=2, **kw
    ),
}


# ---------------------------------------------------------------- no tokens: 0, with a zero gradient


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("leading", "masked"), [((0,), False), ((2, 0), False), ((0,), True), ((2, 3), True)])
def test_no_tokens_give_zero_and_a_zero_gradient(name, reduction, leading, masked):
    teacher = exact_head(leading, F32_T)
    student = exact_head(leading, F32_T)
    kw = {"reduction": reduction}
    if masked:  # a mask that counts no token
        kw["mask"] = torch.zeros(leading, dtype=torch.bool)
    loss = functools.partial(TOKEN_LOSSES[name], teacher, **kw)
    value = loss(*student)
    assert value.shape == () and value.item() == 0.0, value  # not nan
    leaves = tuple(x.clone().requires_grad_() for x in student)
    by_autograd = torch.autograd.grad(loss(*leaves), leaves)
    by_func = grad(loss, argnums=(0, 1, 2))(*student)
    for g, x in zip(by_autograd + by_func, student + student):
        assert g.shape == x.shape and torch.equal(g, torch.zeros_like(x)), (name, g)


@pytest.mark.parametrize("name", ["jsd beta=0.5", "skew", "topk"])
def test_no_tokens_reduction_none_gives_zeros_of_the_token_shape(name):
    for leading, mask in (((0,), None), ((2, 3), torch.zeros(2, 3, dtype=torch.bool))):
        teacher, student = exact_head(leading, F32_T), exact_head(leading, F32_T)
        got = TOKEN_LOSSES[name](teacher, *student, mask=mask, reduction="none")
        assert torch.equal(got, torch.zeros(leading))


# ---------------------------------------------------------------- mixed precision


LOGIT_LOSSES = {
    "jsd beta=0": functools.partial(L.generalized_jsd_loss, beta=0.0),
    "jsd beta=0.3 T=2": functools.partial(L.generalized_jsd_loss, beta=0.3, temperature=2.0),
    "jsd beta=0.5": functools.partial(L.generalized_jsd_loss, beta=0.5),
    "jsd beta=1": functools.partial(L.generalized_jsd_loss, beta=1.0),
    "jsd tensor beta": functools.partial(L.generalized_jsd_loss, beta=torch.tensor(0.5)),
    "skew alpha=0": functools.partial(L.skew_kl_loss, alpha=0.0),
    "skew alpha=0.1": functools.partial(L.skew_kl_loss, alpha=0.1),
    "skew alpha=1": functools.partial(L.skew_kl_loss, alpha=1.0),
    "skew reverse alpha=0.1": functools.partial(L.skew_kl_loss, alpha=0.1, reverse=True),
    "skew reverse tensor alpha": functools.partial(L.skew_kl_loss, alpha=torch.tensor(0.4), reverse=True),
}
DTYPE_PAIRS = [(BF16, F32_T), (F32_T, BF16)]
PAIR_IDS = ["bf16 teacher", "bf16 student"]
MASK = torch.tensor([[True, True, False, True, True, True], [True, False, True, True, True, False]])


@pytest.mark.parametrize(("teacher_dtype", "student_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_mixed_precision_logit_losses_compute_in_the_wider_dtype(name, teacher_dtype, student_dtype):
    loss = LOGIT_LOSSES[name]
    t = (3 * torch.randn(2, 6, V)).to(teacher_dtype).requires_grad_()
    s = (3 * torch.randn(2, 6, V)).to(student_dtype).requires_grad_()
    value = loss(t, s, mask=MASK)
    assert value.dtype == torch.float32  # the wider of the two
    t64, s64 = (x.detach().double().requires_grad_() for x in (t, s))
    reference = loss(t64, s64, mask=MASK)
    torch.testing.assert_close(value.double(), reference, **F32)
    both = {"allow_unused": True, "materialize_grads": True}  # skew alpha=1 is KL(p_T || p_T): no student
    got, expected_grads = torch.autograd.grad(value, (t, s), **both), torch.autograd.grad(reference, (t64, s64), **both)
    for g, expected, x in zip(got, expected_grads, (t, s)):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.double(), expected, **(BF16_ONCE if x.dtype == BF16 else F32))


@pytest.mark.parametrize(("teacher_dtype", "student_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(("k", "renormalize"), [(3, False), (3, True), (V, False)])
def test_mixed_precision_topk(teacher_dtype, student_dtype, k, renormalize):
    logprobs, indices = (3 * torch.randn(2, 6, V)).log_softmax(-1).topk(k)
    logprobs = logprobs.to(teacher_dtype)  # as stored
    s = (3 * torch.randn(2, 6, V)).to(student_dtype).requires_grad_()
    value = L.topk_kl_loss(logprobs, indices, s, renormalize=renormalize, mask=MASK)
    assert value.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    reference = L.topk_kl_loss(logprobs.double(), indices, s64, renormalize=renormalize, mask=MASK)
    torch.testing.assert_close(value.double(), reference, **F32)
    (g,), (expected,) = torch.autograd.grad(value, s), torch.autograd.grad(reference, s64)
    assert g.dtype == student_dtype
    torch.testing.assert_close(g.double(), expected, **(BF16_ONCE if student_dtype == BF16 else F32))


def _assert_bf16_matmul_close(got, expected, bound):
    """A bfloat16 matmul of a gradient rounded to bfloat16: each product is off by 2**-8 of its size and the
    result is rounded once more, so ``|got - expected| <= 2**-7 * bound + 2**-8 * |expected|``, where
    ``bound`` is the same matmul of absolute values."""
    error = (got.double() - expected).abs()
    allowed = 2.0**-7 * bound + 2.0**-8 * expected.abs() + 1e-6
    assert (error <= allowed).all(), float((error - allowed).max())


def _check_fused_student_grads(got, g_logits, hidden, weight, student_dtype):
    """The student's hidden-state, weight and bias gradients against the float64 chain rule from ``g_logits``."""
    expected = (g_logits @ weight.double(), g_logits.transpose(-1, -2) @ hidden.double(), g_logits.sum(0))
    if student_dtype != BF16:
        for a, b in zip(got, expected):
            assert a.dtype == student_dtype
            torch.testing.assert_close(a.double(), b, **F32)
        return
    magnitude = g_logits.abs()
    bounds = (magnitude @ weight.double().abs(), magnitude.T @ hidden.double().abs(), magnitude.sum(0))
    for a, b, bound in zip(got, expected, bounds):
        assert a.dtype == BF16
        _assert_bf16_matmul_close(a, b, bound)


@pytest.mark.parametrize(("teacher_dtype", "student_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
def test_mixed_precision_fused_jsd(teacher_dtype, student_dtype, beta):
    teacher, student = exact_head((9,), teacher_dtype), exact_head((9,), student_dtype)
    mask = torch.rand(9) > 0.2

    def fused(h, w, b):
        return L.fused_linear_jsd_loss(
            teacher[0], h, teacher[1], w, teacher_bias=teacher[2], student_bias=b, beta=beta, mask=mask, chunk_size=4
        )

    g, value = torch.func.grad_and_value(fused, argnums=(0, 1, 2))(*student)
    assert value.dtype == torch.float32  # the wider of the two
    logits64 = _linear(*(x.double() for x in student)).requires_grad_()
    reference = L.generalized_jsd_loss(_linear(*(x.double() for x in teacher)), logits64, beta=beta, mask=mask)
    torch.testing.assert_close(value.double(), reference, **F32)
    (g_logits,) = torch.autograd.grad(reference, logits64)
    _check_fused_student_grads(g, g_logits, student[0], student[1], student_dtype)


@pytest.mark.parametrize(("teacher_dtype", "student_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_mixed_precision_fused_topk(teacher_dtype, student_dtype, renormalize):
    logprobs, indices = (3 * torch.randn(9, V)).log_softmax(-1).topk(4)
    logprobs = logprobs.to(teacher_dtype)
    student = exact_head((9,), student_dtype)

    def fused(h, w, b):
        return L.fused_linear_topk_kl_loss(
            logprobs, indices, h, w, student_bias=b, renormalize=renormalize, chunk_size=4
        )

    g, value = torch.func.grad_and_value(fused, argnums=(0, 1, 2))(*student)
    assert value.dtype == torch.float32
    logits64 = _linear(*(x.double() for x in student)).requires_grad_()
    reference = L.topk_kl_loss(logprobs.double(), indices, logits64, renormalize=renormalize)
    torch.testing.assert_close(value.double(), reference, **F32)
    (g_logits,) = torch.autograd.grad(reference, logits64)
    _check_fused_student_grads(g, g_logits, student[0], student[1], student_dtype)


def test_fused_head_of_two_dtypes_names_both():
    h, w, _ = exact_head((3,), F32_T)
    with pytest.raises(
        TypeError,
        match=r"fused_linear_jsd_loss: student_hidden is torch\.float32 but student_weight is "
        r"torch\.bfloat16.*\.to\(",
    ):
        L.fused_linear_jsd_loss(h, h, w, w.to(BF16))
    with pytest.raises(TypeError, match=r"teacher_bias is torch\.float64 but teacher_weight is torch\.float32"):
        L.fused_linear_jsd_loss(h, h, w, w, teacher_bias=torch.zeros(V, dtype=torch.float64))


# ---------------------------------------------------------------- stored top-k: shapes and index dtypes


def test_more_topk_entries_than_classes_raise():
    logprobs = torch.randn(2, 9).log_softmax(-1)
    indices = torch.arange(9).remainder(V).expand(2, 9)  # 9 entries for 7 classes: two classes twice
    match = r"teacher_topk_logprobs has 9 entries per token but the student has 7 classes"
    with pytest.raises(ValueError, match=rf"topk_kl_loss: {match}"):
        L.topk_kl_loss(logprobs, indices, torch.randn(2, V))
    with pytest.raises(ValueError, match=rf"fused_linear_topk_kl_loss: {match}"):
        L.fused_linear_topk_kl_loss(logprobs, indices, torch.randn(2, H), torch.randn(V, H))


INDEX_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64]


@pytest.mark.parametrize("dtype", INDEX_DTYPES, ids=str)
def test_topk_indices_of_any_integer_dtype(dtype):
    logprobs, indices = torch.randn(2, 3, V).log_softmax(-1).topk(4)
    hidden, weight = torch.randn(2, 3, H), torch.randn(V, H)

    def both(h, w, index):
        unfused = L.topk_kl_loss(logprobs, index, h @ w.T)
        return unfused + 2 * L.fused_linear_topk_kl_loss(logprobs, index, h, w, chunk_size=4)

    g, value = torch.func.grad_and_value(both, argnums=(0, 1))(hidden, weight, indices.to(dtype))
    g_long, value_long = torch.func.grad_and_value(both, argnums=(0, 1))(hidden, weight, indices)
    # the same classes: converting the indices changes nothing else, up to float32 summation order
    torch.testing.assert_close(value, value_long, **F32)
    for a, b in zip(g, g_long):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("loss", [L.topk_kl_loss, L.fused_linear_topk_kl_loss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_topk_indices_not_integer_name_the_argument(loss, dtype):
    logprobs, indices = torch.randn(3, V).log_softmax(-1).topk(2)
    args = (torch.randn(3, V),) if loss is L.topk_kl_loss else (torch.randn(3, H), torch.randn(V, H))
    with pytest.raises(TypeError, match=rf"{loss.__name__}: teacher_topk_indices must hold integer class indices"):
        loss(logprobs, indices.to(dtype), *args)
