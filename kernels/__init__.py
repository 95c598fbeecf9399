"""Token-mixer kernels: the selective scan (several backends), Vim's causal conv pair and add + RMSNorm, and
attention."""
from vimbench.kernels.causal_conv import causal_conv1d_pair
from vimbench.kernels.rms_norm import add_rms_norm
from vimbench.kernels.selective_scan import (SCAN_BACKENDS, SCAN_CHOICES, BackendUnavailable, bidirectional_scan,
                                             resolve_scan_backend, run_bidirectional_scan, scan_choices, scan_flops,
                                             selective_scan)

__all__ = ["SCAN_BACKENDS", "SCAN_CHOICES", "BackendUnavailable", "add_rms_norm", "bidirectional_scan",
           "causal_conv1d_pair", "resolve_scan_backend", "run_bidirectional_scan", "scan_choices", "scan_flops",
           "selective_scan"]
