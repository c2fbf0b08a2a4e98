"""``modlm-serve`` as a client meets it: a live server on 127.0.0.1 (a free port, stopped by the test)
driven by the ``openai`` package. Greedy text is ``modlm-generate``'s whoever else is served, a stream
joins to the whole answer, bad input gets a 4xx and the next request is served, the key is checked,
a full line answers 503, a client that goes away frees its row, and SIGTERM drains and exits."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import openai
import pytest

from modlm.cli.generate import GenerateOptions, continuations
from modlm.saved import load_saved
from modlm.serve.command import main as serve_main
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow  # each server is a process that loads torch and the model
NAME = "tiny-mod"
PROMPTS = [
    "def f(",
    "import os\nimport sys\n",
    "class A:",
    "    return x",
    "for i in range(10):\n    ",
    "x",
    "# a",
    "y = [",
]


class Server:
    """``python -m modlm.serve FOLDER ARGS`` on a free port of 127.0.0.1, up once ``/health`` answers."""

    def __init__(self, folder, *args, env=None, log=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src"),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modlm.serve",
                str(folder),
                "--port",
                str(self.port),
                "--model_name",
                NAME,
                "--log_level",
                "warning",
                "--threads",
                "1",
                *map(str, args),
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "w") if log else subprocess.DEVNULL,
        )
        end = time.monotonic() + 180
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}"
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not come up in 180 s")

    def client(self, key="none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def request(self, method, path, body=None, headers=None, timeout=30) -> tuple[int, dict]:
        """A raw request (any body, bytes or a dict as JSON): its status and JSON answer."""
        if isinstance(body, dict):
            body = json.dumps(body)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    @contextmanager
    def stream(self, body: dict):
        """A streamed completion as an iterator of its non-empty lines; leaving the block hangs up."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"model": NAME, "stream": True, **body}),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200
        try:
            yield (line.decode().strip() for line in iter(response.readline, b"") if line.strip())
        finally:
            connection.close()

    def load(self) -> dict:
        return self.request("GET", "/health")[1]

    def accepts(self) -> bool:
        """Whether a new connection is answered."""
        try:
            self.request("GET", "/health", timeout=2)
            return True
        except OSError:
            return False

    def stop(self) -> int:
        """SIGTERM, and its exit status (a server that does not exit within 60 s is killed: no test leaves one)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()


def wait_for(condition, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def saved(model_folder):
    return load_saved(str(model_folder))


@pytest.fixture(scope="module")
def server(model_folder):
    with Server(model_folder, "--max_batch", 8, "--prefill_chunk", 4) as s:
        yield s
        assert s.stop() == 0


def alone(saved, prompt, **options) -> str:
    return continuations(saved, [prompt], GenerateOptions(**options), stream=False)[0]


def complete(client, prompt, stream=False, **settings):
    """The text, finish reason and usage of one completion, streamed or whole."""
    if not stream:
        r = client.completions.create(model=NAME, prompt=prompt, **settings)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, reason, usage = "", None, None
    for chunk in client.completions.create(
        model=NAME, prompt=prompt, stream=True, stream_options={"include_usage": True}, **settings
    ):
        if chunk.choices:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        usage = chunk.usage or usage
    return text, reason, usage


def test_greedy_text_is_modlm_generates_whoever_else_is_served(server, saved):
    """Eight concurrent requests of different lengths, half of them streamed, one with a stop string."""
    lengths = [40, 12, 33, 8, 25, 60, 5, 18]
    stops = {2: ["e"]}
    client = server.client()
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [
            pool.submit(complete, client, p, i % 2 == 1, max_tokens=n, temperature=0, stop=stops.get(i))
            for i, (p, n) in enumerate(zip(PROMPTS, lengths))
        ]
        got = [f.result() for f in futures]
    want = [
        alone(saved, p, max_new_tokens=n, temperature=0, stop=stops.get(i, []))
        for i, (p, n) in enumerate(zip(PROMPTS, lengths))
    ]
    assert [text for text, _, _ in got] == want
    assert len(set(want)) == len(want) and all(len(set(w)) > 3 for w in want[:2]), "continuations must vary"
    assert [reason for _, reason, _ in got] == [
        "length",
        "length",
        "stop",
        "length",
        "length",
        "length",
        "length",
        "length",
    ]
    for (_, reason, usage), prompt, n in zip(got, PROMPTS, lengths):
        assert usage.prompt_tokens == len(saved.tokenizer.encode(prompt).ids)
        assert usage.completion_tokens == n if reason == "length" else usage.completion_tokens < n


def test_a_stream_joins_to_the_whole_answer(server):
    client = server.client()
    for settings in (dict(temperature=0), dict(temperature=0.8, top_k=30, seed=3)):
        extra = {"extra_body": {"top_k": settings.pop("top_k")}} if "top_k" in settings else {}
        whole = complete(client, PROMPTS[0], max_tokens=50, **settings, **extra)
        streamed = complete(client, PROMPTS[0], stream=True, max_tokens=50, **settings, **extra)
        assert streamed[0] == whole[0] and streamed[1] == whole[1] and streamed[2] == whole[2]


def test_a_seeded_sample_is_the_seeds_and_modlm_generates(server, saved):
    client = server.client()
    settings = dict(temperature=0.9, top_p=0.9, seed=21)
    first = complete(client, PROMPTS[1], max_tokens=30, extra_body={"top_k": 40}, **settings)[0]
    assert complete(client, PROMPTS[1], max_tokens=30, extra_body={"top_k": 40}, **settings)[0] == first
    assert first == alone(saved, PROMPTS[1], max_new_tokens=30, top_k=40, **settings)
    assert complete(client, PROMPTS[1], max_tokens=30, extra_body={"top_k": 40}, **{**settings, "seed": 22})[0] != first


CONVERSATION = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A function, please."}]


def test_a_chat_answers_what_modlm_generate_chat_answers(server, saved):
    """The conversation rendered with the model's chat template (modlm's default here), answered
    greedily, whole and streamed; content sent as text parts reads as the same text."""
    client = server.client()
    whole = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=30, temperature=0)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert answer.content == alone(saved, CONVERSATION, max_new_tokens=30, temperature=0, chat=True)
    assert len(set(answer.content)) > 3, "the answer must vary for this to test decoding"
    prompt = continuations_prompt(saved, CONVERSATION)
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == 30
    chunks = list(
        client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=30, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.content
    assert chunks[-1].choices[0].finish_reason == "length"
    parts = [
        {**m, "content": [{"type": "text", "text": m["content"][:5]}, {"type": "text", "text": m["content"][5:]}]}
        for m in CONVERSATION
    ]
    again = client.chat.completions.create(model=NAME, messages=parts, max_tokens=30, temperature=0)
    assert again.choices[0].message.content == answer.content


def continuations_prompt(saved, messages) -> list[int]:
    from modlm.data.chat import ChatEncoder

    return ChatEncoder(saved.tokenizer.to_str(), saved.chat_template).encode(messages, add_generation_prompt=True)[0]


def test_a_bad_conversation_gets_a_400_naming_it(server):
    client = server.client()
    cases = {
        "role 'robot'": [{"role": "robot", "content": "hi"}],
        "no 'content'": [{"role": "user"}],
        "non-empty list": [],
        "only text content": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    }
    for words, messages in cases.items():
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model=NAME, messages=messages, max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=CONVERSATION, max_completion_tokens=10**6)
    assert client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=2).choices[0].finish_reason


def test_models_and_health(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [NAME]
    load = server.load()
    assert load["status"] == "ok" and load["running"] == 0 and load["waiting"] == 0 and load["max_batch"] == 8


BAD = {  # body -> (status, the message names this)
    '{"model": "tiny-mod", "prompt": "x", "max_tokens": -3}': (400, "max_tokens"),
    '{"model": "tiny-mod", "prompt": "x", "max_tokens": 100000000}': (400, "maximum context length"),
    '{"model": "tiny-mod", "prompt": "x", "temperature": -1}': (400, "temperature"),
    '{"model": "tiny-mod", "prompt": "x", "temperature": "hot"}': (400, "temperature"),
    '{"model": "tiny-mod", "prompt": "x", "top_p": 0}': (400, "top_p"),
    '{"model": "tiny-mod", "prompt": "x", "top_k": 0}': (400, "top_k"),
    '{"model": "tiny-mod", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}': (400, "stop"),
    '{"model": "tiny-mod", "prompt": "x", "n": 2}': (400, "n:"),
    '{"model": "tiny-mod", "prompt": ""}': (400, "prompt"),
    '{"model": "tiny-mod", "prompt": [1, 2, 99999999]}': (400, "token ids"),
    '{"model": "tiny-mod", "prompt": "' + "x " * 9000 + '"}': (400, "maximum context length"),
    '{"model": "someone-else", "prompt": "x"}': (404, "does not exist"),
    '{"prompt": "x"}': (400, "model"),
    "not json at all": (400, "not valid JSON"),
    '{"model": "tiny-mod", "prompt": "x"': (400, "not valid JSON"),
    "[1, 2, 3]": (400, "valid dictionary"),
}


def test_bad_input_gets_a_4xx_and_the_next_request_is_served(server):
    client = server.client()
    for body, (status, words) in BAD.items():
        code, answer = server.request("POST", "/v1/completions", body)
        error = answer["error"]
        assert code == status and words in error["message"] and error["type"], (body[:60], answer)
        assert complete(client, "def", max_tokens=2, temperature=0)[1] == "length"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    code, answer = server.request("POST", "/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert code == 413 and "bytes" in answer["error"]["message"]
    assert server.request("GET", "/v1/nothing")[0] == 404
    assert complete(client, "def", max_tokens=2, temperature=0)[1] == "length"


def test_a_client_that_goes_away_frees_its_row(server):
    def cancelled():
        return server.load()["ended"].get("cancelled", 0)

    before = cancelled()
    with server.stream({"prompt": "def", "max_tokens": 8000, "temperature": 0}) as lines:
        next(lines)
        assert wait_for(lambda: server.load()["running"] == 1)
    assert wait_for(lambda: cancelled() == before + 1) and server.load()["running"] == 0
    with pytest.raises(TimeoutError):  # a whole answer: the client gives up waiting
        body = {"model": NAME, "prompt": "def", "max_tokens": 8000, "temperature": 0}
        server.request("POST", "/v1/completions", body, timeout=1)
    assert wait_for(lambda: cancelled() == before + 2) and server.load()["running"] == 0


def test_the_key(model_folder):
    with Server(model_folder, env={"MODLM_API_KEY": "s3cret"}) as server:
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            server.client("wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").completions.create(model=NAME, prompt="x", max_tokens=1)
        assert server.request("POST", "/v1/completions", {"model": NAME, "prompt": "x"})[0] == 401
        assert complete(server.client("s3cret"), "def", max_tokens=3)[1] == "length"
        assert server.request("GET", "/health")[0] == 200  # open: a load balancer's probe has no key
        assert server.stop() == 0


def test_binding_beyond_this_machine_without_a_key_says_so(capsys):
    assert serve_main(["no/such/model.ckpt", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("modlm: warning: listening on 0.0.0.0 with no API key") and "not found" in err[1]
    assert serve_main(["no/such/model.ckpt", "--host", "0.0.0.0", "--api_key", "k"]) == 2
    assert "warning" not in capsys.readouterr().err
    assert serve_main(["no/such/model.ckpt"]) == 2 and "warning" not in capsys.readouterr().err


def test_a_full_line_answers_503(model_folder):
    with Server(model_folder, "--max_batch", 1, "--max_queue", 1) as server:
        client = server.client()
        with cf.ThreadPoolExecutor(1) as pool:
            with server.stream({"prompt": "def", "max_tokens": 8000, "temperature": 0}) as running:
                next(running)
                waiting = pool.submit(complete, client, "x", max_tokens=3)
                assert wait_for(lambda: server.load()["waiting"] == 1)
                with pytest.raises(openai.InternalServerError) as refused:
                    client.completions.create(model=NAME, prompt="y", max_tokens=3)
                assert refused.value.status_code == 503 and "overloaded" in str(refused.value)
            # the running one has gone: the waiting one gets the row
            assert waiting.result(timeout=60)[1] == "length"
        assert server.stop() == 0


def test_sigterm_finishes_what_it_can_cancels_the_rest_and_exits(model_folder, tmp_path):
    """The short request's first chunk has come before the signal, so it is running then (not polled: a
    short request can start and end between two polls of ``/health``); it still finishes, the endless one
    does not within the grace period."""
    with Server(model_folder, "--shutdown_timeout", 1, log=tmp_path / "server.log") as server:
        endless = server.stream({"prompt": "x", "max_tokens": 8000, "temperature": 0})
        short = server.stream(
            {"prompt": "def", "max_tokens": 10, "temperature": 0, "stream_options": {"include_usage": True}}
        )
        with endless as endless, short as short:
            next(endless)
            chunks = [next(short)]
            server.proc.send_signal(signal.SIGTERM)
            chunks += list(short)
            *events, usage, done = [json.loads(c.removeprefix("data: ")) for c in chunks[:-1]] + [chunks[-1]]
            assert events[-1]["choices"][0]["finish_reason"] == "length" and done == "data: [DONE]"
            assert usage["usage"]["completion_tokens"] == 10  # in flight at the signal: finished
            assert wait_for(lambda: not server.accepts(), 10)  # no new connection once it is stopping
            *_, error, done = endless  # past the grace period: an error event ends it
            assert json.loads(error.removeprefix("data: "))["error"]["message"].startswith("the server stopped")
            assert done == "data: [DONE]"
        assert server.stop() == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()
