"""One module per `ray job submit` entry point: `python -m jobs.<stage> --spec <spec>`."""
