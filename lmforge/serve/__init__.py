"""`lmforge serve`: an OpenAI-compatible HTTP server (`app`) over a request scheduler
(`scheduler`) that owns one Engine; wire types in `protocol`, Prometheus text in `metrics`."""
