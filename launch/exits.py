"""Leave a training process without Python's finalization: ``run_and_exit(main)``.

torch's gloo backend can abort a rank at interpreter shutdown (``terminate called without an
active exception``, SIGABRT, exit code -6): a ProcessGroupGloo worker thread destroys a finished
work whose tensors hold Python objects and takes the GIL inside ``Py_FinalizeEx``, after
``destroy_process_group`` and the atexit handlers have run (pytorch/pytorch#179291). A job that
finished its work then fails at random. ``run_and_exit`` runs the job, then does what a normal
exit does that matters (the atexit handlers, which flush logging; stdout and stderr) and leaves
with ``os._exit``, so that finalization, and the race, never happens. A failure stays a failure:
an exception prints its traceback and exits 1, ``SystemExit`` keeps its code.

A failing rank other than rank 0 (``RANK``, as torchrun and the deepspeed launcher set it) waits
``FAILURE_GRACE_S`` before it leaves, its traceback already printed: torchrun stops every rank as
soon as one exits non-zero, and the job's message on bad input is printed by rank 0 alone, so rank 0
must be the first to go (a peer's prompt exit would cut its message off; Python's own slow shutdown
used to leave that time by chance). If rank 0 ends first, torchrun stops the waiting rank (SIGTERM).

    from launch.exits import run_and_exit
    if __name__ == "__main__":
        run_and_exit(main)
"""

import atexit
import os
import sys
import time
import traceback
from typing import Callable, NoReturn

FAILURE_GRACE_S = 3.0  # seconds a failing rank other than 0 leaves to rank 0 (see above)


def exit_code(value) -> int:
    """The exit status Python gives ``sys.exit(value)`` (a message is printed to stderr, as Python does):
    None → 0, an int → itself (modulo 256, as the OS keeps it), anything else → printed, 1."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        print(value, file=sys.stderr)
        return 1
    return value & 0xFF


def flush_and_exit(code: int) -> NoReturn:
    """Run the atexit handlers (logging's flush among them) and flush stdout and stderr, then
    ``os._exit(code)``: no interpreter finalization. Never raises."""
    try:
        atexit._run_exitfuncs()  # what a normal exit runs first (they print their own errors)
    except BaseException:  # noqa: BLE001 — nothing may stop the exit
        pass
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:  # noqa: BLE001 — a closed or broken stream
            pass


def _destroy_process_group() -> None:
    """``destroy_process_group`` if the job left its default group up (when torch.distributed is loaded)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Run ``main()`` and leave the process with ``os._exit``: its return value is the exit code when it
    is an int (0 for anything else: a returned log), ``sys.exit(code)`` inside it gives ``code``
    (as Python would), an exception prints its traceback and gives 1 (KeyboardInterrupt: 130). On
    success the default process group, if still up, is destroyed first; on failure a rank other than 0
    first waits ``FAILURE_GRACE_S``."""
    try:
        result = main()
        code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        code = exit_code(code)
        if code == 0:
            _destroy_process_group()
    except SystemExit as e:
        code = exit_code(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 — a failing rank must exit non-zero, with its traceback
        traceback.print_exc()
        code = 1
    if code and _rank() != 0:
        _flush()
        time.sleep(FAILURE_GRACE_S)
    flush_and_exit(code)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
