"""`armt bench`: time full attention, sequential ARMT and diagonal ARMT side by side.

    cli.py        the `armt bench` subcommand (argument parsing, orchestration)
    timing.py     warm-up + median timing (CUDA events on GPU) and peak device memory
    workloads.py  the models and the timed callables of each (backend, schedule)
    parity.py     error of each backend against the fp32 reference on the same input
    report.py     JSON record, printed table, PNG plot
"""
