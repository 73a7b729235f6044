import os
import sys
from pathlib import Path

# Triton decides once per process, when it is first imported, whether kernels are interpreted;
# lmforge imports it through torch.export, so the CPU test run sets the interpreter before any
# import. Ahead-of-time compiles run in a subprocess without it (tests/codegen/aot_worker.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

# Under pytest-xdist each worker process runs one test at a time on one core: two workers with
# two intra-op threads each would oversubscribe a 2-core machine and spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REF_MODEL = Path(
    os.environ.get("LMFORGE_REF_MODEL", Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py")
)


@pytest.fixture(scope="session")
def ref_path() -> Path:
    """The reference checkpoint. Missing, the tests that need it fail (so CI cannot pass
    without them) unless LMFORGE_ALLOW_MISSING_REF=1 asks to skip them."""
    if not REF_MODEL.is_dir():
        message = (f"reference checkpoint not found at {REF_MODEL}; set LMFORGE_REF_MODEL to its directory "
                   "(or LMFORGE_ALLOW_MISSING_REF=1 to skip the tests that need it)")
        if os.environ.get("LMFORGE_ALLOW_MISSING_REF") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return REF_MODEL


@pytest.fixture(scope="session")
def ref_hf(ref_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ref_path).eval()


@pytest.fixture(scope="session")
def ref_tokenizer(ref_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref_path)


@pytest.fixture(scope="session")
def ref_program(ref_hf):
    """The reference checkpoint captured once per run (an export costs seconds). Shared:
    a test takes `ref_program.clone()` (own graph and meta, shared weights) before rewriting."""
    from lmforge.compiler.capture import capture

    return capture(ref_hf)


@pytest.fixture(scope="session")
def ref_compiled(ref_path):
    import lmforge

    return lmforge.optimize(ref_path)


@pytest.fixture(scope="session")
def heldout_prompts(ref_path, ref_tokenizer) -> list[torch.Tensor]:
    """Token ids of three prompts of different lengths cut from held-out text."""
    text = (ref_path / "heldout.txt").read_text()
    starts, lengths = (0, 5000, 20000), (40, 25, 60)
    return [ref_tokenizer(text[s : s + 2000]).input_ids[:n] for s, n in zip(starts, lengths)]
