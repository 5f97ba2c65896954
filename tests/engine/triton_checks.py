"""Checks the Triton tests share: compiling kernels for an H100 (sm_90) on a machine without a GPU, with the
ptxas Triton ships, so what the interpreter only emulates (tl.dot's tile sizes, loop and pointer types, shared
memory, the instructions chosen) is checked in CI; and which modules a CPU code path imports."""

import json
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).parents[2]


def modules_imported(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of `prefixes` that running `code` in a fresh interpreter imports."""
    done = subprocess.run([sys.executable, "-c", f"import json, sys; {code}; print(json.dumps(sorted("
                           f"m for m in sys.modules if m.startswith({prefixes!r}))))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def compile_for_hopper(kernel, constexprs: dict, types: dict[str, str], options: dict | None = None):
    """The compiled kernel; its arguments are bfloat16 pointers and int32 scalars unless `types` names them.
    `options` are the launch options the kernel runs with (floating-point fusion on, Triton's default, unless
    they say otherwise; named even so, since Triton 3.9 warns when it is left out)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else
                 types.get(name, "*bf16" if name.endswith("_ptr") else "i32") for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"enable_fp_fusion": True, **(options or {})})
