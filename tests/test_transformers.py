"""DistilBERT-style distillation of transformers models (examples/distilbert.py).

Real ``transformers`` BERT models built from configs with random weights;
nothing is downloaded.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.utils._pytree as torch_pytree
from torch.func import grad

pytest.importorskip("transformers")

from transformers.utils import ModelOutput

import funcdistill as fd
from examples import distilbert as ex


@pytest.fixture(scope="module")
def models():
    return ex.build_models()


@pytest.fixture(scope="module")
def mapping(models):
    return ex.build_mapping(models)


@pytest.fixture(scope="module")
def batch(models):
    return ex.random_batch(models)


def run(models, mapping, batch, student_state=None):
    fn = fd.distill(models.teacher, models.student, mapping)
    ids, mask = batch
    ss = fd.state(models.student, mapping) if student_state is None else student_state
    return fn(fd.state(models.teacher), ss, input_ids=ids, attention_mask=mask)


def test_whole_model_pair_is_the_model_output(models, mapping, batch):
    pairs = run(models, mapping, batch)
    teacher_out, student_out, _ = pairs[0]
    assert isinstance(teacher_out, ModelOutput) and isinstance(student_out, ModelOutput)
    assert type(teacher_out).__name__ == "SequenceClassifierOutput"
    # a pytree: flatten/unflatten keeps the type, and the leaves are its tensors
    leaves, spec = torch_pytree.tree_flatten(student_out)
    assert len(leaves) == 1 and leaves[0] is student_out.logits
    rebuilt = torch_pytree.tree_unflatten([x * 2 for x in leaves], spec)
    assert type(rebuilt) is type(student_out)
    torch.testing.assert_close(rebuilt.logits, 2 * student_out.logits)
    ids, mask = batch
    with torch.no_grad():
        torch.testing.assert_close(teacher_out.logits, models.teacher(input_ids=ids, attention_mask=mask).logits)
        torch.testing.assert_close(student_out.logits, models.student(input_ids=ids, attention_mask=mask).logits)
    assert teacher_out.logits.shape == (8, 3)


def test_layers_mapped_by_name_are_the_hidden_states(models, mapping, batch):
    assert mapping.names[1:] == (
        ("bert.encoder.layer.1", "bert.encoder.layer.0"),
        ("bert.encoder.layer.3", "bert.encoder.layer.1"),
    )
    pairs = run(models, mapping, batch)
    ids, mask = batch
    with torch.no_grad():
        t_hidden = models.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        s_hidden = models.student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for k, (t, s, payload) in enumerate(pairs[1:]):
        # hidden_states[0] is the embedding output, so layer i is hidden_states[i + 1]
        torch.testing.assert_close(ex.hidden_state(t), t_hidden[2 * k + 2])
        torch.testing.assert_close(ex.hidden_state(s), s_hidden[k + 1])
        assert ex.hidden_state(t).shape == (8, 16, 64) and ex.hidden_state(s).shape == (8, 16, 32)
        assert float(payload(t, s).detach()) > 0


def test_adapters_train_with_the_student(models, mapping, batch):
    fn = fd.distill(models.teacher, models.student, mapping)
    params = {k: v.detach() for k, v in fd.state(models.student, mapping, buffers=False).items()}
    assert {"payloads.1.adapter.weight", "payloads.2.adapter.weight"} <= params.keys()
    ts = fd.state(models.teacher)
    ids, mask = batch
    grads = grad(lambda p: ex.objective(fn, ts, p, ids, mask))(params)
    assert grads.keys() == params.keys()
    for key in (
        "payloads.1.adapter.weight",
        "payloads.2.adapter.bias",
        "bert.encoder.layer.0.attention.self.query.weight",
        "classifier.weight",
    ):
        assert grads[key].abs().sum() > 0, key
    # the same gradients as loss.backward() on the live modules
    models.student.zero_grad()
    adapter = mapping[1].payload.adapter
    adapter.zero_grad()
    ex.objective(fn, ts, fd.state(models.student, mapping), ids, mask).backward()
    torch.testing.assert_close(adapter.weight.grad, grads["payloads.1.adapter.weight"])
    torch.testing.assert_close(models.student.classifier.weight.grad, grads["classifier.weight"])
    assert all(p.grad is None for p in models.teacher.parameters())
    models.student.zero_grad()
    adapter.zero_grad()


def test_distillation_lowers_every_loss(models, mapping):
    before = ex.pair_losses(models, mapping, fd.state(models.student, mapping))
    history = ex.train(models, mapping, steps=8)
    after = ex.pair_losses(models, mapping, history.params)
    assert history.losses[-1] < 0.8 * history.losses[0]
    assert sum(before) == pytest.approx(history.losses[0], rel=1e-5)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert before[0] > 0.05  # the logits term is not trivially zero


def test_main_prints_pairs_and_losses(capsys):
    history = ex.main(["--steps", "2"])
    out = capsys.readouterr().out
    assert "pair 0: '' -> SequenceClassifierOutput ['logits']" in out
    assert "pair 2: bert.encoder.layer.3 (8, 16, 64) -> bert.encoder.layer.1 (8, 16, 32)" in out
    assert "pair 0 (logits KD):" in out and "total:" in out
    assert len(history.losses) == 2


def test_build_models_rejects_odd_depth():
    with pytest.raises(ValueError, match=r"teacher_layers must be even and >= 2 .*got 3"):
        ex.build_models(teacher_layers=3)


def test_an_eval_bert_teacher_is_truncated_from_its_first_call():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    def config(layers):
        return BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64
        )

    torch.manual_seed(0)
    t, s = BertModel(config(4)).eval(), BertModel(config(2)).eval()
    m = fd.Mapping(t, s).add("encoder.layer.1", "encoder.layer.0")
    inputs = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}

    def flops(f):
        with FlopCounterMode(display=False) as counter:
            f()
        return counter.get_total_flops()

    fn = fd.distill(t, s, m)
    student = flops(lambda: s(**inputs))
    full = flops(lambda: t(**inputs))
    calls = [flops(lambda: fn(fd.state(t), fd.state(s), **inputs)) - student for _ in range(3)]
    assert calls[0] == calls[1] == calls[2] < 0.6 * full  # two of four layers, from the first call on
    ref = fd.distill(t, s, m, truncate=False)(fd.state(t), fd.state(s), **inputs)
    torch.testing.assert_close(fn(fd.state(t), fd.state(s), **inputs)[0].teacher, ref[0].teacher)


def test_a_training_bert_student_with_fixed_buffers_does_not_warn():
    import warnings

    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    t, s = BertModel(config).eval(), BertModel(config).train()  # position_ids / token_type_ids are never written
    ids = torch.randint(0, 100, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd.distill(t, s)(fd.state(t), fd.state(s), input_ids=ids)


def _albert(layers: int):
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return AlbertModel(config)


SHARED = "encoder.albert_layer_groups.0.albert_layers.0"


def test_albert_each_application_of_the_shared_layer():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    t, s = _albert(4).eval(), _albert(2)
    tokens = torch.randint(0, 100, (2, 8))
    seen = []  # the reference: a hook on the live teacher, removed right after
    handle = t.get_submodule(SHARED).register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        t(input_ids=tokens)
    handle.remove()
    m = fd.Mapping(t, s).add(fd.Point(SHARED, call=2), fd.Point(SHARED, call=1))
    m_all = fd.Mapping(t, s).add(fd.Point(SHARED, call="all"), fd.Point(SHARED, call="all"))
    (pair,) = fd.distill(t, s, m)(fd.state(t), fd.state(s), input_ids=tokens)
    (every,) = fd.distill(t, s, m_all)(fd.state(t), fd.state(s), input_ids=tokens)
    torch.testing.assert_close(pair.teacher, seen[2])
    torch.testing.assert_close(every.teacher, tuple(seen))
    assert len(every.student) == 2

    def flops(f):
        with FlopCounterMode(display=False) as counter:
            f()
        return counter.get_total_flops()

    student = flops(lambda: s(input_ids=tokens))
    teacher = [
        flops(
            lambda k=k: fd.distill(t, s, fd.Mapping(t, s).add(fd.Point(SHARED, call=k), ""))(
                fd.state(t), fd.state(s), input_ids=tokens
            )
        )
        - student
        for k in range(4)
    ]
    # each application costs the same: the teacher stops right after the one it needs
    steps = [b - a for a, b in itertools.pairwise(teacher)]
    assert steps[0] == steps[1] == steps[2] > 0 and teacher[3] < flops(lambda: t(input_ids=tokens))

    def loss(params):
        (p,) = fd.distill(t, s, m)(fd.state(t), params, input_ids=tokens)
        return (p.teacher - p.student).pow(2).mean()

    grads = grad(loss)(fd.state(s, buffers=False))
    assert float(grads[f"{SHARED}.ffn.weight"].detach().abs().sum()) > 0
    assert float(grads["pooler.weight"].detach().abs().sum()) == 0


def tiny_llamas():
    """A Llama teacher and student from configs (random weights, nothing downloaded); use_cache left at its default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden):
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        return LlamaForCausalLM(config)

    torch.manual_seed(0)
    return llama(16).eval(), llama(8).eval()


def test_a_mapped_output_holding_a_transformers_cache_names_use_cache_false():
    t, s = tiny_llamas()
    assert t.config.use_cache  # the default: the output holds a DynamicCache
    ids = torch.randint(0, 64, (2, 5))
    fn = fd.distill(t, s)  # pairs the whole outputs
    with pytest.raises(
        TypeError,
        match=r"the output of teacher module '' contains a DynamicCache, not only tensors; it is the key/value "
        r"cache of a transformers model.*Pass use_cache=False with the inputs, fn\(teacher_state, "
        r"student_state, \.\.\., use_cache=False\)",
    ):
        fn(fd.state(t), fd.state(s), input_ids=ids)
    (pair,) = fn(fd.state(t), fd.state(s), input_ids=ids, use_cache=False)  # the fix it gives
    torch.testing.assert_close(pair.student.logits, s(input_ids=ids).logits)


def test_the_input_of_an_attention_called_with_keywords_only_is_an_error_naming_them():
    t, s = tiny_llamas()
    ids = torch.randint(0, 64, (2, 5))
    attention = "model.layers.0.self_attn"  # LlamaDecoderLayer calls it with keyword arguments only
    point = fd.Point(attention, io="input")
    fn = fd.distill(t, s, fd.Mapping(t, s).add(point, point))
    with pytest.raises(
        RuntimeError,
        match=r"teacher Point\('model.layers.0.self_attn', io='input'\): the LlamaAttention at "
        r"'model.layers.0.self_attn' was called with keyword arguments only \('hidden_states', .*\), and "
        r"io='input' without arg reads the positional ones; read one keyword with "
        r"Point\('model.layers.0.self_attn', io='input', arg='hidden_states'\)",
    ):
        fn(fd.state(t), fd.state(s), input_ids=ids)
    point = fd.Point(attention, io="input", arg="hidden_states")
    fn = fd.distill(t, s, fd.Mapping(t, s).add(point, point))
    (pair,) = fn(fd.state(t), fd.state(s), input_ids=ids)
    layer = s.model.layers[0]
    torch.testing.assert_close(pair.student, layer.input_layernorm(s.model.embed_tokens(ids)))
