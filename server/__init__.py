"""HTTP/WebRTC server, sessions, pacing, metrics and the `rollcast` command line."""
