"""The decode kernel's split count: a pure function of the work, the cache
length and the device, and the occupancy it assumes, against the AOT compile
table of the decode kernel (benchmarks/results/aot_decode.md)."""
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from parallax.kernels.triton import decode as td

from .aot_table import parse_table

TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "aot_decode.md"
ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
H100_SHARED_PER_SM = 233472  # 228 KiB (H200 alike); A100: 167936
H100_SMS = 132


def _split_rows():
    rows = [r for r in parse_table(TABLE.read_text()) if r["kernel"] == "_split_kernel"]
    assert len(rows) >= 40, "the AOT table lost its decode rows"
    return rows


def _config(text: str) -> dict:
    words = dict(w.split("=") for w in text.split() if "=" in w)
    return dict(PAIRS=int(words["PAIRS"]), BLOCK_N=int(words["BLOCK_N"]),
                num_warps=next(int(w[1:]) for w in text.split() if w.startswith("w")),
                num_stages=next(int(w[1:]) for w in text.split() if w.startswith("s")))


@pytest.mark.parametrize("row", _split_rows(), ids=lambda r: f"{r['arch']}-{r['dtype']}-D{r['D']}-{r['flags']}")
def test_occupancy_model_bounds_every_compiled_split_kernel(row):
    config, elem, D = _config(row["config"]), ELEM_BYTES[row["dtype"]], int(row["D"])
    assert int(row["registers"]) <= td.split_program_registers(D, elem)
    if "paged" not in row["flags"]:  # paged loads are not pipelined: less shared memory
        assert int(row["shared"]) <= td.split_program_shared_bytes(config, D, elem)
    assert config == td.launch_config(D, getattr(torch, row["dtype"]), 4 if "G4" in row["flags"] else 1)


@pytest.mark.parametrize("dtype,D,per_sm", [(torch.bfloat16, 64, 5), (torch.bfloat16, 128, 3),
                                            (torch.bfloat16, 256, 2), (torch.float32, 64, 2)])
def test_programs_per_multiprocessor_on_hopper(dtype, D, per_sm):
    config = td.launch_config(D, dtype, 1)
    assert td.programs_per_multiprocessor(config, D, dtype.itemsize, H100_SHARED_PER_SM) == per_sm


def test_long_single_sequence_fills_two_waves_instead_of_264_programs():
    """B=1, 8 KV heads, L=65536, bf16 D=128 on 132 SMs: the old rule gave 8 x 33 = 264
    programs, fewer than the 396 the SMs hold at once."""
    config = td.launch_config(128, torch.bfloat16, 1)
    per_sm = td.programs_per_multiprocessor(config, 128, 2, H100_SHARED_PER_SM)
    splits = td.choose_num_splits(8, 65536 // config["BLOCK_N"], H100_SMS, per_sm)
    slots = H100_SMS * per_sm
    assert 8 * splits != 264
    assert 8 * splits > 1.8 * slots  # about two waves
    assert splits * config["BLOCK_N"] * td.MIN_TILES_PER_SPLIT <= 65536


@settings(max_examples=300, deadline=None)
@given(work=st.integers(1, 4096), key_tiles=st.integers(1, 1 << 14), sms=st.integers(1, 256), per_sm=st.integers(1, 16))
def test_choose_num_splits_properties(work, key_tiles, sms, per_sm):
    splits = td.choose_num_splits(work, key_tiles, sms, per_sm)
    assert 1 <= splits <= max(1, key_tiles // td.MIN_TILES_PER_SPLIT)
    if work >= td.UNSPLIT_PROGRAMS_PER_SM * sms:
        assert splits == 1  # every SM already streams a whole cache
        return
    slots = sms * per_sm
    two_waves = math.ceil(td.MIN_WAVES * slots / work)
    if key_tiles // td.MIN_TILES_PER_SPLIT >= two_waves and two_waves <= 4 * td.MERGE_SPLIT_BLOCK:
        assert work * splits > slots  # long enough for two waves, cheap enough to merge: more than one


def test_default_num_splits_is_one_off_cuda():
    config = td.launch_config(64, torch.float32, 1)
    assert td.default_num_splits(1, 1 << 16, config, 64, torch.float32, torch.device("cpu")) == 1
