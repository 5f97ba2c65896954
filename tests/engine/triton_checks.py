"""Checks the Triton tests share: where their kernels run (compiled on CUDA, else under Triton's interpreter in a
child pytest); compiling kernels for an H100 (sm_90) on a machine without a GPU, with the ptxas Triton ships, so
what the interpreter only emulates (tl.dot's tile sizes, loop and pointer types, shared memory, the instructions
chosen) is checked in CI; and which modules a CPU code path imports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from workers.engine.attention.triton_kernels import INTERPRETED

ROOT = Path(__file__).parents[2]
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")  # where the kernels run: compiled, or interpreted

# Tests that run kernels; without CUDA, only in the interpreter's child process.
runs_kernels = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="no CUDA and no interpreter here: run in a "
                                  "child process by test_every_case_under_the_interpreter")
# Tests that compile for sm_90 offline (with CUDA or the interpreter, the kernels run instead), and the one that
# starts the interpreter's child.
kernels_do_not_run_here = pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernels run in this process, "
                                             "compiled or interpreted")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def run_under_the_interpreter(test_file: str) -> None:
    """Without CUDA the kernels need TRITON_INTERPRET=1 from before triton is first imported, and in a pytest
    process triton is already in (tests/conftest.py imports transformers, whose torch._dynamo imports triton). So
    the test file runs again in a child pytest started with it, and this fails with the child's report."""
    child = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                           env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and " passed" in child.stdout, child.stdout[-8000:] + child.stderr[-2000:]


def modules_imported(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of `prefixes` that running `code` in a fresh interpreter imports."""
    done = subprocess.run([sys.executable, "-c", f"import json, sys; {code}; print(json.dumps(sorted("
                           f"m for m in sys.modules if m.startswith({prefixes!r}))))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def compile_for_hopper(kernel, constexprs: dict, types: dict[str, str], options: dict | None = None,
                       divisible: tuple[str, ...] = ()):
    """The compiled kernel; its arguments are bfloat16 pointers and int32 scalars unless `types` names them.
    `options` are the launch options the kernel runs with (floating-point fusion on, Triton's default, unless
    they say otherwise; named even so, since Triton 3.9 warns when it is left out). The arguments named in
    `divisible` are taken to be multiples of 16, as Triton specializes them at a launch where they are: what
    lets it vectorize loads and pipeline them through shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else
                 types.get(name, "*bf16" if name.endswith("_ptr") else "i32") for name in kernel.arg_names}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"enable_fp_fusion": True, **(options or {})})


def waits_for_the_kernel_before(ptx: str) -> bool:
    """Whether a kernel compiled chained (PDL) waits for the kernel before it, and lets the next one be scheduled,
    before its first access to global memory: a load, a store, an atomic or an async copy into shared memory."""
    accesses = [ptx.index(op) for op in ("ld.global", "st.global", "atom.global", "cp.async") if op in ptx]
    before = ptx[:min(accesses, default=len(ptx))]
    return "griddepcontrol.wait" in before and "griddepcontrol.launch_dependents" in before
