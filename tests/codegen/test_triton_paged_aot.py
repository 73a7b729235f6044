"""The paged attention kernel compiled ahead of time for sm_80 and sm_90 without spills, at
the configurations whose earlier warp counts or tiles spilled.

The compiles run in a child process started without TRITON_INTERPRET (see test_aot.py:
the first import of triton fixes for the whole process whether its library is compiled or
interpreted). The full matrix (fp16/bf16/fp32, head_dim 64/128, 1/4/8 query heads per KV
head, soft-capped or not, decode and chunk tiles) takes minutes; `aot.paged_attention_specs`
is what an ahead-of-time compile of the whole matrix would call.
"""

import json
import os
import subprocess
import sys

from lmforge.codegen.gpu_targets import TARGETS

CHILD = """
import json, torch
import lmforge
from lmforge.codegen.aot import compile_for_target, paged_attention_specs

CASES = [  # head_dim, group, dtype, soft-cap, tiles, target: each spilled with an earlier warp count or tile
    (64, 4, torch.float32, True, "decode", "sm_90"),  # 4 warps: 20 B
    (128, 1, torch.float32, False, "chunk", "sm_90"),  # 32 x 128 tiles on 4 warps: 776 B
    (128, 1, torch.float32, True, "chunk", "sm_80"),  # 32 x 128 tiles on 8 warps: 20 B
    (64, 1, torch.float16, True, "chunk", "sm_80"),  # 64 x 64 tiles on 4 warps: 20 B
]
reports = []
for head_dim, group, dtype, softcap, kind, target in CASES:
    (spec,) = [spec for spec in paged_attention_specs(head_dim, group, dtype, softcap)
               if spec.name == f"paged_attention_kernel_{kind}"]
    reports.append({"case": [head_dim, group, str(dtype), softcap, kind, target], "config": spec.config(),
                    "ops": list(spec.ops), **compile_for_target(spec, target).summary()})
print(json.dumps(reports))
"""


def test_paged_attention_compiles_without_spills():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=environment, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    reports = json.loads(run.stdout.splitlines()[-1])
    assert len(reports) == 4
    for report in reports:
        target = report["case"][-1]
        assert report["spills"] == report["spill_loads"] == 0, report
        assert 0 < report["registers"] <= 255
        assert report["shared_bytes"] + report["static_shared_bytes"] <= TARGETS[target].shared_per_block
        assert report["ops"] == ["lmforge::attention", "lmforge::tree_attention"]
    decode, chunk_128, capped_128, half = (report["config"] for report in reports)
    assert decode.startswith("num_warps=8,") and "BLOCK_M=1, BLOCK_G=16," in decode
    assert all(config.startswith("num_warps=8,") and "BLOCK_M=16, BLOCK_G=1," in config
               for config in (chunk_128, capped_128))
    assert half.startswith("num_warps=8,") and "BLOCK_M=64, BLOCK_G=1," in half
