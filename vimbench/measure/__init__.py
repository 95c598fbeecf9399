"""Measuring on the device, each configuration in its own worker process.

    core.py       what every measurer shares: the timer (warm-up, repeats, median/p10/p90), dtypes, units,
                  CPU peak memory
    env.py        the conditions every row carries (versions, host, device, precision settings)
    nvml.py       guarded NVML readings (GPU memory, clock, temperature, power): a failure is an empty cell
    isolation.py  one configuration per worker process: OOM, crash and hang become rows
    launchers.py  where the workers run: here (one per GPU slot), or as submitit jobs (local, Slurm)
    regime.py     the regime a call runs in: torch.compile mode and autocast dtype
    model.py      one model configuration: latency, throughput, memory (``vimbench scaling``)
    train.py      one train step and its per-phase timing (``vimbench scaling --mode train``)
    ops.py        one token-mixer op and the device ceilings (``vimbench kernels``)
    preflight.py  what a GPU run needs, checked within seconds before any measurement (``vimbench gpu-check``)
"""
