"""A teacher cache built from a served teacher: the server's top-k in the ragged storage of a live top-k build.

The server is the real local HTTP peer of ``tests/served_peer.py`` (it answers
in vLLM's format for a tiny ``transformers`` Llama computed in torch, or with a
scripted fault; it records every request). The distill function of the served
build has the teacher's architecture only, on the ``meta`` device: it never
runs. The reference is a ragged top-k cache built from the live teacher of the
same weights, and the online call. Two gloo ranks build from one peer (spawned
once for the module's last test): each batch is asked once, the first by rank 0
alone, and a failure there stops both ranks.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import LlamaForCausalLM

import funcdistill as fd
from funcdistill.cache import TeacherCache, TopK, pad_tokens
from funcdistill.losses import fused_linear_topk_kl_loss, topk_kl_loss
from funcdistill.served import ServedTeacher, ServerError
from tests.cache_jobs import Skippable
from tests.conftest import free_port, init_gloo
from tests.served_peer import MODEL, Peer, edited, status, vllm_answer
from tests.test_served import K, V, llama, logits_of

pytestmark = pytest.mark.usefixtures("seed")
N, BATCH, SHARD = 10, 2, 4  # 3 shards (4, 4, 2 samples) of 2 requests each (the last: 1)
IDX = torch.tensor([9, 0, 5, 2])  # three shards, the longest and the shortest samples
# float32 storage: the peer computes each sequence alone (a float32 forward, log_softmax in float64), the live
# build a forward on padded batches of 2 (log_softmax in float32): at the real tokens the kernels may sum in
# another order, which moves the log-probabilities (magnitudes up to about 4 here) by a few float32 ulps
# (measured: at most 7e-7), so 1e-5; the top-k indices agree exactly (the peaked lm_head: no near ties)
ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    teacher, student = llama(32, 0).eval(), llama(32, 1)
    with torch.device("meta"):  # the served teacher's architecture only: no weights, never run
        arch = LlamaForCausalLM(teacher.config).eval()

    def fn_of(t):
        return fd.distill(t, student, fd.Mapping(t, student).add("lm_head", "lm_head").add("lm_head", "model.norm"))

    return teacher, student, fn_of(teacher), fn_of(arch)


def make_samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = [1, 12, *torch.randint(1, 13, (N - 2,), generator=g).tolist()]
    return [torch.randint(2, V, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def samples():
    return make_samples()


def build(fn, teacher_state, samples, folder, **kwargs):
    options = {"batch_size": BATCH, "shard_size": SHARD, "topk": K, "progress": False, **kwargs}
    return TeacherCache.build(fn, teacher_state, samples, folder, **options)


def served(models, peer, **kwargs):
    return ServedTeacher(models[3], peer.url, model=MODEL, topk=K, **{"retries": 0, **kwargs})


def index(cache) -> dict:
    return json.loads((cache.path / "index.json").read_text())


@pytest.fixture(scope="module")
def live(models, samples, tmp_path_factory):
    return build(models[2], fd.state(models[0]), samples, tmp_path_factory.mktemp("live") / "c")


# ---------------------------------------------------------------- the same storage, the same values


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_cache_built_from_a_server_equals_the_live_teachers_topk_cache(models, samples, tmp_path, dtype):
    teacher = models[0]
    live = build(models[2], fd.state(teacher), samples, tmp_path / "live", dtype=dtype)
    with Peer(vllm_answer(logits_of(teacher))) as peer:
        cache = build(models[3], served(models, peer), samples, tmp_path / "served", dtype=dtype)
    assert [b["prompt"] for b in peer.bodies] == [[s.tolist() for s in samples[i : i + BATCH]] for i in range(0, N, 2)]
    # the same ragged top-k storage: layout, shards, real tokens, bytes
    assert index(cache)["entries"] == index(live)["entries"] and index(cache)["ragged"] is True
    assert cache.tokens == live.tokens == sum(len(s) for s in samples) and cache.nbytes == live.nbytes
    assert index(cache)["teacher"]["served"] == {"model": MODEL, "url": peer.url}
    assert index(cache)["teacher"]["weights"] is None and cache.built_for.model == MODEL
    a, b = cache[IDX], live[IDX]
    assert torch.equal(a.mask, b.mask)
    for (x, xi), (y, yi) in zip(a.values, b.values):
        m = a.mask
        assert torch.equal(xi, yi)  # the same top-k classes at every token (and index 0 at the padding)
        assert torch.isneginf(x[~m]).all() and torch.isneginf(y[~m]).all()  # padding: unused slots
        # each is its float32 value rounded to nearest in the storage dtype (relative error u: 2**-8 for
        # bfloat16, 0 for float32 storage), and the float32 values agree within ATOL (above)
        u = 2.0**-8 if dtype == torch.bfloat16 else 0.0
        assert ((x[m] - y[m]).abs() <= u * (x[m].abs() + y[m].abs()) + ATOL).all()


def test_losses_on_a_served_cache_equal_the_online_ones(models, samples, tmp_path):
    teacher, student, live_fn, meta_fn = models
    with Peer(vllm_answer(logits_of(teacher))) as peer:
        cache = build(meta_fn, served(models, peer), samples, tmp_path / "c")
    ids, attention = pad_tokens([samples[i] for i in IDX])
    params = {k: v.detach() for k, v in fd.state(student, buffers=False).items()}
    out = cache[IDX]  # read with the distill function of the meta teacher: its layout is checked, it never runs

    def losses(p, teacher_side):
        (t_top, s_logits, _), (t_top2, s_hidden, _) = meta_fn(teacher_side, p, input_ids=ids, attention_mask=attention)
        m = attention.bool()
        plain = topk_kl_loss(*t_top, s_logits, mask=m)
        return plain, fused_linear_topk_kl_loss(*t_top2, s_hidden, p["lm_head.weight"], mask=m, chunk_size=4)

    def online(p):
        (t_logits, s_logits, _), (_, s_hidden, _) = live_fn(
            fd.state(teacher), p, input_ids=ids, attention_mask=attention
        )
        top = TopK(*t_logits.log_softmax(-1).topk(K))
        m = attention.bool()
        return topk_kl_loss(*top, s_logits, mask=m), fused_linear_topk_kl_loss(
            *top, s_hidden, p["lm_head.weight"], mask=m, chunk_size=4
        )

    with torch.no_grad():
        got, want = losses(params, out), online(params)
    for g, w in zip(got, want):  # the teacher's log-probabilities agree within ATOL: the losses within float32
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    grad = torch.func.grad(lambda p: losses(p, out)[0])(params)
    grad_online = torch.func.grad(lambda p: online(p)[0])(params)
    for name in params:
        torch.testing.assert_close(grad[name], grad_online[name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- a fault mid-build


def test_a_server_fault_mid_build_keeps_the_finished_shards_and_the_build_resumes_without_asking_again(
    models, samples, tmp_path, live
):
    good = vllm_answer(logits_of(models[0]))
    folder = tmp_path / "c"
    with Peer(good, good, status(500, "engine died"), good) as peer:  # the 3rd request (shard 1's first) fails
        with pytest.raises(ServerError, match=r"failed \(HTTP 500: engine died\) in each of 1 attempts"):
            build(models[3], served(models, peer), samples, folder)
        assert (folder / "shard-00000.safetensors").exists() and not (folder / "shard-00001.safetensors").exists()
        assert len(peer.bodies) == 3
        cache = build(models[3], served(models, peer), samples, folder)
    asked = [b["prompt"] for b in peer.bodies[3:]]  # after the fault: shards 1 and 2 only, from sample 4
    assert asked == [[s.tolist() for s in samples[i : i + BATCH]] for i in range(SHARD, N, BATCH)]
    a, b = cache[torch.arange(N)], live[torch.arange(N)]
    assert torch.equal(a.mask, b.mask) and torch.equal(a.values[0].indices, b.values[0].indices)
    torch.testing.assert_close(a.values[0].logprobs, b.values[0].logprobs, atol=ATOL, rtol=0)


def test_a_finished_cache_is_opened_from_another_url_of_the_same_model_without_asking(models, samples, tmp_path):
    good = vllm_answer(logits_of(models[0]))
    with Peer(good) as peer:
        build(models[3], served(models, peer), samples, tmp_path / "c")
    with Peer(status(500, "must not be asked")) as replica:  # another server (URL) of the same model name
        again = build(models[3], served(models, replica), samples, tmp_path / "c")
    assert replica.bodies == [] and len(again) == N
    assert index(again)["teacher"]["served"]["url"] == peer.url  # where it was built
    with Peer(status(500, "must not be asked")) as other:
        other_model = ServedTeacher(models[3], other.url, model="other-model", topk=K, retries=0)
        with pytest.raises(
            ValueError,
            match=r"already holds a teacher cache .* made with other settings: teacher: served by model "
            r"'tiny-teacher' then, served by model 'other-model' now\.",
        ):
            build(models[3], other_model, samples, tmp_path / "c")
        with pytest.raises(ValueError, match=r"teacher: served by model 'tiny-teacher' then, a teacher state now\."):
            build(models[2], fd.state(models[0]), samples, tmp_path / "c")
    assert other.bodies == []


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"topk": 8},
            ValueError,
            r"topk=8, but the served teacher gives its top-5 log-probabilities \(ServedTeacher\(\.\.\., topk=5\)\); "
            r"a cache built from a server stores what it gives: pass topk=5, or make the served teacher with "
            r"topk=8 \(a server started with --max-logprobs 8 or more\)\.",
        ),
        ({"topk": None}, ValueError, r"no topk, but the served teacher gives its top-5 .* pass topk=5\.$"),
        (
            {"topk_temperature": 2.0},
            ValueError,
            r"topk_temperature=2\.0, but a served teacher gives its log-probabilities at temperature 1",
        ),
        ({"device": "cpu"}, ValueError, r"device='cpu' says where the teacher runs, but a served teacher runs in"),
        (
            {"data": torch.randn(4, 3)},
            TypeError,
            r"a served teacher scores token samples, but dataset item 0 is a float32 tensor of shape \[3\]",
        ),
    ],
)
def test_a_build_a_served_teacher_cannot_give_is_refused_before_asking(
    models, samples, tmp_path, kwargs, error, message
):
    data = kwargs.pop("data", samples)
    with Peer(status(500, "must not be asked")) as peer:
        with pytest.raises(error, match=message):
            build(models[3], served(models, peer), data, tmp_path / "c", **kwargs)
    assert peer.bodies == []


def test_a_served_teacher_of_another_mapping_is_refused(models, samples, tmp_path):
    teacher, student, _, _ = models
    hidden = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head").add("model.norm", ""))
    with Peer(status(500, "must not be asked")) as peer:
        with pytest.raises(ValueError, match=r"also maps teacher point\(s\) 'model\.norm', which it does not hold"):
            build(hidden, served(models, peer), samples, tmp_path / "c")


def test_a_class_index_outside_the_teachers_vocabulary_is_refused(models, samples, tmp_path):
    def outside(answer):  # the server's model has a larger vocabulary than the distill function's teacher
        entry = answer["choices"][0]["prompt_logprobs"][1]
        key = next(k for k, e in entry.items() if e["rank"] == 1)
        entry[str(V + 3)] = entry.pop(key)

    with Peer(edited(vllm_answer(logits_of(models[0])), outside)) as peer:
        with pytest.raises(
            ValueError,
            match=rf"was given class index {V + 3} at sample 0, outside the teacher's {V} classes \(the size of its "
            r"logits\): the server's model has another vocabulary",
        ):
            build(models[3], served(models, peer), samples[1:], tmp_path / "c")


def test_open_checks_the_served_model_and_refuses_to_check_weights_it_does_not_know(models, samples, tmp_path, live):
    teacher = models[0]
    with Peer(vllm_answer(logits_of(teacher))) as peer:
        teacher_served = served(models, peer)
        cache = build(models[3], teacher_served, samples, tmp_path / "c")
        other = ServedTeacher(models[3], peer.url, model="other-model", topk=K)
    assert len(TeacherCache.open(cache.path, teacher_state=teacher_served)) == N
    with pytest.raises(
        ValueError,
        match=r"was built from the served model 'tiny-teacher' \(at http://127\.0\.0\.1:\d+\), whose weights it "
        r"does not know, so it cannot check them against teacher_state: open it without teacher_state, or with "
        r"the ServedTeacher",
    ):
        TeacherCache.open(cache.path, teacher_state=fd.state(teacher))
    with pytest.raises(ValueError, match=r"built from the served model 'tiny-teacher', not 'other-model'"):
        TeacherCache.open(cache.path, teacher_state=other)
    with pytest.raises(ValueError, match=r"was built from a teacher state, not a served teacher"):
        TeacherCache.open(live.path, teacher_state=teacher_served)
    recorded = json.loads((cache.path / "index.json").read_text())
    recorded["teacher"]["served"] = {"url": "x"}
    (cache.path / "index.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r"field 'teacher\.served' is \{'url': 'x'\}, not an object with the served"):
        TeacherCache.open(cache.path)
    assert math.isfinite(live[[0]].values[0].logprobs[0, 0, 0])


# ---------------------------------------------------------------- two ranks, one server

WORLD = 2


def rank_worker(rank: int, port: int, urls: dict[str, str], out: str) -> None:
    """One rank of two-rank builds from the served teachers at ``urls`` (gloo, CPU); writes what each check raised."""
    init_gloo(rank, port, WORLD)
    results = {}
    try:
        student = llama(32, 1)
        with torch.device("meta"):
            arch = LlamaForCausalLM(llama(32, 0).config).eval()
        fn = fd.distill(arch, student, fd.Mapping(arch, student).add("lm_head", "lm_head").add("lm_head", "model.norm"))
        samples = make_samples()
        try:
            cache = build(fn, ServedTeacher(fn, urls["good"], model=MODEL, topk=K, retries=0), samples, Path(out, "c"))
            assert len(cache) == N, len(cache)
            results["build"] = "ok"
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by the test
            results["build"] = traceback.format_exc()
        dist.barrier()
        try:  # rank 1 asks another model (a misconfigured job): refused on both ranks before asking or writing
            model = MODEL if rank == 0 else "other-model"
            with pytest.raises(
                ValueError,
                match=r"the 2 ranks of this TeacherCache.build were given different builds.*\n  teacher: rank 0 "
                r"served by model 'tiny-teacher'; rank 1 served by model 'other-model'\n.*Nothing was written",
            ):
                build(
                    fn, ServedTeacher(fn, urls["silent"], model=model, topk=K, retries=0), samples, Path(out, "other")
                )
            assert not Path(out, "other").exists()
            results["refused"] = "ok"
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by the test
            results["refused"] = traceback.format_exc()
        dist.barrier()
        try:  # rank 0 alone asks for the first batch; its failure stops rank 1 too, with its type and message
            failed = r"failed \(HTTP 500: engine died\) in each of 1 attempts"
            told = r"^rank 0 stopped the build on the first batch, which every rank waits for \(it fixes the layout\), "
            told += r"so this rank stops too: ServerError: "
            with pytest.raises(ServerError, match=told + ".*" + failed if rank else failed):
                build(
                    fn, ServedTeacher(fn, urls["failing"], model=MODEL, topk=K, retries=0), samples, Path(out, "fails")
                )
            results["first_fails"] = "ok"
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by the test
            results["first_fails"] = traceback.format_exc()
        dist.barrier()
        try:  # a stream of unknown length: each rank positions it at its shards (skip), rank 0 asks the first batch
            served = ServedTeacher(fn, urls["stream"], model=MODEL, topk=K, retries=0)
            assert len(build(fn, served, Skippable(samples), Path(out, "stream"))) == N
            results["stream"] = "ok"
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by the test
            results["stream"] = traceback.format_exc()
        dist.barrier()
        try:  # the server fails rank 1's shard: rank 1 raises its error, rank 0 (its shards done) one naming it
            failed = r"failed \(HTTP 500: engine died\) in each of 1 attempts"
            told = r"^rank 1 failed while building its shards, so this rank stops too: ServerError: .*" + failed
            with pytest.raises(RuntimeError, match=told if rank == 0 else failed) as raised:
                build(fn, ServedTeacher(fn, urls["mid"], model=MODEL, topk=K, retries=0), samples, Path(out, "mid"))
            assert isinstance(raised.value, ServerError) == (rank == 1)
            results["mid_fails"] = "ok"
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by the test
            results["mid_fails"] = traceback.format_exc()
    finally:
        Path(out, f"{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_build_from_one_server_each_asking_for_its_own_shards(models, samples, live, tmp_path):
    good = vllm_answer(logits_of(models[0]))

    def shard_1_fails(body):  # samples 4 .. 7, built by rank 1
        return (status(500, "engine died") if body["prompt"][0] == samples[4].tolist() else good)(body)

    with (
        Peer(good) as peer,
        Peer(status(500, "must not be asked")) as unasked,
        Peer(status(500, "engine died")) as fails,
        Peer(good) as streamed,
        Peer(shard_1_fails) as mid,
    ):
        urls = {"good": peer.url, "silent": unasked.url, "failing": fails.url, "stream": streamed.url, "mid": mid.url}
        mp.spawn(rank_worker, args=(free_port(), urls, str(tmp_path)), nprocs=WORLD, join=True)
        asked_before = len(peer.bodies)
        resumed = build(models[3], served(models, peer), samples, tmp_path / "mid")  # one process, the good server
    for rank in range(WORLD):
        results = json.loads((tmp_path / f"{rank}.json").read_text())
        expected = {"build": "ok", "refused": "ok", "first_fails": "ok", "stream": "ok", "mid_fails": "ok"}
        assert results == expected, f"rank {rank}:\n" + "\n".join(results.values())
    # the failed build kept rank 0's shards 0 and 2 (and wrote no index): the resumed build asked for shard 1 only
    assert [b["prompt"] for b in peer.bodies[asked_before:]] == [
        [s.tolist() for s in samples[i : i + BATCH]] for i in (4, 6)
    ]
    assert len(resumed) == N and torch.equal(resumed[torch.arange(N)].mask, live[torch.arange(N)].mask)
    assert unasked.bodies == [] and len(fails.bodies) == 1  # the failing server: asked once, by rank 0
    # shard s (samples 4s .. 4s+3, asked in batches of 2) is built by rank s % 2, so each batch is asked by one
    # rank, once; the first batch, which fixes the layout for both, by rank 0 alone (the same from a stream)
    batches = sorted(tuple(tuple(x.tolist()) for x in samples[i : i + BATCH]) for i in range(0, N, BATCH))
    for bodies in (peer.bodies[:asked_before], streamed.bodies):
        assert sorted(tuple(map(tuple, b["prompt"])) for b in bodies) == batches
    for folder in ("c", "stream"):
        cache = TeacherCache.open(tmp_path / folder)
        assert index(cache)["entries"] == index(live)["entries"] and cache.tokens == live.tokens
        assert [s["count"] for s in index(cache)["shards"]] == [4, 4, 2]
        a, b = cache[torch.arange(N)], live[torch.arange(N)]
        assert torch.equal(a.mask, b.mask) and torch.equal(a.values[0].indices, b.values[0].indices)
        torch.testing.assert_close(a.values[0].logprobs, b.values[0].logprobs, atol=ATOL, rtol=0)
