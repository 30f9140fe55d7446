"""The core library works without transformers; parallax.hf says how to get it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKED = '''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "safetensors", "peft"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
'''

CORE = BLOCKED + '''
import torch
import parallax
from parallax.models import GPT, preset
model = GPT(preset("tiny", vocab_size=32))
logits, loss = model(torch.randint(0, 32, (1, 8)), torch.randint(0, 32, (1, 8)))
assert torch.isfinite(loss)
assert "transformers" not in sys.modules
try:
    import parallax.hf
except ImportError as e:
    print("hf:", e)
'''


def test_core_imports_and_runs_without_transformers():
    done = subprocess.run([sys.executable, "-c", CORE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "hf: parallax.hf needs transformers and safetensors: pip install 'parallax[hf]'" in done.stdout
