"""The stateless ingress (ForwardingRouter) without Serve: a fake `submit` plays the target
replicas. It validates before forwarding, forwards token ids, moves a sequence whose replica dies
mid-stream (the committed tokens travel with it), passes a replica's refusal through with its
code, and ends with UNAVAILABLE, not a hang, when no replica is left."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.api.validation import RequestError
from cluster.routing.config import RouterConfig
from cluster.routing.forwarding import ForwardingRouter, error_item
from protos import specdec_pb2 as pb
from tests.tiny_models import make_model


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("forwarding") / "target", seed=0)


def chunk(tokens, final=False):
    msg = pb.GenerateResponse(token_ids=tokens, text="".join(chr(65 + t % 26) for t in tokens))
    if final:
        msg.finish_reason = pb.FINISH_REASON_LENGTH
        msg.usage.prompt_tokens = 999  # what a replica saw: the ingress fixes it
    return msg.SerializeToString()


class Replicas:
    """Each submit is served by the next behaviour in `plan`."""

    def __init__(self, *plan) -> None:
        self.plan = list(plan)
        self.requests: list[pb.GenerateRequest] = []
        self.intervals: list[int] = []

    def __call__(self, request: bytes, every: int):
        self.requests.append(pb.GenerateRequest.FromString(request))
        self.intervals.append(every)
        return self.plan.pop(0)(self.requests[-1])


def serves(req):
    async def gen():
        n = req.max_new_tokens
        base = len(req.prompt_token_ids)
        yield chunk([base + i for i in range(n - 1)])
        yield chunk([base + n - 1], final=True)

    return gen()


def dies_after(k):
    def behaviour(req):
        async def gen():
            base = len(req.prompt_token_ids)
            yield chunk([base + i for i in range(k)])
            raise RuntimeError("ActorDiedError: the replica's actor died")

        return gen()

    return behaviour


def refuses(code):
    def behaviour(req):
        async def gen():
            yield error_item(RequestError(code, "", "replica says no"))

        return gen()

    return behaviour


def run(router, req, **kw):
    async def go():
        return [m async for m in router.generate_stream(req, **kw)]

    return asyncio.run(go())


def test_a_sequence_whose_replica_dies_moves_with_its_committed_tokens(target):
    replicas = Replicas(dies_after(3), serves)
    router = ForwardingRouter(RouterConfig(str(target)), replicas)
    msgs = run(router, pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_new_tokens=8))
    tokens = [t for m in msgs for t in m.token_ids]
    assert tokens == [3, 4, 5, 6, 7, 8, 9, 10]  # 3 from the first replica, 5 from the second
    first, second = replicas.requests
    assert list(first.prompt_token_ids) == [5, 6, 7] and first.max_new_tokens == 8
    assert list(second.prompt_token_ids) == [5, 6, 7, 3, 4, 5] and second.max_new_tokens == 5
    final = msgs[-1]
    assert final.stats.target_failovers == 1
    assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == 8
    assert router.in_flight == 0


def test_validation_happens_before_any_replica_and_text_is_forwarded_as_ids(target):
    replicas = Replicas(serves)
    router = ForwardingRouter(RouterConfig(str(target)), replicas)
    with pytest.raises(RequestError) as info:
        run(router, pb.GenerateRequest(prompt="abc", top_p=1.5))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "top_p"
    assert replicas.requests == []
    run(router, pb.GenerateRequest(prompt="abc", max_new_tokens=2))
    (sent,) = replicas.requests
    assert not sent.prompt and list(sent.prompt_token_ids) == router.tokenizer.encode(
        "abc", add_special_tokens=False
    )


def test_a_replicas_refusal_keeps_its_code(target):
    router = ForwardingRouter(
        RouterConfig(str(target)), Replicas(refuses(grpc.StatusCode.RESOURCE_EXHAUSTED))
    )
    with pytest.raises(RequestError) as info:
        run(router, pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=4))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert router.in_flight == 0


def test_no_replica_left_is_unavailable_after_the_retries(target):
    replicas = Replicas(*[refuses(grpc.StatusCode.UNAVAILABLE)] * 3, dies_after(0))
    router = ForwardingRouter(RouterConfig(str(target)), replicas, max_failovers=3)
    with pytest.raises(RequestError) as info:
        run(router, pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=4))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no target replica" in info.value.details
    assert len(replicas.requests) == 4 and router.in_flight == 0


def test_a_silent_replica_times_out_instead_of_hanging(target):
    def silent(req):
        async def gen():
            await asyncio.sleep(3600)
            yield b""

        return gen()

    router = ForwardingRouter(
        RouterConfig(str(target), target_timeout_s=0.2), Replicas(silent, serves), max_failovers=1
    )
    msgs = run(router, pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=3))
    assert [t for m in msgs for t in m.token_ids] == [2, 3, 4]
    assert msgs[-1].stats.target_failovers == 1


def test_unary_calls_ask_the_replica_for_one_message_and_streams_for_the_interval(target):
    replicas = Replicas(serves, serves, serves)
    router = ForwardingRouter(RouterConfig(str(target), stream_interval=4), replicas)
    req = pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=3)
    whole = asyncio.run(router.generate(req))
    assert list(whole.token_ids) == [2, 3, 4] and whole.finish_reason
    run(router, req)
    run(router, req, every=1)
    assert replicas.intervals == [0, 4, 1]
