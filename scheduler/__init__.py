"""Engine loop, SLO-aware batching, admission, cost model, block scheduler, simulator."""
