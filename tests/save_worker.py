"""A process that saves adapters and gets killed, for tests/test_reliability.py.

    python save_worker.py <target folder> <reference folder>

Importing torch takes seconds, so this process imports once and forks one child per save run; the
children are the processes that die. It saves two complete reference checkpoints, ``A`` (Bone,
r=2) and ``B`` (Bone, r=4: other shapes and another config), into ``<reference folder>/A`` and
``/B``, prints ``ready <filesystem calls per save>``, then answers one command per line on stdin:

    loop K            fork a child that saves A, B, A, B, ... into the target and stops just before
                      its K-th filesystem call of the loop, waiting to be killed; -> "pid <pid>" once
                      it waits there
    kill              SIGKILL the looping child and reap it; -> "killed"
    save X FMT        save X (A or B) completely, FMT "st" (safetensors) or "bin"; -> "saved"
    die X FMT K       fork a child that saves X and SIGKILLs itself just before its K-th filesystem
                      call (open, fsync, link, replace, unlink, ...); -> "died", or "done" if the
                      save finished before its K-th call
    quit

Each child runs ``PeftModel.save_pretrained`` unchanged; only the filesystem calls it makes are
counted. Every kill point is named by a count, never by a moment: the outcome of each kill does not
depend on how fast the machine is.
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)  # no thread pool exists when the children are forked

import deltatune as dt  # noqa: E402
from models import MLP, randomize_adapters  # noqa: E402

FS_CALLS = ("open", "fsync", "link", "replace", "rename", "unlink", "remove", "mkdir")


def adapters() -> dict[str, dt.PeftModel]:
    out = {}
    for name, r, seed in (("A", 2, 1), ("B", 4, 2)):
        torch.manual_seed(0)
        model = dt.get_peft_model(MLP(), dt.BoneConfig(r=r, target_modules=["lin0", "lin1"]))
        randomize_adapters(model, seed=seed)
        out[name] = model
    return out


def before_fs_calls(action) -> dict:
    """Call ``action(k)`` just before the k-th call (from 1) of any filesystem function in FS_CALLS;
    returns the original functions (see ``restore``)."""
    count = [0]
    originals = {name: getattr(os, name) for name in FS_CALLS}

    def wrap(fn):
        def call(*args, **kwargs):
            count[0] += 1
            action(count[0])
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(os, name, wrap(fn))
    return originals


def restore(originals: dict) -> None:
    for name, fn in originals.items():
        setattr(os, name, fn)


def die_at(k: int) -> None:
    """Make the K-th call of any filesystem function in FS_CALLS SIGKILL this process first."""

    def action(count: int) -> None:
        if count == k:
            os.kill(os.getpid(), signal.SIGKILL)

    before_fs_calls(action)


def wait_at(k: int, ready: int) -> None:
    """Stop just before the K-th filesystem call: write one byte to the pipe ``ready``, then wait
    (for the SIGKILL)."""

    def action(count: int) -> None:
        if count == k:
            os.write(ready, b"!")
            while True:
                signal.pause()

    before_fs_calls(action)


def calls_per_save(models: dict[str, dt.PeftModel], scratch: str) -> float:
    """Filesystem calls of a save over an existing checkpoint (A, B and A again into ``scratch``)."""
    count = [0]

    def action(k: int) -> None:
        count[0] = k

    models["A"].save_pretrained(scratch)
    originals = before_fs_calls(action)
    try:
        for name in ("B", "A"):
            models[name].save_pretrained(scratch)
    finally:
        restore(originals)
    return count[0] / 2


def fork(run) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's code
        code = 1
        try:
            run()
            code = 0
        finally:
            os._exit(code)
    return pid


def main() -> None:
    target, refs = sys.argv[1], sys.argv[2]
    models = adapters()
    for name, model in models.items():
        model.save_pretrained(os.path.join(refs, name))
    print(f"ready {calls_per_save(models, os.path.join(refs, 'scratch')):.1f}", flush=True)
    looping = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "loop":
            k = int(cmd[1])
            read_end, write_end = os.pipe()

            def forever() -> None:
                os.close(read_end)
                wait_at(k, write_end)
                while True:
                    for model in models.values():
                        model.save_pretrained(target)

            looping = fork(forever)
            os.close(write_end)
            reached = os.read(read_end, 1)  # empty: the child died before its K-th call
            os.close(read_end)
            print(f"pid {looping}" if reached else "error the looping child exited", flush=True)
        elif cmd[0] == "kill":
            os.kill(looping, signal.SIGKILL)
            os.waitpid(looping, 0)
            looping = None
            print("killed", flush=True)
        elif cmd[0] == "save":
            models[cmd[1]].save_pretrained(target, safe_serialization=cmd[2] == "st")
            print("saved", flush=True)
        elif cmd[0] == "die":
            name, fmt, k = cmd[1], cmd[2], int(cmd[3])

            def once() -> None:
                die_at(k)
                models[name].save_pretrained(target, safe_serialization=fmt == "st")

            _, status = os.waitpid(fork(once), 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            if not killed and os.WEXITSTATUS(status) != 0:
                print(f"error {status}", flush=True)
            else:
                print("died" if killed else "done", flush=True)
        elif cmd[0] == "quit":
            break
    if looping is not None:
        os.kill(looping, signal.SIGKILL)
        os.waitpid(looping, 0)


if __name__ == "__main__":
    main()
