"""CI regression gates: a timing gate that survives a noisy shared machine, and a deterministic one.

Timing gate
    The pytest-benchmark suite in ``vimbench/gate/bench/`` (shipped with the package) runs in a subprocess
    (``suite.run_suite``). Every round of every benchmark is
    preceded by the two calibration workloads (``calibration.Calibration``: a fixed matmul and a fixed memory-bound
    add), timed with the same clock, so each round i gives a ratio per reference (``thresholds.REFERENCES``)

        ratio_i = (workload seconds per call in round i) / (reference seconds in round i)

    and a benchmark's ratio in a run is the median over rounds. Load that slows everything for a while
    slows the calibration measured just before by about as much, and cancels; short bursts land in a few
    rounds and the median drops them. Which reference cancels the noise best depends on the workload and
    the clock, so ``--update`` measures all three over several runs and keeps, per benchmark, the one with
    the smallest run-to-run spread.

    Fixed conditions: on CPU the clock is the thread's CPU time (``time.thread_time``) with torch on
    ``calibration.CPU_THREADS`` thread, so time spent descheduled while another process runs does not count (two
    threads on the loaded 2-core CI machine ran 5-40x slower, waiting for a preempted sibling); on CUDA
    it is the wall clock around the launches and a synchronize. glibc malloc runs with fixed thresholds
    (``calibration.SUITE_ENV``): with its default dynamic mmap threshold, whether a multi-MiB temporary is mmapped
    (page-faulted on every call) depends on the process's allocation history, and the same scan took
    5.1 to 10.5 ms in fresh processes.

    Correctness gates speed: before timing, every scan backend the suite would time is checked against
    ``ref`` (``vimbench.measure.verify.check_scans``); one that fails is not timed (``suite.run_suite``'s ``exclude``)
    and fails the gate.

    ``scan``: the gate of one scan backend, typically a plug-in in its own package's CI: the two scan
    benchmarks (``SMALL`` and Vim-Ti 1248 shapes) and the whole Vim-Ti forward with that backend
    (``suite.SCAN_SUITE``, the suite run with ``--scan NAME``), against a baseline file the package keeps.

    Same-run comparison (``--base REV``, and the default on a machine without a stored baseline): revision
    REV is installed beside this tree (``base.install_base``) and both suites run in one session, in two
    processes that take turns (``suite.run_pair``, ``calibration.TURN_ENV``): each benchmark's rounds in two
    segments per side, in the order ``base.BASE_ORDER``; each benchmark's threshold comes from the spread of those
    segments (``thresholds.compare_with_base``). No stored baseline is read or written.

    A baseline (``benchmarks/baselines/<device class>.json`` in a checkout, ``store.device_class``) holds,
    per benchmark, the reference, the median ratio over ``--runs`` runs (at least ``suite.MIN_BASELINE_RUNS``),
    the spread of those runs and the threshold derived from it (``thresholds.threshold_from_runs``). Every
    other run of ``suite.record_runs`` has a synthetic
    co-tenant process beside it (``suite.cotenant``), so that the spread includes the contention a shared CI
    machine sees: runs recorded on an idle machine alone came out up to 20% faster than later idle runs
    and up to 40% faster than runs beside a busy neighbour. A later run fails the gate when a benchmark's
    ratio exceeds the baseline's by more than its threshold. Only slowdowns fail; speed-ups are reported.

Deterministic gate
    ``deterministic``: FLOP counts of every registered model at ``deterministic.FLOP_SHAPES`` (exact, on the
    meta device) and the registers, spill bytes and shared memory of every Triton kernel configuration compiled
    for sm_80 and sm_90 (``vimbench.count.kernel_compile``), compared exactly with
    ``benchmarks/baselines/deterministic.json``. Kernel resources are the compiler's, so the baseline keeps
    them per Triton release (``deterministic.triton_key``:
    major.minor, e.g. "3.6"; each item's key names its arch): Triton 3.6 and 3.8 each gate against their own
    numbers. A Triton release without numbers in the baseline is not compared (the gate says so, names the
    releases it has, and how to record this one) instead of failing on another compiler's numbers; the FLOPs
    are still gated. ``--update`` records the installed release's numbers beside the others.

Units: seconds for times; ratios are dimensionless; thresholds and changes are fractions (0.25 = +25%).
"""
