"""Run a function on N gloo ranks on CPU with a hard time limit.

Workers are forked (they reuse the parent's imports); each joins a gloo
process group whose collectives time out, and the parent kills what is left
after `timeout` seconds, so a distributed bug fails a test instead of hanging it.
"""
import datetime
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, worker, world_size, port, args):
    torch.set_num_threads(1)  # ranks share two cores; oversubscription stalls gloo
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world_size, *args, timeout=60.0):
    """worker(rank, world_size, *args) on `world_size` forked gloo ranks."""
    context = mp.start_processes(_entry, args=(worker, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{worker.__name__} did not finish on {world_size} ranks within {timeout} s")
