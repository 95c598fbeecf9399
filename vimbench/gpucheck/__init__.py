"""``vimbench gpu-check``: the checks of a CUDA GPU by priority within a time budget, packed into one archive.

Modules: ``steps`` (the steps in priority order and their time estimates), ``run`` (planning and running them
within the budget, the whole check), ``checks`` (the work on the device that is not a vimbench command:
correctness, device facts, the backward at the floor shape), ``summary`` (summary.md from what the steps
left), ``archive`` (the .tar.gz and its unpacking). Everything is written under one output folder
(``results/gpu/<card>-<date>/`` by default):
    check.json   every scan backend present against the sequential reference on CUDA (``checks.run_checks``)
    tests.json   the CUDA tests of the Triton scan, gpu-tests.txt their output (``checks.run_tests``)
    facts.json   the card's exp2 rate and CUDA context size (``checks.record_facts``)
    backward.json  the Triton scan's backward at the floor shape: gradients checked, times, floor
                 (``checks.run_backward``)
    *.csv        the sweeps, report/ the paper-preset report, figures/ the kernel figures
    steps.jsonl  each step's estimate, actual seconds and status, one line per step and run
    summary.md   plain language first: the card, whether the kernels are correct, Vim-Ti/DeiT-Ti at 1248,
                 the Triton scan against its floor (both Triton designs, and which is faster), what did not
                 run for lack of budget (``summary.write_summary``)
"""
