"""emaki serve: the HTTP API (native jobs and A1111-compatible routes), job queue and web page."""
