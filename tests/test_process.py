"""deploy/process.py, the one supervisor of TorchServe, its guard and the front door, and its one wait loop;
and deploy/errors.py's JSON error body, shared by the guard and the front door."""

import json
import os
import subprocess
import sys

import psutil
import pytest

from deploy import process
from deploy.errors import NotReady, error_body

STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
    "time.sleep(99)"
)


@pytest.fixture
def stubborn():
    """A process that ignores SIGTERM (a frozen or stuck server), marked 'stubborn-marker' on its command
    line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, "stubborn-marker"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # its SIGTERM handler is in place
    yield proc
    proc.kill()
    proc.wait()


def test_stop_is_term_then_kill_and_leaves_nothing_behind(stubborn):
    proc = psutil.Process(stubborn.pid)
    proc.terminate()
    assert psutil.wait_procs([proc], timeout=0.2)[1] == [proc]  # SIGTERM alone leaves it running
    assert process.terminate([proc], timeout=0.2) == []  # then SIGKILL
    assert not proc.is_running()


def test_a_pid_file_names_our_process_only_with_its_command_line_and_user(stubborn, tmp_path):
    pid_file = str(tmp_path / "x.pid")
    process.write_pid(pid_file, stubborn.pid)
    assert process.find_by_pid_file(pid_file, "stubborn-marker", uid=os.getuid()).pid == stubborn.pid
    # someone else's process
    assert process.find_by_pid_file(pid_file, "org.pytorch.serve.ModelServer") is None
    # another user's
    assert process.find_by_pid_file(pid_file, "stubborn-marker", uid=os.getuid() + 1) is None
    (tmp_path / "x.pid").write_text("garbage")
    assert process.find_by_pid_file(pid_file, "stubborn-marker") is None
    process.remove_pid_file(pid_file)
    assert process.read_pid(pid_file) is None


def test_wait_until_returns_when_ready_and_says_what_was_not():
    answers = iter(["ping 503", "no READY worker", True])
    process.wait_until(lambda: next(answers), timeout=60, what="x", interval=0)
    with pytest.raises(
        NotReady, match=r"^my_model 2.0 not ready after 0 s \(no READY worker\); see the log$"
    ):
        process.wait_until(lambda: "no READY worker", timeout=0, what="my_model 2.0", hint="see the log")
    with pytest.raises(RuntimeError, match="it died"):  # a probe that raises ends the wait with its error

        def died():
            raise RuntimeError("it died")

        process.wait_until(died, timeout=60, what="x")


def test_the_json_error_body_escapes_what_a_message_quotes():
    message = 'path "/a\\b"\nand a quote: \'; </script>'
    assert json.loads(error_body(400, "BadRequest", message)) == {
        "code": 400,
        "type": "BadRequest",
        "message": message,
    }
