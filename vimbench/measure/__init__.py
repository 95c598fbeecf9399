"""Measuring on the device, each configuration in its own worker process.

    timing.py     the timer shared by every measurer (warm-up, repeats, median/p10/p90), dtypes, units
    env.py        the conditions every row carries (versions, host, device)
    nvml.py       guarded NVML readings (GPU memory, clock, temperature, power): a failure is an empty cell
    isolation.py  one configuration per worker process: OOM, crash and hang become rows
    launchers.py  where the workers run: here (one per GPU slot), or as submitit jobs (local, Slurm)
    model.py      one model configuration: latency, throughput, memory (``vimbench scaling``)
    ops.py        one token-mixer op and the device ceilings (``vimbench kernels``)
"""
