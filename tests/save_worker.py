"""A process that saves adapters and gets killed, for tests/test_reliability.py.

    python save_worker.py <target folder> <reference folder>

Importing torch takes seconds, so this process imports once and forks one child per save run; the
children are the processes that die. It saves two complete reference checkpoints, ``A`` (Bone,
r=2) and ``B`` (Bone, r=4: other shapes and another config), into ``<reference folder>/A`` and
``/B``, prints ``ready <seconds per save>``, then answers one command per line on stdin:

    loop              fork a child that saves A, B, A, B, ... into the target until killed; -> "pid <pid>"
    kill              SIGKILL the looping child and reap it; -> "killed"
    save X FMT        save X (A or B) completely, FMT "st" (safetensors) or "bin"; -> "saved"
    die X FMT K       fork a child that saves X and SIGKILLs itself just before its K-th filesystem
                      call (open, fsync, link, replace, unlink, ...); -> "died", or "done" if the
                      save finished before its K-th call
    quit

Each child runs ``PeftModel.save_pretrained`` unchanged: a kill lands wherever the save happens to be.
"""

from __future__ import annotations

import os
import signal
import sys
import time

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


def die_at(k: int) -> None:
    """Make the K-th call of any filesystem function in FS_CALLS SIGKILL this process first."""
    count = [0]

    def wrap(fn):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return call

    for name in FS_CALLS:
        setattr(os, name, wrap(getattr(os, name)))


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
    started = time.perf_counter()
    for name, model in models.items():
        model.save_pretrained(os.path.join(refs, name))
    per_save = (time.perf_counter() - started) / len(models)
    print(f"ready {per_save:.6f}", flush=True)
    looping = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "loop":

            def forever() -> None:
                while True:
                    for model in models.values():
                        model.save_pretrained(target)

            looping = fork(forever)
            print(f"pid {looping}", flush=True)
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
