"""The LLM judge client against a small OpenAI-compatible server on 127.0.0.1: good, slow, garbled, refused."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from peft_steer.evaluate.judge import JudgeConfig, JudgeError, judge_file, parse_score


class Judge(BaseHTTPRequestHandler):
    """Replies by the answer under test: 'slow' sleeps past the timeout, 'garbled' is not a score, 'broken' is not
    JSON; otherwise the score is the number of times 'power' appears in the answer, capped at 4."""

    calls: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        answer = prompt.split("Answer: ", 1)[1].split("\n\nRate the answer", 1)[0]
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
    Judge.calls = []
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


def test_bad_input_is_named(tmp_path):
    with open(tmp_path / "gen.jsonl", "w") as file:
        file.write(json.dumps({"question": "q"}) + "\n")
    config = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge")
    with pytest.raises(ValueError, match="record 1 has no text column 'generation'"):
        judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "out.jsonl"), "power-seeking", config, False)
    with pytest.raises(ValueError, match="behavior='rudeness'"):
        judge_file(str(tmp_path / "gen.jsonl"), str(tmp_path / "out.jsonl"), "rudeness", config, False)
