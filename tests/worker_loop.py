"""The loop both distributed test workers share (tests/dist_worker.py, tests/ds_worker.py).

Each launch trains many (mode, case) runs in one process group: a launch costs seconds of imports,
a run well under one. Errors are recorded per run, never raised, so one failing case does not hide
the others. Rank 0 rewrites ``OUT/results.json`` after every run: ``{mode: {case id: [rank 0, rank
1, ...]}, "timing": {mode: seconds}}``; the tests read it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def run_all(modes, cases_for, run_case, out_dir: str) -> None:
    """``run_case(case, mode) -> dict`` for every mode and every case of ``cases_for(mode)``, then
    leave the process. Never returns."""
    import torch.distributed as dist

    results: dict = {"timing": {}}

    def write() -> None:
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f, default=str)

    for mode in modes:
        start = time.perf_counter()
        results[mode] = {}
        for case in cases_for(mode):
            t0 = time.perf_counter()
            try:
                info = run_case(case, mode)
            except Exception as exc:  # noqa: BLE001 - recorded for the test to report
                info = {"rank": dist.get_rank(), "error": f"{type(exc).__name__}: {exc}"[:2000],
                        "trace": traceback.format_exc()[-4000:]}
            info["seconds"] = round(time.perf_counter() - t0, 3)
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, info)
            results[mode][case.id] = every
            write()
        results["timing"][mode] = round(time.perf_counter() - start, 2)
    write()
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: with every result written, the C++ destructors of
    # the libraries' worker threads (gloo, DeepSpeed) sometimes abort at exit ("terminate called
    # without an active exception", SIGABRT), which the launcher reports as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def save_counting_writes(model, folder: str) -> dict:
    """``save_on_main(model, folder)`` while counting the ``PeftModel.save_pretrained`` calls that write
    files on this rank: ``{"wrote": ..., "files": [...], "writes": [folder names written]}``."""
    import deltatune as dt
    from deltatune.integrations.distributed import save_on_main

    writes: list[str] = []
    original = dt.PeftModel.save_pretrained

    def counting(self, save_directory, *a, is_main_process=True, **kw):
        if is_main_process:  # a call that writes files
            writes.append(os.path.basename(str(save_directory)))
        return original(self, save_directory, *a, is_main_process=is_main_process, **kw)

    dt.PeftModel.save_pretrained = counting
    try:
        wrote = save_on_main(model, folder)
    finally:
        dt.PeftModel.save_pretrained = original
    return {"wrote": wrote, "files": sorted(os.listdir(folder)), "writes": writes}
