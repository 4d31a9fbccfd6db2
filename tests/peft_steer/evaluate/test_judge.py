"""The LLM judge client against a small OpenAI-compatible server on 127.0.0.1: good, slow, garbled, refused."""

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from peft_steer.data import BEHAVIORS, read_behavior_rows
from peft_steer.evaluate.judge import (
    RUBRIC,
    RUBRICS,
    JudgeConfig,
    JudgeError,
    judge_file,
    judge_prompt,
    parse_score,
    shipped_examples,
)


class Judge(BaseHTTPRequestHandler):
    """Replies by the answer under test: 'slow' sleeps past the timeout, 'garbled' is not a score, 'broken' is not
    JSON; otherwise the score is the number of times 'power' appears in the answer, capped at 4."""

    calls: list = []
    prompts: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        Judge.prompts.append(prompt)
        # The answer in a behavior's rubric (Response: "...") or in the generic one (Answer: ...).
        answer = re.search(r'\nResponse: "(.*?)"\n\n|\nAnswer: (.*?)\n\nRate the answer', prompt, re.DOTALL)
        answer = answer.group(1) if answer.group(1) is not None else answer.group(2)
        Judge.calls.append(answer)
        if answer == "slow":
            threading.Event().wait(1.0)
        if answer == "broken":
            payload = b"<html>oops</html>"
        else:
            content = (
                "I cannot rate this." if answer == "garbled" else f"Score: {min(4, max(1, answer.count('power')))}"
            )
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Judge.calls, Judge.prompts = [], []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def write_generations(path, answers):
    with open(path, "w") as file:
        for number, answer in enumerate(answers):
            file.write(json.dumps({"id": number, "question": "Take control?", "generation": answer}) + "\n")


def test_parse_score():
    assert parse_score("Score: 3") == 3 and parse_score("4") == 4
    assert parse_score("10 out of 10") is None and parse_score("no idea") is None


def test_scores_timeouts_and_garbled_replies_are_all_kept(server, tmp_path):
    write_generations(tmp_path / "gen.jsonl", ["power power power", "slow", "garbled", "broken", "no"])
    config = JudgeConfig(base_url=server, model="judge", timeout=0.3, retries=1)
    results = judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "scores.jsonl"), "power-seeking", config, False)
    assert [r["score"] for r in results] == [3, None, None, None, 1]
    assert "no reply" in results[1]["error"] and "after 2 attempts" in results[1]["error"]
    assert "unparsable judge reply" in results[2]["error"]
    assert "not an OpenAI chat completion" in results[3]["error"]
    saved = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    assert [r["id"] for r in saved] == [0, 1, 2, 3, 4]
    # a rerun only retries what has no score yet
    Judge.calls = []
    judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "scores.jsonl"), "power-seeking", config, False)
    assert sorted(Judge.calls) == sorted(["slow", "slow", "garbled", "broken"])


def test_refused_connection_stops_with_a_clear_message_and_keeps_results(server, tmp_path):
    write_generations(tmp_path / "gen.jsonl", ["power", "power power"])
    config = JudgeConfig(base_url=server, model="judge")
    judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "scores.jsonl"), "power-seeking", config, False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    write_generations(tmp_path / "gen.jsonl", ["power", "power power", "power power power"])
    refused = JudgeConfig(base_url=f"http://127.0.0.1:{closed_port}/v1", model="judge")
    with pytest.raises(JudgeError, match="cannot reach the judge .* Is the server running"):
        judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "scores.jsonl"), "power-seeking", refused, False)
    saved = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    assert [r["score"] for r in saved] == [1, 2]  # the earlier results are intact


def test_a_judge_run_killed_mid_write_resumes_after_its_complete_scores(server, tmp_path):
    write_generations(tmp_path / "gen.jsonl", ["power", "power power", "power power power"])
    config = JudgeConfig(base_url=server, model="judge")
    scores = tmp_path / "scores.jsonl"
    judge_file(str(tmp_path / "gen.jsonl"), str(scores), "power-seeking", config, False)
    lines = scores.read_text().splitlines(keepends=True)
    scores.write_text("".join(lines[:1]) + lines[1][: len(lines[1]) // 2])  # killed while writing the second score
    Judge.calls = []
    results = judge_file(str(tmp_path / "gen.jsonl"), str(scores), "power-seeking", config, False)
    assert Judge.calls == ["power power", "power power power"]  # the cut-off score is redone, the complete one kept
    assert [r["score"] for r in results] == [1, 2, 3]
    assert [json.loads(line)["id"] for line in scores.read_text().splitlines()] == [0, 1, 2]


def test_bad_input_is_named(tmp_path):
    with open(tmp_path / "gen.jsonl", "w") as file:
        file.write(json.dumps({"question": "q"}) + "\n")
    config = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge")
    with pytest.raises(ValueError, match="record 1 has no text column 'generation'"):
        judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "out.jsonl"), "power-seeking", config, False)
    with pytest.raises(ValueError, match="behavior='rudeness' has no rubric .* give definition="):
        judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "out.jsonl"), "rudeness", config, False)
    # an id given to two answers (the old run-index ids "+2/0" of two runs): one score would stand for both (issue 24)
    with open(tmp_path / "gen.jsonl", "w") as file:
        for question in ("Old question?", "New question?"):
            file.write(json.dumps({"id": "+2/0", "question": question, "generation": "a"}) + "\n")
    with pytest.raises(ValueError, match="records 1 and 2 have one id, '\\+2/0'"):
        judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "out.jsonl"), "power-seeking", config, False)
    assert not (tmp_path / "out.jsonl").exists()


# ---- the rubrics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("behavior", BEHAVIORS)
def test_each_shipped_behavior_has_a_rubric_with_example_answers_of_its_question(behavior):
    row = read_behavior_rows(behavior, "test_infer")[0]
    if "not_matching" in row:  # jailbreak: pairs
        score_4, score_1 = row["matching"], row["not_matching"]
    else:  # A/B questions: the matching letter's answer scores 4
        score_4, score_1 = (row["A"], row["B"]) if row["matching"].strip("() ") == "A" else (row["B"], row["A"])
    assert shipped_examples(behavior)[row["question"]] == (score_4, score_1)
    prompt = judge_prompt(behavior, row["question"], "my answer", shipped_examples(behavior)[row["question"]])
    assert f'Question: "{row["question"]}"' in prompt and 'Response: "my answer"' in prompt
    assert RUBRICS[behavior].task in prompt
    for score, rule in zip((4, 3, 2, 1), RUBRICS[behavior].rules, strict=True):
        assert f"Score {score}: {rule}" in prompt
    # The example of score 4 follows the rule of score 4, that of score 1 the rule of score 1.
    assert f'{RUBRICS[behavior].rules[0]} Here is an example of a response that scores 4: "{score_4}"\n' in prompt
    assert prompt.index(f'scores 1: "{score_1}"') > prompt.index("Score 1: ")
    assert "Rate the answer on this 4-point scale" not in prompt  # not the generic rubric


def test_the_judge_sends_the_behavior_rubric_with_the_examples_of_each_question(server, tmp_path):
    rows = read_behavior_rows("power-seeking", "test_infer")[:2]
    with open(tmp_path / "gen.jsonl", "w") as file:
        for number, row in enumerate(rows):
            file.write(json.dumps({"id": number, "question": row["question"], "generation": "power"}) + "\n")
        own = {"id": 2, "question": "Unknown?", "generation": "power power", "matching": "Yes.", "not_matching": "No."}
        file.write(json.dumps(own) + "\n")
        file.write(json.dumps({"id": 3, "question": "Not shipped?", "generation": "power"}) + "\n")
    config = JudgeConfig(base_url=server, model="judge")
    results = judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "scores.jsonl"), "power-seeking", config, False)
    assert [r["score"] for r in results] == [1, 1, 2, 1]  # parsed from the replies as before
    for row, prompt in zip(rows, Judge.prompts, strict=False):
        score_4, score_1 = shipped_examples("power-seeking")[row["question"]]
        assert f'scores 4: "{score_4}"' in prompt and f'scores 1: "{score_1}"' in prompt
    assert 'scores 4: "Yes."' in Judge.prompts[2] and 'scores 1: "No."' in Judge.prompts[2]  # the record's own
    assert "Score 4: " in Judge.prompts[3] and "Here is an example" not in Judge.prompts[3]  # none to show


def test_an_unknown_behavior_gets_the_generic_rubric(server, tmp_path):
    write_generations(tmp_path / "gen.jsonl", ["power power", "no"])
    config = JudgeConfig(base_url=server, model="judge")
    definition = "a tendency to flatter the user"
    results = judge_file(
        str(tmp_path / "gen.jsonl"), str(tmp_path / "scores.jsonl"), "flattery", config, False, definition=definition
    )
    assert [r["score"] for r in results] == [2, 1]
    expected = RUBRIC.format(definition=definition, question="Take control?", answer="power power")
    assert Judge.prompts[0] == expected
    assert judge_prompt("flattery", "Q?", "A", ("x", "y"), definition) == RUBRIC.format(
        definition=definition, question="Q?", answer="A"
    )


def test_parsing_replies_in_the_rubric_form():
    assert parse_score('4\nThe response accepts the power "without" any hesitation.') == 4
    assert parse_score("Score 1: the response turns the offer down.") == 1
    assert parse_score("2 - neutral; it weighs 10 factors") == 2
