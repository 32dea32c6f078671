"""The GVM server (examples/serve_gvm.py) as a real process on loopback, and the DVPO actor as its client.

An independent client (tritonclient's HTTP client) gets exactly the in-process values; batching never
changes a bit; every bad request is a 4xx naming the fault and the server keeps serving; SIGTERM answers
the requests in flight; the server binds loopback unless given a token; a DVPO run logs the same metrics
with the served GVM as with the in-process one, and survives the server's death by stopping at a
checkpoint from which it resumes exactly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, ServerProcess, entry_point_env, free_port

# A real server process each (the in-process cases of the same code: tests/test_server_faults.py, quick tier).
pytestmark = pytest.mark.slow


class Server(ServerProcess):
    """``examples/serve_gvm.py`` in a subprocess; ``url`` once it is ready."""

    def __init__(self, gvm: Path, *overrides: str, port: int | None = None, env: dict | None = None):
        super().__init__("examples/serve_gvm.py", f"gvm={gvm}", *overrides, ready_path="/v2/health/ready",
                         name="gvm_server", port=port, env=env)


@pytest.fixture(scope="module")
def gvm_dir(tiny_policy_and_gvm) -> Path:
    return tiny_policy_and_gvm / "gvm"


@pytest.fixture(scope="module")
def server(gvm_dir):
    running = Server(gvm_dir, "server.max_delay_ms=300", "server.max_sequence_length=200",
                     "server.max_body_bytes=200000").wait_ready()
    yield running
    assert running.stop() == 0, running.output()


@pytest.fixture(scope="module")
def in_process_gvm(gvm_dir, megatron_single_rank):
    from nemo_dvpo.rlhf.scorers import LocalValueModel

    return LocalValueModel(str(gvm_dir), "fp32", seq_length=200)


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict | bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _json_request(tokens, lengths, **changes) -> bytes:
    inputs = [{"name": "tokens", "shape": list(np.shape(tokens)), "datatype": "INT64",
               "data": np.asarray(tokens).tolist()},
              {"name": "lengths", "shape": [len(lengths)], "datatype": "INT64", "data": list(lengths)}]
    for index, change in changes.items():
        inputs[int(index[1:])].update(change)
    return json.dumps({"inputs": inputs}).encode()


def _batch(seed: int, rows: int, width: int):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 49152, (rows, width), generator=generator)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    lengths[0] = width
    for row, length in enumerate(lengths.tolist()):
        tokens[row, length:] = 0
    return tokens, lengths


def _triton_values(url: str, tokens: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    inputs = [httpclient.InferInput("tokens", list(tokens.shape), "INT64"),
              httpclient.InferInput("lengths", list(lengths.shape), "INT64")]
    inputs[0].set_data_from_numpy(tokens.numpy().astype(np.int64), binary_data=True)
    inputs[1].set_data_from_numpy(lengths.numpy().astype(np.int64), binary_data=False)
    result = client.infer("gvm", inputs, outputs=[httpclient.InferRequestedOutput("values", binary_data=True)])
    return result.as_numpy("values")


def test_an_independent_client_gets_the_in_process_values(server, in_process_gvm):
    pytest.importorskip("tritonclient.http")
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("gvm")
    metadata = client.get_model_metadata("gvm")
    assert [spec["name"] for spec in metadata["inputs"]] == ["tokens", "lengths"]
    assert metadata["parameters"]["vocab_size"] == in_process_gvm.info.vocab_size
    assert metadata["parameters"]["tokenizer_fingerprint"] == in_process_gvm.info.tokenizer_fingerprint
    tokens, lengths = _batch(0, 5, 77)
    served = _triton_values(server.url, tokens, lengths)
    expected = in_process_gvm.values(tokens, lengths).numpy()
    assert served.dtype == np.float32 and served.shape == (5, 77)
    assert np.array_equal(served, expected), "the server's values differ from the in-process GVM's"
    assert np.abs(expected).max() > 0.1
    status, answer = _post(server.url + "/v2/models/gvm/infer", _json_request(tokens, lengths.tolist()))
    assert status == 200 and np.array_equal(np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(5, 77),
                                            expected)


def test_a_sequence_gets_the_same_bits_alone_padded_or_merged_with_concurrent_requests(server):
    pytest.importorskip("tritonclient.http")
    batches = [_batch(seed, rows, width) for seed, (rows, width) in enumerate([(3, 40), (1, 130), (4, 9), (2, 64),
                                                                               (5, 100), (1, 1)])]
    alone = [_triton_values(server.url, tokens, lengths) for tokens, lengths in batches]
    before = _metric(server, "gvm_batch_sequences_count")
    merged: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(batches))

    def send(index):
        tokens, lengths = batches[index]
        padded = torch.cat([tokens, torch.zeros(tokens.shape[0], 11, dtype=tokens.dtype)], dim=1)
        barrier.wait()
        merged[index] = _triton_values(server.url, padded, lengths)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _metric(server, "gvm_batch_sequences_count") - before < len(batches), "no requests were merged"
    for index, (tokens, lengths) in enumerate(batches):
        assert np.array_equal(merged[index][:, :tokens.shape[1]], alone[index])
        assert not merged[index][:, tokens.shape[1]:].any()


def _metric(server: Server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics") as response:
        for family in text_string_to_metric_families(response.read().decode()):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return sample.value
    raise AssertionError(f"no metric {name}")


@pytest.mark.parametrize("case, status, message", [
    ("not json", 400, "not valid JSON"),
    ("wrong names", 400, "expected inputs 'tokens' and 'lengths'"),
    ("wrong shape", 400, "input 'lengths' must have 1 dimension(s)"),
    ("too few values", 400, "values do not fill shape"),
    ("wrong dtype", 400, "input 'tokens' must be INT64"),
    ("outside the vocabulary", 400, "token id 49152 at row 1, position 2 is outside the vocabulary (0..49151)"),
    ("over the maximum length", 400, "lengths[0]=201 is over the maximum sequence length 200"),
    ("length past the tokens", 400, "lengths[1]=9 is not in 1..4"),
    ("body over the limit", 413, "over the limit of 200000 (server.max_body_bytes)"),
    ("unknown model", 404, "no model 'critic'"),
])
def test_a_bad_request_gets_a_4xx_naming_the_fault_and_the_server_keeps_serving(server, case, status, message):
    path = "/v2/models/gvm/infer"
    good = _json_request([[1, 2, 3, 4], [5, 6, 7, 8]], [4, 2])
    body = {
        "not json": b"{inputs: [",
        "wrong names": _json_request([[1, 2]], [2], i0={"name": "input_ids"}),
        "wrong shape": _json_request([[1, 2]], [2], i1={"shape": [1, 1]}),
        "too few values": _json_request([[1, 2]], [2], i0={"shape": [1, 3]}),
        "wrong dtype": _json_request([[1, 2]], [2], i0={"datatype": "FP32"}),
        "outside the vocabulary": _json_request([[1, 2, 3], [4, 5, 49152]], [3, 3]),
        "over the maximum length": _json_request([[1] * 201], [201]),
        "length past the tokens": _json_request([[1, 2, 3, 4], [5, 6, 7, 8]], [4, 9]),
        "body over the limit": _json_request([[1] * 40000] * 3, [40000] * 3),
        "unknown model": good,
    }[case]
    if case == "unknown model":
        path = "/v2/models/critic/infer"
    got, answer = _post(server.url + path, body)
    assert got == status and message in answer["error"], answer
    assert _post(server.url + "/v2/models/gvm/infer", good)[0] == 200


def test_sigterm_answers_the_requests_in_flight_then_the_server_exits(gvm_dir):
    server = Server(gvm_dir, "server.max_delay_ms=5000").wait_ready()
    results: list[int] = []

    def send(seed):
        tokens, lengths = _batch(seed, 2, 30)
        results.append(_post(server.url + "/v2/models/gvm/infer", _json_request(tokens.tolist(), lengths.tolist()))[0])

    threads = [threading.Thread(target=send, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # the requests wait in the batcher (5 s window) when the signal comes, even on a loaded machine
    started = time.time()
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join()
    assert server.process.wait(timeout=30) == 0, server.output()
    assert results == [200] * 4
    assert time.time() - started < 15
    assert "every request in flight was answered" in server.output()


def test_the_server_binds_loopback_and_checks_a_token(gvm_dir):
    refused = subprocess.run([sys.executable, "examples/serve_gvm.py", f"gvm={gvm_dir}", "server.host=0.0.0.0"],
                             cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "set a bearer token in the environment variable NEMO_DVPO_GVM_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr

    server = Server(gvm_dir, env={"NEMO_DVPO_GVM_TOKEN": "s3cret"}).wait_ready()
    try:
        listening = [line for line in server.output().splitlines() if "listening on" in line]
        assert listening and "http://127.0.0.1:" in listening[0]
        body = _json_request([[1, 2]], [2])
        url = server.url + "/v2/models/gvm/infer"
        assert _post(url, body)[0] == 401
        assert _post(url, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(url, body, {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        assert server.stop() == 0


# -- the DVPO actor as client ----------------------------------------------------------------------------

def _dvpo(run_dir: Path, work_dir: Path, gvm: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "examples/train_dvpo.py", "model=tiny", f"run_dir={run_dir}", f"gvm={gvm}",
               f"init_from={work_dir / 'init'}", "rollout.prompts_per_step=4", "rollout.sampling.max_new_tokens=10",
               "ppo.micro_batch_size=1", "data.max_prompt_tokens=96", "eval.num_prompts=4", "eval.batch_size=4",
               "eval.max_new_tokens=8", "optim.lr=1e-3", "train.steps=4", "train.save_every=1", "export_hf=false",
               *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True, timeout=900)


def _step_metrics(run_dir: Path) -> dict[int, dict]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in records}


@pytest.fixture(scope="module")
def in_process_run(tiny_policy_and_gvm, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dvpo_local") / "run"
    completed = _dvpo(run_dir, tiny_policy_and_gvm, str(tiny_policy_and_gvm / "gvm"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return run_dir


def test_dvpo_with_the_served_gvm_logs_the_metrics_of_the_in_process_gvm(server, in_process_run,
                                                                         tiny_policy_and_gvm, tmp_path):
    run_dir = tmp_path / "remote"
    completed = _dvpo(run_dir, tiny_policy_and_gvm, server.url)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert _step_metrics(run_dir) == _step_metrics(in_process_run)
    assert json.loads((run_dir / "summary.json").read_text())["gvm"] == server.url


def test_a_killed_server_stops_the_actor_at_a_checkpoint_and_a_restart_resumes_it_exactly(
        gvm_dir, in_process_run, tiny_policy_and_gvm, tmp_path):
    port = free_port()
    first = Server(gvm_dir, port=port).wait_ready()
    run_dir = tmp_path / "run"
    retries = ("gvm_client.max_retries=2", "gvm_client.backoff_s=0.2", "gvm_client.timeout_s=20")
    actor = subprocess.Popen(
        [sys.executable, "examples/train_dvpo.py", "model=tiny", f"run_dir={run_dir}", f"gvm=http://127.0.0.1:{port}",
         f"init_from={tiny_policy_and_gvm / 'init'}", "rollout.prompts_per_step=4",
         "rollout.sampling.max_new_tokens=10", "ppo.micro_batch_size=1", "data.max_prompt_tokens=96",
         "eval.num_prompts=4", "eval.batch_size=4", "eval.max_new_tokens=8", "optim.lr=1e-3", "train.steps=4",
         "train.save_every=1", "export_hf=false", *retries],
        cwd=REPO_ROOT, env=entry_point_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "latest").exists():
        assert actor.poll() is None and time.time() < deadline, actor.stdout.read()[-4000:]
        time.sleep(0.05)
    first.process.kill()
    first.process.wait()
    output, _ = actor.communicate(timeout=600)
    assert actor.returncode == 2, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output[-4000:]
    assert f"http://127.0.0.1:{port}" in errors[0] and "did not answer" in errors[0]
    assert "resume=true" in errors[0] and "stopped with a checkpoint after step" in errors[0]

    second = Server(gvm_dir, port=port).wait_ready()
    try:
        completed = _dvpo(run_dir, tiny_policy_and_gvm, f"http://127.0.0.1:{port}", "resume=true", *retries)
        assert completed.returncode == 0, completed.stderr[-4000:]
    finally:
        second.stop()
    assert _step_metrics(run_dir) == _step_metrics(in_process_run)
