"""Capture the Triton launches a launcher makes, and compile them for a GPU
this machine does not have.

`capture(arch)` installs a stand-in Triton driver that reports an sm_<arch>
device (its target, shared-memory limit and SM count), and replaces kernel
launches by records: every `kernel[grid](...)` the launchers make inside the
block is kept as a `Launch` (the kernel, its bound arguments, and for an
autotuned kernel the configs its pruner keeps for that device), and nothing
runs. `compile_launch` then compiles one launch with one config through
Triton's own JIT path (`JITFunction.run(..., warmup=True)`), so what is
compiled is exactly what a real launch would compile: same signature, same
specialisation, same constexprs. Registers and spills come from ptxas's
verbose log, the main loop's instructions from the PTX and TTGIR
(`structure`).

Imports triton: run it where TRITON_INTERPRET is unset (`aot.py` does).
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .structure import LoopStructure, loop_structure
from ..triton.resources import GPUS, REGISTERS_PER_BLOCK


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        props = GPUS[self.arch]
        return {"max_shared_mem": props["max_shared_mem"], "multiprocessor_count": props["multiprocessor_count"],
                "max_num_regs": REGISTERS_PER_BLOCK, "warpSize": 32}


class StandInDriver:
    """The parts of Triton's CUDA driver that compiling and autotune pruning use."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch)

    def get_current_device(self):
        # Triton caches binders per device: one id per arch keeps them apart.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@dataclass
class Launch:
    """One `kernel[grid](*args, **kwargs)` call. `configs` holds what the
    autotuner's pruner keeps (None for a kernel that is not autotuned, which
    compiles with the options in kwargs); `candidates` all its configs."""
    kernel: JITFunction
    args: tuple
    kwargs: dict
    configs: list | None = None
    candidates: list | None = None
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.kernel.fn.__name__


def _constexpr_names(kernel: JITFunction) -> list[str]:
    return [p.name for p in kernel.params if p.is_constexpr]


def bound_arguments(launch: Launch, config=None) -> dict:
    """Every parameter of the kernel by name, the config's values included."""
    bound = dict(zip(launch.kernel.arg_names, launch.args))
    bound.update(launch.kwargs)
    if config is not None:
        bound.update(config.all_kwargs())
    return bound


def specialisation(launch: Launch, config=None) -> tuple:
    """What decides the compiled code, as Triton specialises it: tensor dtypes
    and 16-byte alignment, integers equal to 1 or divisible by 16, constexpr
    and option values. Launches with equal keys compile to the same binary."""
    bound = bound_arguments(launch, config)
    runtime = set(launch.kernel.arg_names) - set(_constexpr_names(launch.kernel))
    key = [launch.kernel.cache_key]
    for name, value in sorted(bound.items()):
        if name not in runtime or not hasattr(value, "data_ptr") and not isinstance(value, (int, float)):
            key.append((name, repr(value)))  # constexprs and compile options (num_warps, ...)
        elif hasattr(value, "data_ptr"):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or isinstance(value, float):
            key.append((name, type(value).__name__))
        else:
            key.append((name, "int", value == 1, value % 16 == 0, abs(value) < 2**31))
    return tuple(key)


@contextlib.contextmanager
def stand_in_driver(arch: int):
    # Put back what was active (None: Triton creates the default lazily,
    # which fails on a machine without a GPU).
    saved = driver._active
    driver.set_active(StandInDriver(arch))
    try:
        yield
    finally:
        driver.set_active(saved)


@contextlib.contextmanager
def capture(arch: int):
    """Inside the block, launches are recorded (yielded list), not run, and
    the active Triton driver is an sm_<arch> stand-in."""
    launches: list[Launch] = []
    saved_autotune, saved_jit = Autotuner.run, JITFunction.run

    def autotuner_run(self, *args, grid, warmup, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        kept = self.prune_configs(kwargs) if len(self.configs) > 1 else list(self.configs)
        self.nargs = None
        launches.append(Launch(self.fn, args, kwargs, list(kept), list(self.configs)))

    def jit_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return saved_jit(self, *args, grid=grid, warmup=warmup, **kwargs)
        launches.append(Launch(self, args, kwargs))
        return None

    with stand_in_driver(arch):
        Autotuner.run, JITFunction.run = autotuner_run, jit_run
        try:
            yield launches
        finally:
            Autotuner.run, JITFunction.run = saved_autotune, saved_jit


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class CompileStats:
    shared: int       # bytes of shared memory per block (dynamic, as launched)
    registers: int    # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    wgmma: bool       # Hopper warpgroup MMA in the PTX
    num_warps: int
    structure: LoopStructure  # what the main loop does (structure)


def compile_launch(launch: Launch, arch: int, config=None) -> CompileStats:
    """Compile `launch` (with `config` for an autotuned kernel) for sm_<arch>."""
    options = {} if config is None else config.all_kwargs()
    log = io.StringIO()
    saved = (triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile)
    # Always compile, so ptxas runs and prints its verbose log (aot.py keeps
    # its own cache of results instead of Triton's cache of binaries).
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    try:
        with stand_in_driver(arch), contextlib.redirect_stdout(log):
            compiled = launch.kernel.run(*launch.args, grid=(1,), warmup=True, **launch.kwargs, **options)
    finally:
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = saved
    text = log.getvalue()
    registers = _REGISTERS.search(text)
    spills = _SPILLS.search(text)
    if registers is None or spills is None:
        raise RuntimeError(f"ptxas printed no resource usage for {launch.name}:\n{text[-2000:]}")
    return CompileStats(
        shared=int(compiled.metadata.shared), registers=int(registers.group(1)),
        spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        wgmma="wgmma" in compiled.asm["ptx"], num_warps=int(compiled.metadata.num_warps),
        structure=loop_structure(compiled.asm["ttgir"], compiled.asm["ptx"]),
    )
