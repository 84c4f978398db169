"""The served teacher against a local HTTP peer: vLLM's answer format, the shift, padding, every fault.

The peer (``tests/served_peer.py``) is a real HTTP server in this process
that answers as vLLM does for a tiny Llama teacher computed in torch, or with
a scripted fault. The same checks against a real vLLM server are in
``tests/test_served_vllm.py`` (marked ``vllm``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import funcdistill as fd
from funcdistill.cache import TeacherOutputs, TopK
from funcdistill.losses import fused_linear_topk_kl_loss, topk_kl_loss
from funcdistill.served import ServedTeacher, ServerError, VLLMServer
from tests.conftest import free_port
from tests.served_peer import MODEL, RESET, Peer, edited, status, vllm_answer

pytestmark = pytest.mark.usefixtures("seed")
V, K = 97, 5


def llama(hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peaked distributions, as a trained model's (no near ties in the top k)
    return model


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return llama(32, 0).eval(), llama(32, 1)


def logits_of(teacher):
    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return teacher(torch.tensor([ids])).logits[0]

    return run


def online_topk(teacher, ids: torch.Tensor, mask: torch.Tensor, k: int = K) -> TopK:
    """The teacher's own log_softmax top-k, each sequence run alone (what a server computes), padded as the mask."""
    logprobs = torch.full((*ids.shape, k), float("-inf"))
    indices = torch.zeros((*ids.shape, k), dtype=torch.int64)
    for row in range(ids.shape[0]):
        real = mask[row]
        top = logits_of(teacher)(ids[row][real].tolist()).log_softmax(-1).topk(k)
        logprobs[row][real], indices[row][real] = top.values, top.indices
    return TopK(logprobs, indices)


def ragged() -> list[torch.Tensor]:
    return [torch.randint(2, V, (n,)) for n in (7, 3, 1, 5)]


def right_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.int64)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, True
    return ids, mask


def served_for(models, url: str, **kwargs) -> ServedTeacher:
    teacher, student = models
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head"))
    return ServedTeacher(fn, url, model=MODEL, topk=K, **{"retries": 0, **kwargs})


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("layout", ["list", "right", "left"])
def test_served_topk_is_the_teachers_own_at_every_real_position(models, layout):
    teacher = models[0]
    seqs = ragged()
    ids, mask = right_padded(seqs)
    if layout == "left":
        ids, mask = ids.flip(1), mask.flip(1)
        for i, s in enumerate(seqs):
            ids[i][mask[i]] = s
    with Peer(vllm_answer(logits_of(teacher))) as peer:
        served = served_for(models, peer.url)
        out = served(seqs) if layout == "list" else served(ids, attention_mask=mask.long())
    (top,) = out.values
    expected = online_topk(teacher, ids, mask)
    assert isinstance(out, TeacherOutputs) and isinstance(top, TopK)
    assert torch.equal(out.mask, mask)
    assert top.logprobs.dtype == torch.float32 and top.indices.dtype == torch.int64
    assert torch.equal(top.indices, expected.indices)
    # the peer sends float64 values through JSON; the float32 teacher's own are within float32 rounding
    torch.testing.assert_close(top.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    # the peer did send k + 1 entries where the actual next token is outside the top k
    assert max(len(e) for e in _sent_entries(peer, teacher)) == K + 1
    assert peer.bodies[0]["prompt"] == [s.tolist() for s in seqs]  # sent without padding


def _sent_entries(peer, teacher):
    _, answer = vllm_answer(logits_of(teacher))(peer.bodies[0])
    return [e for c in answer["choices"] for e in c["prompt_logprobs"][1:]]


def test_served_outputs_go_through_fn_and_the_topk_losses_as_online_topk(models):
    teacher, student = models
    seqs = ragged()
    ids, mask = right_padded(seqs)
    mapping = fd.Mapping(teacher, student).add("lm_head", "lm_head").add("lm_head", "model.norm")
    fn = fd.distill(teacher, student, mapping)
    with Peer(vllm_answer(logits_of(teacher))) as peer:
        outputs = ServedTeacher(fn, peer.url, model=MODEL, topk=K)(ids, mask)
    online = online_topk(teacher, ids, mask)
    params = {k: v.detach() for k, v in fd.state(student, buffers=False).items()}

    def objective(student_params, teacher_top):
        (t_logits, s_logits, _), (t_top, s_hidden, _) = fn(
            outputs, student_params, input_ids=ids, attention_mask=mask.long()
        )
        assert isinstance(t_logits, TopK) and isinstance(t_top, TopK)
        plain = topk_kl_loss(*t_logits, s_logits, mask=outputs.mask)
        fused = fused_linear_topk_kl_loss(
            *t_top, s_hidden, student_params["lm_head.weight"], mask=outputs.mask, chunk_size=4
        )
        reference = topk_kl_loss(*teacher_top, s_logits, mask=mask)
        return plain, fused, reference

    with torch.no_grad():
        plain, fused, reference = objective(params, online)
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)  # values agree within float32 rounding
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    grads = [torch.func.grad(lambda p, i=i: objective(p, online)[i])(params) for i in range(3)]
    for name in params:
        torch.testing.assert_close(grads[0][name], grads[2][name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1][name], grads[2][name], atol=1e-5, rtol=1e-4)


def test_teacher_outputs_with_a_mask_stay_one_pytree():
    served_like = TeacherOutputs(
        (TopK(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.int64)),),
        fd.cache.BuiltFor("http://x", ('""',), None, model="m"),
        torch.ones(2, 3, dtype=torch.bool),
    )
    leaves = fd._pytree.tree_leaves(served_like)
    assert len(leaves) == 3 and leaves[-1].dtype == torch.bool
    doubled = fd._pytree.tree_map(lambda x: x + 1 if x.is_floating_point() else x, served_like)
    assert isinstance(doubled, TeacherOutputs) and torch.equal(doubled.mask, served_like.mask)
    assert doubled.built_for is served_like.built_for and float(doubled.values[0].logprobs[0, 0, 0]) == 1.0
    assert torch.equal(served_like.to(torch.float64).mask, served_like.mask)
    assert "model='m'" in repr(served_like.built_for)
    with pytest.raises(
        TypeError, match=r"mask=\.\.\.\) must be None or a bool tensor \(batch, tokens\).* got a torch.int64"
    ):
        TeacherOutputs(served_like.values, served_like.built_for, torch.ones(2, 3, dtype=torch.int64))


def test_a_served_teachers_outputs_skip_the_layout_check_but_not_the_points(models):
    teacher, student = models
    other_teacher = llama(64, 2).eval()  # another state layout: a cache built for `teacher` would refuse it
    with Peer(vllm_answer(logits_of(teacher))) as peer:
        outputs = served_for(models, peer.url)([torch.tensor([3, 4, 5])])
    same_point = fd.distill(other_teacher, student, fd.Mapping(other_teacher, student).add("lm_head", "lm_head"))
    (pair,) = same_point(outputs, fd.state(student), input_ids=torch.tensor([[3, 4, 5]]))
    assert pair.teacher is outputs.values[0]
    hidden = fd.distill(teacher, student, fd.Mapping(teacher, student).add("model.norm", "model.norm"))
    with pytest.raises(
        ValueError,
        match=r"the served teacher at http://127\.0\.0\.1:\d+ \(model 'tiny-teacher'\) holds "
        r"the teacher outputs at 'lm_head'; .* 'model\.norm', which it does not hold\. Make the served "
        r"teacher with this distill function",
    ):
        hidden(outputs, fd.state(student), input_ids=torch.tensor([[3, 4, 5]]))


# ------------------------------------------------------------------ faults


def test_a_server_that_is_down_is_a_connection_error_naming_the_url_and_how_to_start_one(models):
    port = free_port()
    served = served_for(models, f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01)
    with pytest.raises(
        ConnectionError,
        match=rf"cannot reach the served teacher at http://127\.0\.0\.1:{port}/v1/"
        r"completions \(2 attempts\): .*Is the server running at .* Start it with `python -m "
        r"vllm\.entrypoints\.openai\.api_server --model MODEL --max-logprobs K`",
    ):
        served([torch.tensor([1, 2])])


def test_a_server_that_does_not_answer_in_time_is_a_timeout_error(models):
    with Peer(("sleep", 1.5, vllm_answer(logits_of(models[0])))) as peer:
        with pytest.raises(TimeoutError, match=r"did not answer within timeout=0\.3 s \(1 attempt\)"):
            served_for(models, peer.url, timeout=0.3)([torch.tensor([1, 2])])


def test_failures_that_may_pass_are_retried_with_backoff(models):
    good = vllm_answer(logits_of(models[0]))
    script = (status(503, "busy"), RESET, status(502, "gateway"), good)
    with Peer(*script) as peer:
        out = served_for(models, peer.url, retries=3, backoff=0.01)([torch.tensor([1, 2, 3])])
    assert len(peer.bodies) == 4 and out.values[0].logprobs.shape == (1, 3, K)


def test_a_server_failing_every_retry_is_a_server_error_with_its_message(models):
    with Peer(status(500, "engine died")) as peer:
        with pytest.raises(ServerError, match=r"failed \(HTTP 500: engine died\) in each of 3 attempts"):
            served_for(models, peer.url, retries=2, backoff=0.01)([torch.tensor([1, 2])])
    assert len(peer.bodies) == 3


def test_k_above_the_servers_max_logprobs_says_start_it_with_max_logprobs(models):
    message = (
        "Requested prompt logprobs of 5, which is greater than max allowed: 2 (parameter=prompt_logprobs, value=5)"
    )
    with Peer(status(400, message, "prompt_logprobs")) as peer:
        with pytest.raises(
            ServerError,
            match=r"refuses top-5 log-probabilities \(HTTP 400: Requested prompt logprobs "
            r"of 5.*\)\. Start the server with --max-logprobs 5 \(or more\)",
        ):
            served_for(models, peer.url)([torch.tensor([1, 2])])
    assert len(peer.bodies) == 1  # a refusal is not retried


def test_a_model_the_server_does_not_serve_names_both_and_the_closest(models):
    teacher, student = models
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head"))
    with Peer(status(404, "The model `tiny-teachr` does not exist.", "model")) as peer:
        served = ServedTeacher(fn, peer.url, model="tiny-teachr", topk=K, retries=0)
        with pytest.raises(
            ServerError,
            match=r"does not serve model 'tiny-teachr' \(HTTP 404: The model `tiny-teachr` "
            r"does not exist\.\)\. It serves \['tiny-teacher', 'other-model'\]: pass model='tiny-teacher'",
        ):
            served([torch.tensor([1, 2])])


def test_an_answer_for_another_model_names_both(models):
    with Peer(vllm_answer(logits_of(models[0]), model="someone-else")) as peer:
        with pytest.raises(
            ServerError, match=r"answered for model 'someone-else', but model 'tiny-teacher' was asked for"
        ):
            served_for(models, peer.url)([torch.tensor([1, 2])])


def _drop_entry(answer):
    entry = answer["choices"][0]["prompt_logprobs"][1]
    for key in [k for k, e in entry.items() if e["rank"] <= K][:2]:
        del entry[key]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a["choices"].pop(), r"answered 1 choices for 2 prompts"),
        (lambda a: a["choices"][0].update(index=5), r"choices with indices \['0', '5'\], not one per prompt 0\.\.1"),
        (lambda a: a["choices"][1]["prompt_logprobs"].pop(), r"prompt 0 of 4 tokens: the answer has 3 positions"),
        (_drop_entry, r"prompt 1, position 0: 3 top log-probabilities where topk=5 were asked for"),
        (
            lambda a: a["choices"][0]["logprobs"].update(top_logprobs=[]),
            r"prompt 1: the answer has no log-probabilities "
            r"after the last token",
        ),
        (
            lambda a: a["choices"][0]["logprobs"]["top_logprobs"][0].update({"tok": -1.0}),
            r"prompt 1, position 1: token "
            r"keys are not ids",
        ),
    ],
)
def test_an_answer_that_does_not_fit_the_request_is_a_server_error(models, edit, message):
    with Peer(edited(vllm_answer(logits_of(models[0])), edit)) as peer:
        with pytest.raises(ServerError, match=message):
            served_for(models, peer.url)([torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])])


def test_an_answer_that_is_not_json_is_a_server_error(models):
    with Peer(lambda body: (200, "<html>hello</html>")) as peer:
        with pytest.raises(
            ServerError,
            match=r"with something that is not JSON \('<html>hello</html>'\); is it an "
            r"OpenAI-compatible server",
        ):
            served_for(models, peer.url)([torch.tensor([1, 2])])


# ------------------------------------------------------------------ arguments


def test_the_mapping_must_read_the_teachers_logits_only(models):
    teacher, student = models
    hidden = fd.distill(teacher, student, fd.Mapping(teacher, student).add("model.norm", "model.norm"))
    with pytest.raises(
        ValueError,
        match=r"gives the top-k log-probabilities of the teacher's logits only, but this "
        r"distill function's mapping reads the teacher at 'model\.norm'\. Map one teacher point holding "
        r"the logits: '' or 'lm_head'",
    ):
        ServedTeacher(hidden, "http://127.0.0.1:1", model=MODEL, topk=K)
    two = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head").add("", ""))
    with pytest.raises(ValueError, match=r"reads the teacher at 'lm_head', ''\. Map one"):
        ServedTeacher(two, "http://127.0.0.1:1", model=MODEL, topk=K)
    with pytest.raises(TypeError, match=r"takes a distill function \(funcdistill\.distill\), got LlamaForCausalLM"):
        ServedTeacher(teacher, "http://127.0.0.1:1", model=MODEL, topk=K)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "127.0.0.1:8000"}, r"url must be an http\(s\) URL such as 'http://127\.0\.0\.1:8000', got '127"),
        ({"topk": 0}, r"topk must be an int >= 1, got 0"),
        ({"retries": -1}, r"retries must be an int >= 0, got -1"),
        ({"timeout": 0}, r"timeout must be a positive number of seconds, got 0"),
        ({"backoff": float("nan")}, r"backoff must be a non-negative number of seconds, got nan"),
        ({"model": ""}, r"model must be the served model's name"),
    ],
)
def test_bad_settings_are_refused(models, kwargs, message):
    teacher, student = models
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head"))
    settings = {"url": "http://127.0.0.1:1", "model": MODEL, "topk": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        ServedTeacher(fn, settings.pop("url"), **settings)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (
            ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64)],),
            ValueError,
            r"sequence\(s\) \[1\] have no tokens",
        ),
        (
            ([torch.tensor([1.0, 2.0])],),
            TypeError,
            r"sequence 0 must be a 1-D integer tensor of token ids, got a "
            r"torch\.float32",
        ),
        (([],), TypeError, r"input_ids must be a non-empty list of 1-D integer tensors"),
        (
            (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]])),
            ValueError,
            r"the attention mask of row\(s\) \[0\] has "
            r"gaps",
        ),
        (
            (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1]])),
            ValueError,
            r"attention_mask must be a tensor of the "
            r"shape of input_ids \[1, 3\]",
        ),
        (([torch.tensor([1, 2])], torch.tensor([[1, 1]])), ValueError, r"attention_mask= goes with a padded"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_sent(models, args, error, message):
    with Peer(status(500, "must not be asked")) as peer:
        with pytest.raises(error, match=message):
            served_for(models, peer.url)(*args)
    assert peer.bodies == []


def test_import_served_adds_no_http_library():
    code = (
        "import sys, torch; before = set(sys.modules); import funcdistill.served; "
        "print(' '.join(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('requests', 'urllib3'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_a_local_server_that_exits_on_start_is_an_error_with_its_log(tmp_path):
    # without vllm the module is missing; with it, the unknown flag stops it: either way it exits before it answers
    server = VLLMServer(tmp_path, args=["--no-such-flag"], startup_timeout=120)
    with pytest.raises(
        RuntimeError,
        match=r"(?s)the vLLM server exited with code \d+ before it answered; the end of "
        r"its log \(.*vllm-.*\.log\):\n.*(No module named 'vllm'|no-such-flag)",
    ):
        with server:
            pass
    assert server.process is None
