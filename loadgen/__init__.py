"""Load generator: arrivals, WebRTC/HTTP clients, per-frame metrics, JSON and plots."""
