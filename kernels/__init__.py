"""Token-mixer kernels: the selective scan (several backends) and attention implementations."""
from vimbench.kernels.selective_scan import (SCAN_BACKENDS, SCAN_CHOICES, BackendUnavailable, bidirectional_scan,
                             resolve_scan_backend, scan_choices, scan_flops, selective_scan)

__all__ = ["SCAN_BACKENDS", "SCAN_CHOICES", "BackendUnavailable", "bidirectional_scan", "resolve_scan_backend",
           "scan_choices", "scan_flops", "selective_scan"]
