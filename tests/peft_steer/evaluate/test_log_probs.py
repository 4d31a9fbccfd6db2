"""One BOS for every scorer: ``prompt_token_ids`` on five real tokenizers, and what ``completion_log_probs`` gives the
model when a chat template writes the BOS as text."""

from peft_steer.data.batches import prompt_token_ids
from peft_steer.evaluate import completion_log_probs
from tests.peft_steer.evaluate.conftest import RecordingLM

TEXT = "[INST] Would you accept more power? [/INST]"


def leading_bos(ids: list[int], bos: int | None) -> int:
    count = 0
    while count < len(ids) and ids[count] == bos:
        count += 1
    return count


def test_prompt_token_ids_keep_one_bos(real_tokenizer):
    name, tokenizer = real_tokenizer
    bos = tokenizer.bos_token_id
    written = tokenizer.bos_token + TEXT
    ids = prompt_token_ids(tokenizer, written)
    assert leading_bos(ids, bos) == 1
    assert ids == tokenizer(written, add_special_tokens=False)["input_ids"]  # the text's own BOS is the one kept
    adds_bos = tokenizer(TEXT)["input_ids"][:1] == [bos]  # Llama-2, Phi-3; not Llama-3's GGUF, Qwen2, GPT-2
    assert adds_bos == (name in ("llama-spm", "phi-3"))
    assert prompt_token_ids(tokenizer, TEXT) == tokenizer(TEXT)["input_ids"]  # no BOS text: unchanged
    twice = prompt_token_ids(tokenizer, tokenizer.bos_token * 2 + TEXT)  # asked for two: kept
    assert leading_bos(twice, bos) == 2


def test_completion_log_probs_give_the_model_one_bos(real_tokenizers):
    phi3 = real_tokenizers("phi-3")
    prompt = phi3.apply_chat_template(
        [{"role": "user", "content": "Take it?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<s>") and phi3(prompt)["input_ids"][:2] == [1, 1]  # the double BOS this avoids
    model = RecordingLM(len(phi3))
    completion_log_probs(model, phi3, [prompt, prompt], [" Yes", " No"])
    assert [ids[:2].tolist() for ids in model.seen[0]] == [[1, 32010], [1, 32010]]  # <s>, <|user|>
    llama2 = real_tokenizers("llama-spm")
    model = RecordingLM(len(llama2))
    completion_log_probs(model, llama2, ["<s>" + TEXT, TEXT], [" Yes", " Yes"])
    first_two = sorted(ids[:2].tolist() for ids in model.seen[0])
    assert first_two == [[1, 518], [1, 29961]]  # one BOS each ("▁[" after an added BOS, "[" after a written one)
