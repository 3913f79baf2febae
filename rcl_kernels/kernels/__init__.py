"""The kernel layer: every backend's kernels, capability, refusals and candidates, one module (or
folder) per backend, over a shared contract.

    contract.py   the kernel-op contract: the compiled library, argument checks, generic fakes,
                  `Kernels` (the one signature the loss calls)
    candidate.py  Problem, Candidate, Backend: what each backend declares, as data
    planner.py    split counts of the streaming GPU kernels, row blocks of the tiled algorithm
    tiled.py      the tiled algorithm's op calls (shared by cpu and cuda)
    cpu.py        the cpu backend
    cuda.py       the cuda backend
    triton/       the triton backend (one file per pass, configs, shared jit helpers, its entry)

Import rule: nothing here imports the dispatcher (rcl_kernels.dispatch), the loss
(rcl_kernels.functional, fused, modules) or the public API; only the dtype table
(rcl_kernels._dtypes) and the compiled library from above (tests/test_layers.py checks it).
"""
