"""steering() and prompt_lengths() belong to the thread or asyncio task that enters them: one model serves concurrent
requests, each at its own strength, and the stored default never changes."""

import asyncio
import contextvars
import threading

import pytest
import torch
from peft import get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model

ROUNDS = 10
WAIT = 60  # seconds a barrier waits: far more than a tiny forward takes, so only a hang trips it


def make(**config):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1], **config))
    generator = torch.Generator().manual_seed(4)
    peft_steer.set_vectors(model, {1: 0.5 * torch.randn(32, generator=generator)})
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def alone(model, input_ids, multiplier):
    """The logits at ``multiplier`` with nothing else running."""
    if multiplier is None:
        return logits(model, input_ids)
    with peft_steer.steering(model, multiplier=multiplier):
        return logits(model, input_ids)


def run_threads(targets):
    """Run each target in a thread of its own; re-raise the first error any of them raised."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001  (reported in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5 * WAIT)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_concurrent_threads_each_steer_with_their_own_multiplier(input_ids):
    model = make(multiplier=0.5)
    strengths = [3.0, -3.0, None]  # None: a request that is not steered runs at the stored default
    expected = {m: alone(model, input_ids, m) for m in strengths}
    assert not torch.allclose(expected[3.0], expected[-3.0])
    barrier = threading.Barrier(len(strengths))
    seen = {m: [] for m in strengths}

    def request(multiplier):
        def run():
            context = peft_steer.steering(model, multiplier) if multiplier is not None else torch.no_grad()
            with context:
                for _ in range(ROUNDS):
                    barrier.wait(WAIT)  # every thread is inside its block before any forward: they interleave
                    seen[multiplier].append((logits(model, input_ids), peft_steer.get_multiplier(model)))

        return run

    run_threads([request(m) for m in strengths])
    for multiplier, results in seen.items():
        assert len(results) == ROUNDS
        for output, reported in results:
            torch.testing.assert_close(output, expected[multiplier], rtol=0, atol=1e-6)
            assert reported == (0.5 if multiplier is None else multiplier)
    assert peft_steer.get_multiplier(model) == 0.5 and model.peft_config["default"].multiplier == 0.5


def test_exits_in_any_order_leave_the_stored_default(input_ids):
    model = make(multiplier=0.5)
    default = alone(model, input_ids, None)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    inside_after_other_left = []

    def first():
        with peft_steer.steering(model, 3.0):
            first_in.set()
            assert second_in.wait(WAIT)
        first_out.set()  # leaves while the second block is still open

    def second():
        assert first_in.wait(WAIT)
        with peft_steer.steering(model, -3.0):
            second_in.set()
            assert first_out.wait(WAIT)
            inside_after_other_left.append(peft_steer.get_multiplier(model))

    run_threads([first, second])
    assert inside_after_other_left == [-3.0]
    assert peft_steer.get_multiplier(model) == 0.5
    torch.testing.assert_close(logits(model, input_ids), default, rtol=0, atol=0)


def test_out_of_order_exits_in_one_thread_leave_nothing_behind():
    model = make(multiplier=0.5)
    outer, inner = peft_steer.steering(model, 2.0), peft_steer.steering(model, -1.0)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert peft_steer.get_multiplier(model) == -1.0
    inner.__exit__(None, None, None)
    assert peft_steer.get_multiplier(model) == 0.5


def test_set_multiplier_inside_a_block_changes_the_default_not_the_block():
    model = make(multiplier=0.5)
    with peft_steer.steering(model, 2.0):
        peft_steer.set_multiplier(model, -1.0)
        assert peft_steer.get_multiplier(model) == 2.0
    assert peft_steer.get_multiplier(model) == -1.0 and model.peft_config["default"].multiplier == -1.0


def test_nested_blocks_on_several_adapters(input_ids):
    model = make()
    model.add_adapter("other", SteeringConfig(layers=[2], init="random"))
    model.base_model.set_adapter(["default", "other"])
    with peft_steer.steering(model, 2.0):
        with peft_steer.steering(model, -1.0, adapter_name="other"):
            assert peft_steer.get_multiplier(model, "default") == 2.0
            assert peft_steer.get_multiplier(model, "other") == -1.0
            nested = logits(model, input_ids)
        assert peft_steer.get_multiplier(model, "other") == 2.0
    peft_steer.set_multiplier(model, 2.0, adapter_name="default")
    peft_steer.set_multiplier(model, -1.0, adapter_name="other")
    torch.testing.assert_close(nested, logits(model, input_ids), rtol=0, atol=0)


def test_asyncio_tasks_each_steer_with_their_own_multiplier(input_ids):
    model = make(multiplier=0.5)
    expected = {m: alone(model, input_ids, m) for m in (3.0, -3.0)}

    async def request(multiplier):
        with peft_steer.steering(model, multiplier):
            outputs = []
            for _ in range(ROUNDS):
                await asyncio.sleep(0)  # let the other request enter its block and run
                outputs.append(logits(model, input_ids))
            return outputs

    async def serve():
        return await asyncio.gather(request(3.0), request(-3.0))

    for multiplier, outputs in zip((3.0, -3.0), asyncio.run(serve())):
        for output in outputs:
            torch.testing.assert_close(output, expected[multiplier], rtol=0, atol=1e-6)
    assert peft_steer.get_multiplier(model) == 0.5


def test_work_that_copies_the_context_carries_the_block_and_a_plain_thread_does_not():
    model = make(multiplier=0.5)
    seen = {}

    def record(name):
        seen[name] = peft_steer.get_multiplier(model)

    async def from_a_task():
        await asyncio.gather(asyncio.create_task(asyncio.to_thread(record, "to_thread")))
        await asyncio.create_task(asyncio.sleep(0))
        record("task")

    with peft_steer.steering(model, 3.0):
        run_threads([lambda: record("plain thread")])
        copied = contextvars.copy_context()  # in this thread, inside the block
        run_threads([lambda: copied.run(record, "copied context")])
        asyncio.run(from_a_task())
    assert seen == {"plain thread": 0.5, "copied context": 3.0, "to_thread": 3.0, "task": 3.0}


def test_concurrent_prompt_lengths_each_apply_to_their_own_thread(input_ids):
    model = make(positions="completion")
    lengths = {"short": torch.tensor([2, 3]), "long": torch.tensor([6, 5])}
    expected = {}
    for name, value in lengths.items():
        with peft_steer.prompt_lengths(model, value):
            expected[name] = logits(model, input_ids)
    assert not torch.allclose(expected["short"], expected["long"])
    barrier = threading.Barrier(2)
    seen = {name: [] for name in lengths}

    def request(name):
        def run():
            with peft_steer.prompt_lengths(model, lengths[name]):
                for _ in range(ROUNDS):
                    barrier.wait(WAIT)
                    seen[name].append(logits(model, input_ids))

        return run

    run_threads([request(name) for name in lengths])
    for name, outputs in seen.items():
        assert len(outputs) == ROUNDS
        for output in outputs:
            torch.testing.assert_close(output, expected[name], rtol=0, atol=1e-6)


class InStep(LogitsProcessor):
    """Waits at a barrier at every generation step, so two generate calls run their steps in lock step."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier

    def __call__(self, input_ids, scores):
        self.barrier.wait(WAIT)
        return scores


@pytest.mark.parametrize("positions", ["all", "completion"])
def test_concurrent_generate_calls_each_steer_their_own_prompt(positions):
    model = make(positions=positions, multiplier=2.0)
    prompts = {3.0: torch.tensor([[5, 17, 42, 8, 99]]), -3.0: torch.tensor([[7, 9, 11, 13, 15, 17, 19, 21, 23]])}
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)

    def generate(multiplier, **extra):
        with peft_steer.steering(model, multiplier):
            out = model.generate(input_ids=prompts[multiplier], **settings, **extra)
        return out.sequences, torch.stack(out.logits, dim=1)

    expected = {m: generate(m) for m in prompts}
    barrier = threading.Barrier(len(prompts))
    seen = {}

    def request(multiplier):
        def run():
            seen[multiplier] = generate(multiplier, logits_processor=LogitsProcessorList([InStep(barrier)]))

        return run

    run_threads([request(m) for m in prompts])
    for multiplier, (sequences, scores) in seen.items():
        assert torch.equal(sequences, expected[multiplier][0])
        torch.testing.assert_close(scores, expected[multiplier][1], rtol=0, atol=1e-5)


def replicate_like_data_parallel(network):
    """The module tree that torch.nn.parallel.replicate builds for one device, with the parameters left in place (it
    needs CUDA devices only to copy them)."""
    modules = list(network.modules())
    copies = {id(module): module._replicate_for_data_parallel() for module in modules}
    for module in modules:
        replica = copies[id(module)]
        for name, child in module._modules.items():
            replica._modules[name] = None if child is None else copies[id(child)]
        for name, parameter in module._parameters.items():
            setattr(replica, name, None if parameter is None else parameter.view_as(parameter))
    return copies[id(network)]


def test_a_data_parallel_replica_steers_with_its_callers_multiplier(input_ids):
    """nn.DataParallel (the Trainer's choice on several GPUs without a launcher) runs each replica in a new thread."""
    model = make(multiplier=0.5)
    expected = alone(model, input_ids, 3.0)
    outputs = []
    with peft_steer.steering(model, 3.0):
        replica = replicate_like_data_parallel(model)  # DataParallel replicates inside the caller's forward
        run_threads([lambda: outputs.append(logits(replica, input_ids))])
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=1e-6)
