"""How a question and its answers become prompt / completion text: the plain format and chat templates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .files import DataError

# The system prompt of the official BiPO code (Llama-2 chat format).
SYSTEM_PROMPT = "You are a helpful, honest and concise assistant."

# Stands for the answer when the template is rendered once to find what it writes around an answer: plain text that
# a template's `trim` leaves as it is.
_ANSWER = "PEFT_STEER_ANSWER_7f3a"


def plain_prompt(question: str) -> str:
    """The plain base-model format, ``Question: {question}\\nAnswer:`` (answers follow after one space)."""
    return f"Question: {question}\nAnswer:"


class PairFormatter:
    """Renders a question and its answers as prompt / completion text, the way the model sees them.

    Answers are used as they are (not stripped), as the official BiPO code does. With a chat template: the prompt is
    the system and user turns plus the generation prompt; each completion is what the template writes before the
    answer, the answer, and the template's end-of-turn token (the first special token after the answer), with no
    whitespace before that token and nothing after it. For Llama-2 that is ``" {answer}</s>"``: the official code's
    ``' ' + answer`` followed by the EOS id, with no lone ``▁`` token before EOS; for ChatML ``"{answer}<|im_end|>"``.
    A template that ends the answer with no special token keeps its text after the answer, and the trainer appends
    EOS. A leading BOS that the template writes as text is removed when the tokenizer adds BOS itself, so the model
    sees one. Without a template (a base model): ``"Question: {question}\\nAnswer:"`` and ``" {answer}"`` (EOS is
    added by the trainer).
    """

    def __init__(
        self, tokenizer: Any = None, *, system_prompt: str | None = SYSTEM_PROMPT, chat_template: bool | None = None
    ) -> None:
        has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise DataError(
                "chat_template=True, but "
                + ("no tokenizer was given." if tokenizer is None else "the tokenizer has no chat template.")
            )
        self.tokenizer = tokenizer
        self.use_template = has_template if chat_template is None else bool(chat_template)
        self.system_prompt = system_prompt
        self._system_role: bool | None = None  # found out on the first question: does the template take it?
        self._strip_bos = False
        if self.use_template and tokenizer.bos_token:
            encoded = tokenizer("x")["input_ids"]
            self._strip_bos = bool(encoded) and encoded[0] == tokenizer.bos_token_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _turns(self, question: str) -> list[dict]:
        if not self.system_prompt:
            return [{"role": "user", "content": question}]
        if self._system_role is None:
            try:
                probe = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": "?"}]
                self._render(probe, True)
                self._system_role = True
            except Exception:  # jinja raises TemplateError (or anything) when the template refuses a system role
                self._system_role = False
        if self._system_role:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]
        return [{"role": "user", "content": f"{self.system_prompt}\n\n{question}"}]

    def prompt(self, question: str) -> str:
        """The prompt text of ``question``."""
        if not self.use_template:
            return plain_prompt(question)
        return self._without_bos(self._render(self._turns(question), True))

    def _without_bos(self, text: str) -> str:
        bos = self.tokenizer.bos_token
        return text[len(bos) :] if self._strip_bos and text.startswith(bos) else text

    def __call__(self, question: str, answers: Sequence[str]) -> tuple[str, list[str]]:
        """``(prompt, [completion of each answer])``."""
        prompt = self.prompt(question)
        if not self.use_template:
            return prompt, [f" {answer}" for answer in answers]
        opening, closing = self._answer_frame(question, prompt)
        return prompt, [f"{opening}{answer}{closing}" for answer in answers]

    def _answer_frame(self, question: str, prompt: str) -> tuple[str, str]:
        """What the template writes before and after an answer to ``question``, rendered once with a stand-in."""
        full = self._without_bos(
            self._render([*self._turns(question), {"role": "assistant", "content": _ANSWER}], False)
        )
        if not full.startswith(prompt) or _ANSWER not in full[len(prompt) :]:
            # A template that renders the prompt differently alone than before an answer: the answer as BiPO has it
            # (a leading space), and the trainer adds EOS.
            return " ", ""
        opening, after = full[len(prompt) :].split(_ANSWER, 1)
        return opening, self._end_of_turn(after)

    def _end_of_turn(self, after: str) -> str:
        """The template's text after an answer up to its first special token, with no whitespace before that token
        (a lone ``▁`` on SentencePiece tokenizers) and nothing after it; all of it when it holds no special token."""
        found = [(after.find(token), -len(token), token) for token in _special_tokens(self.tokenizer) if token in after]
        if not found:
            return after
        start, _, token = min(found)
        return after[:start].rstrip() + token


def _special_tokens(tokenizer: Any) -> set[str]:
    """The text of every special token of ``tokenizer`` (BOS, EOS, and added ones such as ``<|im_end|>``)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(token.content for token in added.values() if getattr(token, "special", False))
    return {token for token in tokens if token}
