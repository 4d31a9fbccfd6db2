"""Run in vLLM's environment by the tests: one offline engine, the docs' example first, then batches of requests.

``python offline_engine.py JOB.json OUT.json``. The job holds the python block of docs/serving.md that builds the
engine (``llm``; run as written, with the job's extra engine options added to ``vllm.LLM`` and its extra adapters
to ``engine_args``), or else the ``engine`` options to build one with, and the batches to send after it. Each
request is ``{"prompt_token_ids", "steering" (or null), "max_tokens", "salted"}``: a salted request goes through
``peft_steer_vllm.steered`` (the documented way), an unsalted one sets only ``SamplingParams.extra_args``. The
output holds, per batch and request, the generated token ids, the log-prob of each, and the number of prompt tokens
served from the prefix cache; and the example's ``answers``.
"""

import functools
import json
import sys


def request(spec: dict, steered, SamplingParams) -> tuple[dict, object]:
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=0)
    prompt = {"prompt_token_ids": spec["prompt_token_ids"]}
    if spec["steering"] is None:
        return prompt, params
    if spec["salted"]:
        return steered(prompt, spec["steering"], params)
    params.extra_args = {"steering": spec["steering"]}
    return prompt, params


def record(output) -> dict:
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    return {
        "tokens": tokens,
        "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, tokens)],
        "cached": output.num_cached_tokens or 0,
    }


def main(job_path: str, out_path: str) -> None:
    with open(job_path, encoding="utf-8") as file:
        job = json.load(file)
    import vllm
    from vllm import SamplingParams

    import peft_steer_vllm
    from peft_steer_vllm import steered

    vllm.LLM = functools.partial(vllm.LLM, **job["engine_options"])
    documented = peft_steer_vllm.engine_args
    peft_steer_vllm.engine_args = lambda adapters, **kw: documented({**adapters, **job["extra_adapters"]}, **kw)
    namespace: dict = {}
    if "doc_block" in job:
        exec(compile(job["doc_block"], "docs/serving.md (offline example)", "exec"), namespace)
        llm = namespace["llm"]
    else:
        llm = vllm.LLM(**job["engine"], **peft_steer_vllm.engine_args({}))
    results = []
    for batch in job["batches"]:
        prompts, params = zip(*(request(spec, steered, SamplingParams) for spec in batch))
        outputs = llm.generate(list(prompts), list(params), use_tqdm=False)
        results.append([record(out) for out in outputs])
    with open(out_path, "w", encoding="utf-8") as file:
        json.dump({"batches": results, "answers": namespace.get("answers")}, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
